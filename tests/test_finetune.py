"""Fine-tuning end to end, every file on the S3 endpoint: sample shards -> a tiny MFM pretrain
(`mfm pretrain`, real DeepSpeed process) -> registry -> `mfm finetune` from `NAME@latest` (2 ranks,
gloo, ZeRO-2, mixup/cutmix/RandAugment/random erasing on) -> a run cut short after its step-2
checkpoint -> the same run finished through the `mfm-finetune` Prefect flow, which resumes it ->
metrics.json and a classifier export that timm loads with its head.

Process start-up dominates on CPU, so the three launches are shared between the assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
BATCH, WARMUP_STEPS = 16, 5  # 80 images / 16 = 5 steps per epoch; optim.warmup_epochs=1


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _run(args: list[str], env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _env(staging: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["MFM_STAGING_DIR"] = str(staging)
    return env


def _keys(s3_endpoint, url: str) -> set[str]:
    import boto3

    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint.url)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def pipeline_run(s3_endpoint, tmp_path_factory):
    from pipeline import sample_data, storage
    from pipeline.registry import Registry
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("finetune")
    store = f"s3://mfm-test/finetune-{time.time_ns()}"
    sample = sample_data.build(str(root / "sample"), per_class=8, size=32)
    manifests = shard_dataset(sample["folder"], f"{store}/shards", splits=["train", "val"], shard_size_mb=1)
    assert manifests["train"]["num_samples"] == 80 and manifests["val"]["num_samples"] == 20
    env = _env(root / "staging")
    data = {
        "data.train": f"{store}/shards/train",
        "data.val": f"{store}/shards/val",
        "data.backend": "torch",
        "data.workers": 0,
        "data.batch_size": BATCH,
    }

    _run(
        [
            "pretrain",
            "--config",
            "tiny_cpu",
            *_sets(
                {
                    **data,
                    "train.run_dir": f"{store}/pretrain",
                    "train.nprocs": 1,
                    "train.max_steps": 2,
                    "optim.warmup_epochs": 0,
                }
            ),
        ],
        env,
    )
    registry = f"{store}/registry"
    ref = Registry(registry).register("tiny-mfm", f"{store}/pretrain/export")
    assert str(ref) == "tiny-mfm@v1"

    run_dir = f"{store}/finetune"
    finetune = {
        **data,
        "finetune.init": "tiny-mfm@latest",
        "finetune.registry": registry,
        "train.run_dir": run_dir,
        "train.nprocs": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "optim.warmup_epochs": 1,
        # the full ViT recipe, which finetune_tiny_cpu trims for a CPU demo: mixing, RandAugment,
        # erasing, and the lr given per 512 images
        "finetune.mixup": 0.8,
        "finetune.cutmix": 1.0,
        "finetune.randaugment": "rand-m9-mstd0.5-inc1",
        "finetune.reprob": 0.5,
        "optim.lr_base_batch": 512,
    }
    first = _run(["finetune", "--config", "finetune_tiny_cpu", *_sets({**finetune, "train.max_steps": 2})], env)
    # What a kill during step 3's checkpoint leaves: step-2 complete, step-3 half written, no
    # export or metrics yet.
    fs, path = storage.filesystem(run_dir)
    fs.rm(f"{path}/export", recursive=True)
    fs.rm(f"{path}/metrics.json")
    storage.write_bytes(f"{run_dir}/step-3/mp_rank_00_model_states.pt", b"half")
    # meanwhile `latest` moves on (same weights, other metrics: a new version); the run must still say v1
    assert str(Registry(registry).register("tiny-mfm", f"{store}/pretrain/export", metrics={"n": 2})) == "tiny-mfm@v2"
    return {
        "store": store,
        "run_dir": run_dir,
        "registry": registry,
        "first": first,
        "finetune": finetune,
        "env": env,
        "root": root,
    }


@pytest.fixture(scope="module")
def resumed(pipeline_run):
    """The cut-short run finished by the mfm-finetune flow under a real Prefect server."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune_flow

    overrides = {**pipeline_run["finetune"], "train.max_steps": 4}
    old = dict(os.environ)
    # another machine: an empty staging folder, everything comes back from S3
    os.environ.update(_env(pipeline_run["root"] / "staging-b"))
    log = pipeline_run["root"] / "resume.log"
    try:
        with prefect_test_harness(server_startup_timeout=120):
            # the ranks' output goes to a file: pytest's capture of fd 1 is not theirs to read
            with open(log, "w") as out:
                saved = os.dup(1)
                os.dup2(out.fileno(), 1)
                try:
                    result = finetune_flow("finetune_tiny_cpu", overrides)
                finally:
                    os.dup2(saved, 1)
                    os.close(saved)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return result, log.read_text()


def test_first_run_pins_the_registry_version_and_reports_metrics(pipeline_run, s3_endpoint):
    out = pipeline_run["first"]
    result = json.loads(out[out.rindex('{\n "run_dir"') :])
    assert set(result["metrics"]) == {"top1", "top5", "num_samples"} and result["metrics"]["num_samples"] == 20
    assert "new ['fc_norm', 'head']; dropped ['norm']" in out  # the encoder's final norm gives way to fc_norm
    from pipeline import storage

    config = storage.read_bytes(f"{pipeline_run['run_dir']}/config.yaml").decode()
    assert "init: tiny-mfm@v1" in config and "num_classes: 10" in config and "patch_size: 8" in config  # tiny_cpu


def test_flow_resumes_the_cut_short_run(pipeline_run, resumed, s3_endpoint):
    from pipeline import storage

    result, log = resumed
    assert "resuming at step 2 of 4" in log, log[-3000:]
    run_dir = pipeline_run["run_dir"]
    keys = _keys(s3_endpoint, run_dir)
    assert not any(k.startswith("step-3/") for k in keys)  # the half-written folder was dropped
    assert {
        "step-2/COMPLETE",
        "step-4/COMPLETE",
        "export/model.safetensors",
        "export/config.json",
        "metrics.json",
    } <= keys
    logged = [json.loads(r) for r in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    rows = [r for r in logged if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the fixed val batch's loss (hard labels, no mixing) at the start and at every checkpoint
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 2, 4]
    assert all(0 < r["val_loss"] < 10 for r in logged if "val_loss" in r)
    # the warmup carries on across the restart: lr = 2e-3 x 16/512 x step/5 (the head's group, scale 1)
    peak = 2e-3 * BATCH / 512
    assert [r["lr"] for r in rows] == pytest.approx([peak * s / WARMUP_STEPS for s in (1, 2, 3, 4)])
    assert all(r["loss"] > 0 and r["grad_norm"] is not None for r in rows)
    assert result["run_dir"] == run_dir and result["checkpoint"] == f"{run_dir}/step-4"
    assert result["export"] == f"{run_dir}/export" and result["metrics_url"] == f"{run_dir}/metrics.json"


def test_metrics_json_on_s3(pipeline_run, resumed):
    from pipeline import storage

    result, _ = resumed
    metrics = json.loads(storage.read_bytes(f"{pipeline_run['run_dir']}/metrics.json"))
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1 and metrics["num_samples"] == 20
    assert metrics["init"] == "tiny-mfm@v1" and metrics["step"] == 4
    assert metrics["data"] == f"{pipeline_run['store']}/shards/val"
    assert result["metrics"]["top1"] == metrics["top1"]
    # beside the export too, so that `mfm registry register` records it
    assert json.loads(storage.read_bytes(f"{pipeline_run['run_dir']}/export/metrics.json"))["top1"] == metrics["top1"]


def test_export_is_a_timm_classifier_with_its_head(pipeline_run, resumed, tmp_path):
    import timm
    from safetensors.torch import load

    from pipeline import evaluation, storage
    from pipeline.registry import load_export

    export = f"{pipeline_run['run_dir']}/export"
    config = json.loads(storage.read_bytes(f"{export}/config.json"))
    state = load(storage.read_bytes(f"{export}/model.safetensors"))
    assert config["num_classes"] == 10 and config["model_args"]["global_pool"] == "avg"
    assert len(config["label_names"]) == 10
    model = timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], **config["model_args"]
    )
    model.load_state_dict(state, strict=True)  # head and fc_norm included, nothing left over
    assert model.head.out_features == 10 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # The fine-tune started from the pretrained encoder: a handful of steps at a layer-decayed
    # warmup lr barely moves the patch embedding, while a fresh init is nowhere near it.
    pre = load(storage.read_bytes(f"{pipeline_run['store']}/pretrain/export/model.safetensors"))
    key = "patch_embed.proj.weight"
    assert torch.allclose(state[key], pre[key], atol=1e-3)
    fresh = timm.create_model(config["architecture"], pretrained=False, num_classes=10, **config["model_args"])
    assert (fresh.state_dict()[key] - pre[key]).abs().max() > 1e-2
    # the export, evaluated alone in this process, scores what the ranks reported
    loaded, _ = load_export(export)
    assert loaded.head.out_features == 10
    metrics, _ = evaluation.run(
        export,
        f"{pipeline_run['store']}/shards/val",
        corruptions="none",
        out=str(tmp_path / "metrics.json"),
        batch_size=8,
        device="cpu",
    )
    reported = json.loads(storage.read_bytes(f"{pipeline_run['run_dir']}/metrics.json"))
    assert metrics["top1"] == pytest.approx(reported["top1"]) and metrics["top5"] == pytest.approx(reported["top5"])
