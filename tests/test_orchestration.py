"""Orchestration against a real local Prefect server (a `prefect server start` subprocess):
`mfm deploy` onto a process work pool, a process worker running `prefect deployment run
'mfm-pretrain/local'` to a complete checkpoint, and mfm-retrain failing at one stage and
continuing from it on the rerun."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "mfm-test-process"
pytestmark = pytest.mark.slow

TINY = {
    "data.backend": "torch",
    "data.workers": 0,
    "data.batch_size": 8,
    "train.nprocs": 1,
    "train.max_steps": 2,
    "train.checkpoint_every": 1,
    "train.picture_every": 2,
    "train.log_every": 1,
    "optim.warmup_epochs": 0,
}
FINETUNE = {"train.max_steps": 1, "train.checkpoint_every": 1, "train.log_every": 1, "optim.warmup_epochs": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session, and everything it started (a process
    worker starts each flow run in a process group of its own)."""
    import psutil

    try:
        groups = {os.getpgid(c.pid) for c in psutil.Process(proc.pid).children(recursive=True)} - {proc.pid}
    except (psutil.NoSuchProcess, ProcessLookupError):
        groups = set()
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME; yields the environment that
    points a subprocess at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        "MFM_STAGING_DIR": str(home / "staging"),
    }
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # a fresh database is migrated first; the machine is shared
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not answer /api/health"
                time.sleep(1)
        yield env
    finally:
        _stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    """10 classes x 4 train / 1 val images of 32 px, ImageFolder layout."""
    from pipeline import sample_data

    return sample_data.build(str(tmp_path_factory.mktemp("sample")), per_class=4, size=32)["folder"]


def _run(args: list[str], env: dict, timeout: float) -> str:
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _read(env: dict, coro):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro(client)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return anyio.run(go)


def test_deploy_and_run_pretrain_through_a_worker(server, sample, tmp_path):
    from pipeline.sharding import shard_dataset

    shard_dataset(sample, str(tmp_path / "shards"), splits="train", shard_size_mb=1)
    out = _run([sys.executable, "-m", "pipeline.cli", "deploy", "--pool", POOL], server, 300)
    for name in ("mfm-shard/local", "mfm-pretrain/local", "mfm-evaluate/local", "mfm-retrain/local"):
        assert f"deployed {name}" in out, out

    async def retrain(client):
        return await client.read_deployment_by_name("mfm-retrain/local")

    deployment = _read(server, retrain)
    assert deployment.work_pool_name == POOL
    assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [("0 3 * * 1", False)]

    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
        env=server,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run_dir = tmp_path / "run"
        overrides = {**TINY, "data.train": str(tmp_path / "shards" / "train"), "train.run_dir": str(run_dir)}
        out = _run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "mfm-pretrain/local",
                "--param",
                "preset=tiny_cpu",
                "--param",
                f"overrides={json.dumps(overrides)}",
                "--watch",
            ],
            server,
            500,
        )
        assert "Completed" in out, out
    finally:
        _stop_group(worker)
        log.close()
    assert (run_dir / "step-2" / "COMPLETE").exists(), sorted(p.name for p in run_dir.iterdir())
    assert (run_dir / "export" / "model.safetensors").exists()


def test_retrain_fails_at_a_stage_and_the_rerun_continues_there(server, sample, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import FAIL_ENV, retrain_flow
    from pipeline.registry import Registry

    store = tmp_path / "store"
    kwargs = dict(
        source=sample,
        store=str(store),
        preset="tiny_cpu",
        overrides=TINY,
        registry_name="mfm-test",
        finetune_preset="finetune_tiny_cpu",
        finetune_overrides=FINETUNE,
        shard_options={"shard_size_mb": 1},
        retry_delay_seconds=0,
        eval_options={
            "corruptions": "contrast",
            "severities": "3",
            "probe_epochs": 2,
            "device": "cpu",
            "batch_size": 8,
        },
    )
    for key in ("TORCH_EXTENSIONS_DIR", "MFM_STAGING_DIR", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, server[key])
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        monkeypatch.setenv(FAIL_ENV, "evaluate")
        failed = retrain_flow(**kwargs, return_state=True)
        monkeypatch.delenv(FAIL_ENV)
        assert failed.is_failed()
        assert "injected failure of stage 'evaluate'" in str(failed.result(raise_on_failure=False))

        manifests = sorted(store.glob("shards/*/*/manifest.json"))
        markers = sorted(store.glob("runs/*/step-*/COMPLETE"))
        exports = sorted(store.glob("runs/*/export/model.safetensors"))  # pretrained, fine-tuned
        assert len(manifests) == 2 and len(markers) == 3 and len(exports) == 2
        assert not list(store.glob("runs/*/evaluation")) and not (store / "registry").exists()
        before = {p: p.stat().st_mtime_ns for p in [*manifests, *markers, *exports]}

        async def evaluate_runs(client):
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[failed.state_details.flow_run_id]))
            )
            return [r.run_count for r in runs if r.name == "evaluate"]

        # InjectedFailure counts as transient: the stage ran 1 + 2 retries before the flow failed.
        assert _read(server, evaluate_runs) == [3]

        result = retrain_flow(**kwargs)
        assert result["stages"] == {
            "shard": "Cached",
            "pretrain": "Cached",
            "finetune": "Cached",
            "evaluate": "Completed",
            "register": "Completed",
        }
        assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing re-sharded or retrained
        assert result["model"] == "mfm-test@v1" and result["promoted"]
        assert {result["export"], result["pretrained_export"]} == {str(p.parent) for p in exports}
        assert result["export"] == result["finetune_run_dir"] + "/export" and result["finetune_run_dir"].endswith(
            "-finetune"
        )
        metrics = json.loads(Path(result["metrics"]).read_text())
        assert metrics["model"] == result["export"] and metrics["classifier"] == "head"
        assert Registry(result["registry"]).alias_version("mfm-test", "production") == 1

        # The report of the registered model: both runs behind it, its evaluation and lineage.
        from browser import open_page

        from pipeline.report import write_report

        report = Path(write_report(result["model"], registry=result["registry"]))
        assert report == Path(result["finetune_run_dir"]) / "report.html"
        page = report.read_text()
        assert page.count("<h2>fine-tuning: ") == 1 and page.count("<h2>pretraining: ") == 1
        assert "knn.top1" in page and "corruptions." in page and "data manifest" in page and "mfm-test@v1" in page
        seen = open_page(report)
        assert not seen["errors"] and seen["images"] and all(w > 0 for _, _, w in seen["images"]), seen

        # Same inputs once more (a scheduled run with no new data): all cached, no new version.
        again = retrain_flow(**kwargs)
        assert set(again["stages"].values()) == {"Cached"} and again["model"] == "mfm-test@v1"
        assert Registry(result["registry"]).versions("mfm-test") == [1]

        # Another evaluation: only the stages that read eval_options run again; the new version
        # ties on the gate metric, so it is registered but not promoted, and the flow succeeds.
        other = retrain_flow(**{**kwargs, "eval_options": {**kwargs["eval_options"], "corruptions": "none"}})
        assert other["stages"] == {**result["stages"], "evaluate": "Completed", "register": "Completed"}
        assert other["model"] == "mfm-test@v2" and other["promoted"] is None and "does not beat" in other["refused"]
        assert Registry(result["registry"]).alias_version("mfm-test", "production") == 1
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # deliver this process's queued logs while the server is up


def test_config_errors_are_not_retried():
    from flows.retrain import InjectedFailure, is_transient
    from pipeline.config import ConfigError, load_config
    from pipeline.training.launcher import LaunchError
    from pipeline.training.trainer import EXIT_NON_FINITE

    with pytest.raises(ConfigError) as bad_key:
        load_config("tiny_cpu", ["train.no_such_key=1"])
    assert not is_transient(bad_key.value)
    assert not is_transient(LaunchError(EXIT_NON_FINITE, "non-finite loss"))
    assert is_transient(LaunchError(1, "rank 1 was killed"))
    assert is_transient(ConnectionResetError("connection reset by peer"))
    assert is_transient(InjectedFailure("drill"))


def test_retrain_on_a_growing_source_adds_shards_and_warm_starts(server, sample, tmp_path, monkeypatch):
    """Two scheduled runs, the source grown by 10% in between: the second reshards only the new
    files into the same shard folder and continues pretraining from the production model."""
    import shutil

    import yaml
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import retrain_flow
    from pipeline.registry import Registry

    source, store = tmp_path / "source", tmp_path / "store"
    shutil.copytree(sample, source)
    kwargs = dict(
        source=str(source),
        store=str(store),
        preset="tiny_cpu",
        overrides=TINY,
        registry_name="mfm-grow",
        finetune_preset=None,
        shard_options={"shard_size_mb": 0.02},
        retry_delay_seconds=0,
        eval_options={"corruptions": "none", "probe_epochs": 1, "device": "cpu", "batch_size": 8},
        warm_start="production",
    )
    for key in ("TORCH_EXTENSIONS_DIR", "MFM_STAGING_DIR", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, server[key])
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        first = retrain_flow(**kwargs)
        assert first["warm_start"] is None and first["model"] == "mfm-grow@v1" and first["promoted"]
        train = Path(first["shards"]["train"])
        old = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in train.glob("train-*")}

        images = sorted((source / "train").glob("*/*.JPEG"))
        for i, src in enumerate(images[: len(images) // 10]):
            shutil.copyfile(src, src.with_name(f"grown_{i}.JPEG"))
        second = retrain_flow(**kwargs)

        assert second["shards"] == first["shards"]  # the same folder, grown
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in train.glob("train-*") if p.name in old} == old
        m = json.loads((train / "manifest.json").read_text())
        assert m["revision"] == 2 and m["revisions"][1]["samples"] == len(images) // 10
        assert second["data"]["train"]["new_samples"] == len(images) // 10
        assert second["data"]["val"]["revision"] == 1  # val did not change
        assert second["stages"]["shard"] == second["stages"]["pretrain"] == "Completed"

        assert second["warm_start"] == "mfm-grow@v1" and second["run_dir"] != first["run_dir"]
        run_config = yaml.safe_load((Path(second["run_dir"]) / "config.yaml").read_text())
        assert run_config["pretrain"]["init"] == "mfm-grow@v1"
        reg = Registry(second["registry"])
        lineage = reg.manifest("mfm-grow@v2")["lineage"]
        assert lineage["warm_start"] == "mfm-grow@v1" and lineage["data_manifest"]["revision"] == 2
        card = (Path(second["registry"]) / "mfm-grow" / "v2" / "README.md").read_text()
        assert "warm-started from: `mfm-grow@v1`" in card
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)


def test_kubernetes_deployment_renders_to_valid_kubernetes_jobs(server):
    """`mfm deploy --kubernetes` on the real server, then each flow run's Job as the Kubernetes
    worker builds it (prefect-kubernetes, the work pool's base template from
    infra/k8s-work-pool.json + the deployment's and the run's job variables), validated against
    the Kubernetes API schema."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
    from test_cluster_files import validate_resource

    image = "registry.example/mfm-pipeline:test"
    out = _run([sys.executable, "-m", "pipeline.cli", "deploy", "--kubernetes", "--image", image], server, 300)
    assert "deployed mfm-pretrain/k8s" in out, out

    async def render(client):
        pool = await client.read_work_pool("mfm-k8s")
        deployment = await client.read_deployment_by_name("mfm-pretrain/k8s")
        jobs = []
        for job_variables in ({}, {"gpus": 8, "cpu": "64", "memory": "480Gi", "env": {"MFM_REGISTRY": "s3://r/reg"}}):
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"preset": "vit_b16_mfm"}, job_variables=job_variables
            )
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                run, client=client, work_pool=pool, worker_name="render-test", deployment=deployment
            )
            jobs.append((run, config))
        return jobs

    (default_run, default), (run, big) = _read(server, render)
    for flow_run, config in ((default_run, default), (run, big)):
        manifest = copy.deepcopy(config.job_manifest)
        # prefect-kubernetes insists on these two in the pod spec (its own default template has
        # them there; the API server drops unknown fields with a warning): the only fields let by.
        pod = manifest["spec"]["template"]["spec"]
        assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
        validate_resource(manifest)
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
        assert container["args"] == ["prefect", "flow-run", "execute"]
        assert env["PREFECT__DEPLOYMENT_NAME"] == "k8s" and env["PREFECT__FLOW_NAME"] == "mfm-pretrain"
        assert manifest["metadata"]["namespace"] == "mfm"
    limits = big.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["nvidia.com/gpu"] == 8 and limits["requests"]["cpu"] == "64"
    big_env = {e["name"]: e.get("value") for e in big.job_manifest["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert big_env["MFM_REGISTRY"] == "s3://r/reg"
