"""The mfm-evaluate and mfm-register flows under a real local Prefect server: same parameters
as the CLI, results in the store, metrics published as table artifacts."""

from __future__ import annotations

import json

import anyio
import pytest
import torch
from safetensors.torch import save

from pipeline import storage


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def artifact_rows(key: str) -> list[dict]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
            )

    found = anyio.run(read)
    assert found, f"no artifact {key}"
    data = found[0].data  # the newest version of the keyed artifact
    return json.loads(data) if isinstance(data, str) else data


def write_export(url: str, state: dict, config: dict, metrics: dict | None = None) -> str:
    storage.write_bytes(storage.join(url, "model.safetensors"), save(state))
    storage.write_bytes(storage.join(url, "config.json"), json.dumps(config).encode())
    if metrics is not None:
        storage.write_bytes(storage.join(url, "metrics.json"), json.dumps(metrics).encode())
    return url


def test_register_flow_promotes_through_the_gate(prefect_server, tmp_path):
    from flows.register import register_flow

    reg = str(tmp_path / "registry")
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0}
    good = write_export(str(tmp_path / "a" / "export"), {"w": torch.ones(2)}, config, {"top1": 0.8})
    worse = write_export(str(tmp_path / "b" / "export"), {"w": torch.zeros(2)}, config, {"top1": 0.6})

    first = register_flow("m", good, registry=reg, promote_to="production")
    assert first["ref"] == "m@v1" and first["promoted"]
    second = register_flow("m", worse, registry=reg, promote_to="production", return_state=True)
    assert second.is_completed()
    result = second.result()
    assert result["ref"] == "m@v2" and result["promoted"] is None and "does not beat" in result["refused"]
    from pipeline.registry import Registry

    assert Registry(reg).alias_version("m", "production") == 1 and Registry(reg).alias_version("m", "latest") == 2
    assert {"metric": "top1", "value": 0.6} in artifact_rows("mfm-register-metrics")


@pytest.fixture
def one_thread():
    """A tiny model on a shared CPU: intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_evaluate_flow_writes_metrics_and_artifact(prefect_server, tmp_path, one_thread):
    from test_data_shards import write_split
    from test_evaluation import write_ood_folder

    from flows.evaluate import evaluate_flow
    from pipeline.config import ModelConfig
    from pipeline.models import build_model, export_encoder

    cfg = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4)
    state, config = export_encoder(build_model(cfg), cfg)
    export = write_export(str(tmp_path / "run" / "export"), state, config)
    write_split(str(tmp_path / "train"), [10])
    write_split(str(tmp_path / "val"), [6], split="val")
    ood = write_ood_folder(tmp_path / "sketch", {"n00000002": [40], "n00000005": [200]})

    result = evaluate_flow(
        export,
        str(tmp_path / "val"),
        train_data=str(tmp_path / "train"),
        corruptions="contrast",
        severities="2",
        device="cpu",
        batch_size=8,
        probe_epochs=2,
        overrides=["data.workers=0"],
        ood={"imagenet-sketch": str(ood)},
    )
    assert result["metrics_url"] == storage.join(export, "metrics.json")
    metrics = json.loads(storage.read_bytes(result["metrics_url"]))
    assert metrics["ood_sets"] == {"imagenet-sketch": str(ood)}
    assert result["imagenet-sketch_top1"] == metrics["ood"]["imagenet-sketch"]["top1"]
    assert metrics["ood"]["imagenet-sketch"]["num_samples"] == 2 and "not mCE" in result["mCE"]
    assert result["top1"] == metrics["top1"] and result["corrupted_mean_top1"] == metrics["robustness"]["mean_top1"]
    rows = {r["metric"]: r["value"] for r in artifact_rows("mfm-evaluate-metrics")}
    assert rows["top1"] == round(metrics["top1"], 6) and "contrast@2" in rows and "knn.top1" in rows
