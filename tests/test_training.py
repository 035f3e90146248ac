"""Pretraining end to end: real DeepSpeed processes (2 ranks, gloo, ZeRO-2) through `mfm pretrain`,
fed by the real loader (pipeline.data, torch backend) from sample shards (pipeline.sample_data ->
pipeline.sharding).

The runs are slow to start, so one uninterrupted local run and one killed-and-restarted run on
the S3 endpoint are shared between the assertions."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
pytestmark = pytest.mark.slow


def _overrides(data: str, run_dir: str, **extra) -> list[str]:
    values = {
        "train.nprocs": 2,
        "train.zero_stage": 2,
        "data.train": f"{data}/train",
        "data.val": f"{data}/val",
        "train.run_dir": run_dir,
        "data.backend": "torch",
        "data.workers": 0,
        "data.batch_size": 16,
        "train.max_steps": STEPS,
        "train.checkpoint_every": 2,
        "train.keep_last": 2,
        "train.log_every": 1,
        "train.picture_every": 4,
        "optim.base_lr": 1.5e-2,
        "optim.warmup_epochs": 0,
        **extra,
    }
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env(staging: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["MFM_STAGING_DIR"] = str(staging)
    return env


def _pretrain(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "pretrain", "--config", "tiny_cpu", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(metrics: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics.splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """80 training images (10 classes x 8, 32 px): 5 steps of 16 per epoch, so 8 steps cross an
    epoch; 20 val images. Returns the shards' folder (train/, val/)."""
    from pipeline import sample_data
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("data")
    sample = sample_data.build(str(root / "sample"), per_class=8, size=32)
    manifests = shard_dataset(sample["folder"], str(root / "shards"), shard_size_mb=1)
    assert manifests["train"]["num_samples"] == 80 and manifests["val"]["num_samples"] == 20
    return str(root / "shards")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("local")
    run_dir = root / "run"
    out = _finish(_pretrain(_overrides(data, str(run_dir)), _env(root / "staging")))
    return run_dir, out


def test_two_rank_zero2_run_learns_and_writes_its_run_folder(local_run):
    run_dir, out = local_run
    all_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in all_rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Learning, measured where data noise cannot hide it: the same val images and masks
    val = {r["step"]: r["val_loss"] for r in all_rows if "val_loss" in r}
    assert sorted(val) == [0, 2, 4, 6, 8]
    # (a strict fall at every checkpoint: equal values would mean the weights never moved)
    assert [val[s] for s in sorted(val)] == sorted(val.values(), reverse=True) and len(set(val.values())) == 5, val
    assert val[8] < 0.995 * val[0], val
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(r["grad_norm"] is not None and r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in rows)
    # matmul utilization: achieved TFLOP/s per rank against the fp32 matmul peak the run measured;
    # no MFU on a CPU (no datasheet peak)
    speed = [r for r in all_rows if "flops_per_image" in r]
    assert len(speed) == 1 and speed[0]["flops_per_image"] > 0 and speed[0]["peak_source"].startswith("measured")
    for r in rows:
        tflops = speed[0]["flops_per_image"] * r["images_per_s"] / 2 / 1e12  # per rank
        assert r["tflops"] == pytest.approx(tflops) and r["mfu"] is None
        assert r["matmul_utilization"] == pytest.approx(tflops / speed[0]["peak_tflops"])
        assert r["peak_memory_gib"] > 0
    # lr: scaled by 16/64 (tiny_cpu's lr_base_batch) and decaying along the cosine from the first step (no warmup)
    assert rows[0]["lr"] <= 1.5e-2 * 16 / 64 and rows[-1]["lr"] < rows[0]["lr"]
    # keep_last=2 of the checkpoints at 2, 4, 6, 8; each complete with its marker
    steps = sorted(p.name for p in run_dir.glob("step-*"))
    assert steps == ["step-6", "step-8"]
    marker = json.loads((run_dir / "step-8" / "COMPLETE").read_text())
    assert marker["step"] == 8 and marker["world_size"] == 2
    assert {"client-rank0.pt", "client-rank1.pt", "mp_rank_00_model_states.pt"} <= set(marker["files"])
    assert all((run_dir / "step-8" / f).exists() for f in marker["files"])
    client = torch.load(run_dir / "step-8" / "client-rank1.pt", weights_only=True)
    assert client["step"] == 8 and client["loader"]["epoch"] == 1 and client["loader"]["segments"][-1]["batches"] == 3
    import matplotlib.image

    for step in (4, 8):
        picture = matplotlib.image.imread(run_dir / "pictures" / f"step-{step}.png")
        assert picture.ndim == 3 and picture.shape[0] > 100
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    result = json.loads(out[out.rindex("{\n") :])
    assert result["latest"] == str(run_dir / "step-8") and result["export"] == str(run_dir / "export")
    # quiet terminal: the pipeline's lines there, DeepSpeed's accelerator and build chatter in the rank logs
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "mfm.train: step 8/8" in out and "Setting accelerator to CPU" in rank0
    assert "Setting accelerator" not in out and "real_accelerator" not in out


def test_exported_encoder_loads_into_plain_timm_model(local_run):
    import timm
    from safetensors.torch import load_file

    run_dir, _ = local_run
    config = json.loads((run_dir / "export" / "config.json").read_text())
    state = load_file(run_dir / "export" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in state.values())
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head") for k in missing)
    # it is the trained encoder, not a fresh one: the paper init differs from the trained weights
    fresh = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    features = model.forward_features(torch.zeros(1, 3, 32, 32))
    assert features.shape == (1, 1 + 16, 128) and torch.isfinite(features).all()  # tiny_cpu: 8 px patches, width 128


def test_report_of_the_run_opens_in_a_browser(local_run, tmp_path):
    from browser import open_page

    from pipeline.report import write_report

    run_dir, _ = local_run
    out = write_report(str(run_dir), str(tmp_path / "report.html"))
    page = Path(out).read_text()
    assert all(f"<figcaption>step {s}</figcaption>" in page for s in (4, 8)) and "val_loss at step 8" in page
    seen = open_page(Path(out))
    assert not seen["errors"], seen["errors"]
    # the latest reconstructions, the curves, the pictures at steps 4 and 8: all decoded
    assert len(seen["images"]) == 4 and all(w > 0 for _, _, w in seen["images"]), seen["images"]


def test_killed_run_on_s3_resumes_exactly(s3_endpoint, tmp_path, data, local_run):
    """Killed while step-6 is uploading in the background (through a 10 MB/s link): step-4 is
    the resume point, the partial step-6 goes, and the rerun matches the uninterrupted run."""
    import boto3

    from pipeline.benchmarks.checkpoint import start_proxy

    run_dir = f"s3://mfm-test/runs/killed-{time.time_ns()}"
    prefix = run_dir.removeprefix("s3://mfm-test/")
    args = _overrides(data, run_dir)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint.url)

    def keys() -> set[str]:
        found = s3.list_objects_v2(Bucket="mfm-test", Prefix=prefix + "/").get("Contents", [])
        return {o["Key"][len(prefix) + 1 :] for o in found}

    slow = _env(tmp_path / "machine-a")
    slow["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{start_proxy(s3_endpoint.port, 10e6)}"
    first = _pretrain(args, slow, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            now = keys()
            if "step-4/COMPLETE" in now and any(k.startswith("step-6/") for k in now):
                break
            time.sleep(0.1)
        assert first.poll() is None, "the run ended before it could be killed:\n" + first.communicate()[0][-3000:]
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        out = first.communicate(timeout=30)[0]
    now = keys()
    assert "step-4/COMPLETE" in now and "step-6/COMPLETE" not in now and "export/config.json" not in now, out[-3000:]
    assert any(k.startswith("step-6/") for k in now)  # killed mid-upload: a partial folder
    assert "written locally, completing in the background" in out

    # A restart on another machine (empty staging folder) resumes from S3 by itself.
    out = _finish(_pretrain(args, _env(tmp_path / "machine-b")))
    assert "resuming at step 4" in out and f"removing incomplete checkpoint {run_dir}/step-6" in out
    body = s3.get_object(Bucket="mfm-test", Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    resumed = _losses(body)
    uninterrupted = _losses((local_run[0] / "metrics.jsonl").read_text())
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), (step, resumed, uninterrupted)
    final = keys()
    assert {k.split("/")[0] for k in final if k.startswith("step-")} == {"step-6", "step-8"}
    assert {"export/model.safetensors", "export/config.json", "pictures/step-8.png", "config.yaml"} <= final
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in final)
    assert not any(k.startswith(".uploads/") for k in final)
    assert not list((tmp_path / "machine-b").glob("mfm-run-*")), "a finished run leaves its staging mirror"


def test_fresh_run_on_s3_ignores_a_stale_staging_mirror(s3_endpoint, tmp_path, data):
    # What a finished (or abandoned) earlier run at the same URL left on this machine: the new
    # run must neither upload these rows and events nor keep the mirror once it is done.
    import boto3

    from pipeline.config import StorageConfig
    from pipeline.training.checkpoint import run_folder

    run_dir = f"s3://mfm-test/runs/fresh-{time.time_ns()}"
    staging = tmp_path / "staging"
    os.environ["MFM_STAGING_DIR"] = str(staging)
    try:
        mirror = run_folder(run_dir, StorageConfig()).local
    finally:
        del os.environ["MFM_STAGING_DIR"]
    (mirror / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    (mirror / "tensorboard").mkdir()
    (mirror / "tensorboard" / "events.out.tfevents.stale").write_bytes(b"old run")
    args = _overrides(data, run_dir, **{"train.nprocs": 1, "train.max_steps": 2, "train.checkpoint_every": 2})
    _finish(_pretrain(args, _env(staging)))
    prefix = run_dir.removeprefix("s3://mfm-test/")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint.url)
    body = s3.get_object(Bucket="mfm-test", Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    assert [r["step"] for r in map(json.loads, body.splitlines()) if "loss" in r] == [1, 2]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="mfm-test", Prefix=prefix)["Contents"]}
    assert not any(k.endswith("events.out.tfevents.stale") for k in keys)
    assert not mirror.exists()
    from pipeline.report import write_report

    report = write_report(run_dir)  # beside the run, on S3
    assert report == f"{run_dir}/report.html"
    page = s3.get_object(Bucket="mfm-test", Key=f"{prefix}/report.html")["Body"].read().decode()
    assert "val_loss at step 2" in page and "data:image/png;base64," in page


def test_a_tampered_step_file_is_refused_before_it_is_unpickled(tmp_path, data, local_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(local_run[0], run_dir)
    optim = run_dir / "step-8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    body = bytearray(optim.read_bytes())
    body[len(body) // 2] ^= 0x01
    optim.write_bytes(bytes(body))
    proc = _pretrain(_overrides(data, str(run_dir)), _env(tmp_path / "staging"))
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 4, out[-4000:]
    assert f"{optim}: sha256" in out and "refusing it" in out and "Traceback" not in out
    assert "was refused" in out and "rerun the same command" not in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=20", "data.batch_size (20) must be divisible by world size (2) x train.grad_accum (3) = 6"),
        ("model.name=no_such_model_xyz", "model.name='no_such_model_xyz' is not a timm model"),
        ("data.train=/nonexistent/shards/train", "data.train='/nonexistent/shards/train': no manifest.json"),
        ("train.loader=no_such_module:build", "train.loader='no_such_module:build': No module named 'no_such_module'"),
    ],
)
def test_bad_config_is_refused_before_any_process_starts(tmp_path, data, override, message, capsys, monkeypatch):
    data = f"{data}/train"
    from pipeline.cli import main
    from pipeline.training import launcher

    def no_launch(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launcher, "spawn_local", no_launch)
    monkeypatch.setattr(launcher.subprocess, "call", no_launch)

    run_dir = tmp_path / "run"
    args = [
        "pretrain",
        "--config",
        "tiny_cpu",
        "--set",
        "train.nprocs=2",
        "--set",
        "train.grad_accum=3",
        "--set",
        "data.batch_size=24",
        "--set",
        f"data.train={data}",
        "--set",
        f"train.run_dir={run_dir}",
        "--set",
        override,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("val", [None, "missing"])
def test_a_missing_val_split_is_warned_about(tmp_path, data, val, caplog):
    from pipeline.config import load_config
    from pipeline.training.launcher import validate

    overrides = [f"data.train={data}/train"] + ([f"data.val={tmp_path}/val"] if val else [])
    cfg = load_config("tiny_cpu", overrides)
    assert load_config("tiny_cpu").data.val is None  # a preset never points at someone's data
    with caplog.at_level("WARNING"):
        validate(cfg, 1)
    expected = f"data.val='{tmp_path}/val': no manifest.json there" if val else "data.val is not set"
    assert any(expected in r.getMessage() and "no val_loss" in r.getMessage() for r in caplog.records)
    caplog.clear()
    validate(load_config("tiny_cpu", [f"data.train={data}/train", f"data.val={data}/val"]), 1)
    assert not [r for r in caplog.records if "data.val" in r.getMessage()]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data):
    run_dir = tmp_path / "run"
    # An absurd lr: AdamW moves every weight by ~lr in step 1, so step 2's loss overflows.
    args = _overrides(
        data,
        str(run_dir),
        **{
            "train.nprocs": 1,
            "data.batch_size": 8,
            "train.checkpoint_every": 1,
            "optim.base_lr": 1e30,
            "train.max_steps": 4,
        },
    )
    proc = _pretrain(args, _env(tmp_path / "staging"))
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 3, out[-4000:]
    assert "non-finite loss" in out and "at step 2" in out and f"Last good checkpoint: {run_dir}/step-1" in out
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-1"]
    assert (run_dir / "step-1" / "COMPLETE").exists() and not (run_dir / "export").exists()


def test_val_batch_is_corrupted_from_pixels_like_training_batches(data):
    # The eval loader yields normalised images; corrupting those again (as a bug once did) gives a
    # target that is normalised twice, far off the training distribution.
    from pipeline.config import load_config
    from pipeline.corruptions import denormalize
    from pipeline.data import build_eval_loader
    from pipeline.training.trainer import Ranks, _pretrain_val_batch

    cfg = load_config("tiny_cpu", [f"data.train={data}/train", f"data.val={data}/val"])
    batch = _pretrain_val_batch(cfg, Ranks(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), 8)
    pixels = denormalize(batch.target)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    images, _ = next(iter(build_eval_loader(cfg, cfg.data.val, rank=0, world_size=1, batch_size=8, device="cpu")))
    assert torch.allclose(batch.target, images, atol=1e-5)  # the target is the eval view itself
    assert batch.keep is not None and not torch.allclose(batch.encoder_input, batch.target)


def test_pretrain_flow_speed_artifact_reads_the_runs_metrics(local_run):
    from flows.pretrain import _speed_markdown
    from pipeline.config import StorageConfig

    run_dir, _ = local_run
    md = _speed_markdown(str(run_dir), StorageConfig())
    assert md.startswith(f"# Training speed at step {STEPS}")
    assert "matmul utilization" in md and "measured: fp32 matmul" in md and "| n/a |" in md  # no MFU on a CPU
    assert _speed_markdown(str(run_dir / "nowhere"), StorageConfig()) is None


def _kill_when(proc: subprocess.Popen, run_dir: Path, complete: int, logged: int) -> str:
    """SIGKILL the run once step-`complete` is complete and step `logged` is logged; its output."""
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            done = (run_dir / f"step-{complete}" / "COMPLETE").exists()
            if done and metrics.exists() and max(_losses(metrics.read_text()), default=0) >= logged:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        out = proc.communicate(timeout=30)[0]
    return out


def _logged_losses(out: str) -> dict[int, float]:
    import re

    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+)/\d+ loss ([0-9.]+)", out)}


@pytest.mark.parametrize("zero, worlds", [(1, (2, 3, 1)), (3, (2, 1, 3))])
def test_killed_run_resumes_on_other_world_sizes(tmp_path, data, zero, worlds):
    """2 ranks, killed after step-2 -> resumed on M ranks, killed after step-4 -> finished on K
    ranks. Global batch 12 on every layout (80 samples: 6 steps per epoch, the second layout
    change inside epoch 0)."""
    run_dir = tmp_path / "run"
    env = _env(tmp_path / "staging")
    env["MFM_SEEN_DIR"] = str(tmp_path / "seen")
    extra = {
        "train.zero_stage": zero,
        "data.batch_size": 12,
        "train.loader": "seen_loader:build",
        "train.keep_last": 10,
        "train.picture_every": 100,
    }
    outs = []
    for nprocs, kill in zip(worlds, (2, 4, None)):
        proc = _pretrain(
            _overrides(data, str(run_dir), **extra, **{"train.nprocs": nprocs}), env, start_new_session=True
        )
        outs.append(_kill_when(proc, run_dir, kill, kill + 1) if kill else _finish(proc))
    assert f"saved by {worlds[0]} ranks, resuming on {worlds[1]}" in outs[1] and "resuming at step 2" in outs[1]
    assert f"saved by {worlds[1]} ranks, resuming on {worlds[2]}" in outs[2] and "resuming at step 4" in outs[2]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The step counter and the lr schedule continue: every lr is the schedule's at its step.
    from pipeline.config import load_config
    from pipeline.training.optim import build_optimizer, build_scheduler, scaled_lrs

    cfg = load_config("tiny_cpu", ["optim.base_lr=1.5e-2", "optim.warmup_epochs=0"])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, scaled_lrs(cfg.optim, 12).lr)
    sched = build_scheduler(opt, cfg.optim, scaled_lrs(cfg.optim, 12), 6)
    for r in rows:
        sched.step_update(r["step"])
        assert r["lr"] == pytest.approx(opt.param_groups[-1]["lr"], rel=1e-9), r
    # Loss: steps up to the first checkpoint are the 2-rank run's own. After a switch the loss
    # cannot match step by step: the remaining samples are dealt anew, and a single 12-image
    # batch reaches 4x the typical loss (2.28 and 1.99 seen, the same on every rank's weights).
    # So the check is that learning goes on from where it was: the median over the 4 steps
    # after the second switch stays below the mean of the first 2 steps.
    two_ranks = _logged_losses(outs[0])
    losses = _losses((run_dir / "metrics.jsonl").read_text())
    assert [losses[1], losses[2]] == pytest.approx([two_ranks[1], two_ranks[2]], abs=6e-5)  # logged to 4 places
    assert all(math.isfinite(v) for v in losses.values())
    assert statistics.median(losses[s] for s in (5, 6, 7, 8)) < (losses[1] + losses[2]) / 2, losses

    # Every sample of the interrupted epoch 0 seen once: the batches the kept checkpoints count,
    # as the loaders really yielded them.
    segments = torch.load(run_dir / "step-6" / "client-rank0.pt", weights_only=True)["loader"]["segments"]
    assert [s["world_size"] for s in segments] == list(worlds) and [s["batches"] for s in segments] == [2, 2, 2]
    batches = {}
    for file in (tmp_path / "seen").glob("*.jsonl"):
        rank = int(file.stem.rsplit("rank", 1)[1])
        for row in map(json.loads, file.read_text().splitlines()):
            if row["epoch"] != 0:
                continue
            i = len(row["earlier"])
            seg = segments[i]
            earlier = [
                [{k: s[k] for k in ("world_size", "micro_batch", "workers")}, s["batches"]] for s in segments[:i]
            ]
            if (
                row["earlier"] == earlier
                and row["layout"]["world_size"] == seg["world_size"]
                and row["index"] < seg["batches"]
            ):
                assert (
                    batches.setdefault((i, rank, row["index"]), row["ids"]) == row["ids"]
                )  # a redone batch is the same
    ids = [i for b in batches.values() for i in b]
    assert len(ids) == 72 and len(set(ids)) == 72 and all(0 <= i < 80 for i in ids)
