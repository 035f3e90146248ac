"""The mfm-shard flow under a real local Prefect server."""

import json
import os

import pytest

from pipeline import sample_data


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_shards_and_logs_progress(prefect_server, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.shard import shard_flow

    src = sample_data.build(str(tmp_path / "src"), per_class=4, size=32)
    state = shard_flow(
        src["folder"], str(tmp_path / "out"), splits=["train", "val"], shard_size_mb=0.03, return_state=True
    )
    assert state.is_completed()
    result = state.result()
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert result["train"] == {"num_samples": 40, "shards": len(manifest["shards"]), "rejected": 0}
    assert result["val"]["num_samples"] == 10
    assert os.path.exists(tmp_path / "out" / "val" / "val-000000.idx")

    import time

    import anyio
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the server in batches; send what is queued

    async def logs():
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            flow = await client.read_flow(run.flow_id)
            found = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return flow.name, [log.message for log in found]

    deadline = time.time() + 30
    name, messages = anyio.run(logs)
    while not any("committed 40 samples" in m for m in messages) and time.time() < deadline:
        time.sleep(0.5)  # the log worker may still be delivering the last batch
        name, messages = anyio.run(logs)
    assert name == "mfm-shard"
    assert any("train: 40 images" in m for m in messages), messages
    assert any("committed 40 samples" in m for m in messages), messages


async def _task_runs(flow_run_id) -> list[tuple[str, str, str]]:
    """(name, state, the run as the API holds it) of a flow run's task runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return [(r.name, r.state_name, r.model_dump_json()) for r in runs]


def test_flow_writes_shards_on_a_dask_cluster(prefect_server, s3_endpoint, tmp_path, monkeypatch):
    """dask_address: one write-shard task run per shard on the cluster's workers (DaskTaskRunner),
    the same objects in S3 as the local pool writes; no credential in what the API holds."""
    import anyio

    from pipeline.sharding.cluster import import_distributed

    distributed = import_distributed()

    from flows.shard import shard_flow
    from pipeline import storage

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto takes any; the workers inherit it
    src = sample_data.build(str(tmp_path / "src"), per_class=4, size=32)["folder"]
    local, remote = (f"s3://mfm-test/flow-{name}-{os.getpid()}" for name in ("pool", "dask"))
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        state = shard_flow(
            src, remote, splits=["train"], shard_size_mb=0.03, dask_address=cluster.scheduler_address, return_state=True
        )
    assert state.is_completed(), state
    expected = shard_flow(src, local, splits=["train"], shard_size_mb=0.03, workers=2)
    assert state.result() == expected

    def objects(url):
        fs, path = storage.filesystem(url)
        return {p[len(path) :]: fs.cat_file(p) for p in fs.find(path) if not p.endswith(".claim")}

    assert objects(remote) == objects(local)

    runs = anyio.run(_task_runs, state.state_details.flow_run_id)
    shards = expected["train"]["shards"]
    assert sorted(name for name, _, _ in runs) == [f"write-shard-train-{i:06d}" for i in range(shards)]
    assert {s for _, s, _ in runs} == {"Completed"}
    assert not any(secret in dump for _, _, dump in runs)


def test_retrain_shard_stage_on_a_dask_cluster_keeps_its_cache_key(prefect_server, tmp_path):
    """mfm-retrain's shard stage with dask_address writes the shards on the cluster; where it ran
    is no part of the cache key, so the same stage without the cluster is a cache hit."""
    import anyio

    from pipeline.sharding.cluster import import_distributed

    distributed = import_distributed()
    from prefect import flow

    from flows.retrain import run_stage
    from pipeline import storage

    src = sample_data.build(str(tmp_path / "src"), per_class=4, size=32)["folder"]
    shards = str(tmp_path / "store" / "shards" / "k")
    ctx = {
        "source": src,
        "shards": shards,
        "splits": ["train", "val"],
        "shard_options": {"shard_size_mb": 0.03},
        "preset": "tiny_cpu",
        "overrides": {},
    }

    @flow
    def stage(runtime):
        return run_stage.with_options(result_storage=tmp_path / "results", retries=0)(
            "shard", "flows.retrain:shard_stage", ctx, runtime, return_state=True
        )

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        first = stage({"dask_address": cluster.scheduler_address})
    assert first.name == "Completed", first
    assert first.result()["manifests"]["train"]["num_samples"] == 40
    names = [name for name, _, _ in anyio.run(_task_runs, first.state_details.flow_run_id)]
    shard_runs = sorted(n for n in names if n.startswith("write-shard-"))
    assert len(shard_runs) == sum(m["shards"] for m in first.result()["manifests"].values())
    assert json.loads(storage.read_bytes(storage.join(shards, "train", "manifest.json")))["revision"] == 1
    again = stage({"dask_address": None})
    assert again.name == "Cached" and again.result() == first.result()
