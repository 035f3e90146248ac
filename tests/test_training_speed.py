"""The fast training step on the CPU: no host sync or collective on ordinary steps, MFU fields in
a real run's metrics, FLOPs counted by torch on the real model and loss, and torch.compile
training like eager.

The runs are real trainers (DeepSpeed ZeRO-2, the real loader on sample shards) in this
process as a single gloo rank, so that calls can be counted by patching torch."""

from __future__ import annotations

import json
import math
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
# The loop's code. Not pipeline/data: the loader's bookkeeping (sample ids, seeds) is made on
# the host by its workers, so reading it syncs with no device.
OURS = tuple(str(REPO / p) for p in ("pipeline/training", "pipeline/models.py", "pipeline/corruptions.py", "kernels"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from pipeline import sample_data
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("data")
    sample = sample_data.build(str(root / "sample"), per_class=4, size=32)
    shard_dataset(sample["folder"], str(root / "shards"), shard_size_mb=1)
    return str(root / "shards")


@pytest.fixture(scope="module")
def ranks():
    """One gloo rank in this process."""
    from pipeline.training.trainer import init_distributed

    mp = pytest.MonkeyPatch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        mp.setenv(k, v)
    mp.setenv("MASTER_PORT", str(port))
    yield init_distributed()
    dist.destroy_process_group()
    mp.undo()


def _cfg(shards: str, run_dir: Path, **extra):
    from pipeline.config import load_config

    values = {
        "data.train": f"{shards}/train",
        "data.val": f"{shards}/val",
        "train.run_dir": str(run_dir),
        "data.backend": "torch",
        "data.workers": 0,
        "data.batch_size": 8,
        "train.checkpoint_every": 1000,
        "train.picture_every": 1000,
        "optim.warmup_epochs": 0,
        "model.timm_kwargs": {"depth": 2},  # the tiny preset, two blocks: cheap to compile
        **extra,
    }
    return load_config("tiny_cpu", [f"{k}={json.dumps(v)}" for k, v in values.items()])


def _fit(cfg, ranks) -> dict:
    from pipeline.training.trainer import build_trainer

    trainer = build_trainer(cfg, ranks)
    try:
        trainer.fit()
    finally:
        trainer.writer.close()
    return trainer


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SYNCS = {  # what reads a tensor to the host, and the collectives
    (torch.Tensor, "item"),
    (torch.Tensor, "tolist"),
    (torch.Tensor, "cpu"),
    (torch.Tensor, "numpy"),
    (torch.Tensor, "__float__"),
    (torch.Tensor, "__int__"),
    (torch.Tensor, "__bool__"),
    (dist, "all_reduce"),
    (dist, "all_gather"),
    (dist, "broadcast"),
    (dist, "reduce_scatter"),
    (dist, "barrier"),
}


def test_ordinary_steps_neither_sync_nor_reduce_and_mfu_is_logged(shards, ranks, tmp_path, monkeypatch):
    from pipeline.training import trainer as trainer_mod

    run_dir = tmp_path / "run"
    # 6 steps of 2 micro batches; steps 3 and 6 log (6 also checkpoints), 1, 2, 4, 5 are ordinary.
    cfg = _cfg(
        shards,
        run_dir,
        # and a profile of step 6 (the window opens 5 steps after the start)
        **{
            "train.max_steps": 6,
            "train.log_every": 3,
            "train.grad_accum": 2,
            "data.batch_size": 4,
            "train.profile_steps": 1,
        },
    )
    current = [0]
    calls: Counter = Counter()
    where: Counter = Counter()

    def counting(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS):  # our loop, not DeepSpeed's own gradient reduction
                calls[current[0], name] += 1
                where[current[0], name, Path(caller).name, sys._getframe(1).f_lineno] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    real_step = trainer_mod.Trainer.train_step

    def step(self, batches):
        current[0] = self.step + 1
        return real_step(self, batches)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    for owner, name in SYNCS:
        counting(owner, name)
    _fit(cfg, ranks)
    monkeypatch.undo()

    by_step = {s: sum(n for (k, _), n in calls.items() if k == s) for s in range(1, 7)}
    assert by_step[1] == by_step[2] == by_step[4] == by_step[5] == 0, sorted(where.items())
    # the counting sees the reads that are there: one all_reduce and one read per log step
    for s in (3, 6):
        assert calls[s, "all_reduce"] >= 1 and calls[s, "tolist"] >= 1, calls

    rows = _rows(run_dir)
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6]
    speed = next(r for r in rows if "flops_per_image" in r)
    for r in logged:
        tflops = speed["flops_per_image"] * r["images_per_s"] / 1e12
        assert r["tflops"] == pytest.approx(tflops)
        assert r["matmul_utilization"] == pytest.approx(tflops / speed["peak_tflops"])
        assert r["mfu"] is None and r["peak_memory_gib"] > 0  # CPU: no datasheet figure
        assert r["grad_norm"] > 0
    assert speed["peak_source"].startswith("measured: fp32 matmul") and speed["peak_tflops"] > 0
    # tiny preset, 2 blocks, 64 tokens of 192: the count is within reach of the transformer's
    # 6 x params x tokens (+ attention); a sanity bound, the exact check is the ViT-B test below
    assert 50e6 < speed["flops_per_image"] < 500e6, speed
    assert (run_dir / "step-6" / "COMPLETE").exists()
    traces = list((run_dir / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"])


def test_vit_b16_flops_per_image_match_the_analytic_count():
    """3 x 17.6 GMAC x 2 (timm's forward MACs at 224 px; backward = 2 x forward), counted by
    FlopCounterMode on the real MFM model and frequency loss, built on the meta device."""
    from pipeline.config import load_config
    from pipeline.data import Batch
    from pipeline.models import build_model
    from pipeline.training.flops import count_step_flops, meta_copy
    from pipeline.training.trainer import _pretrain_forward

    cfg = load_config("vit_b16_mfm")
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.corruption)
    images = torch.empty(2, 3, 224, 224)
    batch = Batch(images, images, torch.empty(2, 224, 224))
    per_image = count_step_flops(meta_copy(model), batch, _pretrain_forward) / 2
    assert per_image == pytest.approx(3 * 17.6e9 * 2, rel=0.02)


def test_datasheet_table_matches_exact_names_and_memory():
    """MFU's peak: the exact device name and its memory pick the row (an NVL part is slower than
    the SXM one of the same chip), and anything unknown gets none rather than a neighbour's."""
    from pipeline.training.flops import datasheet

    def tflops(name, gib):
        row = datasheet(name, gib)
        return row and row.bf16_tflops

    assert tflops("NVIDIA H100 80GB HBM3", 79.6) == 989  # H100 SXM, 81559 MiB as torch reports it
    assert tflops("NVIDIA H200", 140.4) == 989  # H200 SXM, 143771 MiB
    assert tflops("NVIDIA H200 NVL", 140.4) == 835
    assert tflops("NVIDIA H100 PCIe", 79.2) == 756 and tflops("NVIDIA H100 NVL", 93.1) == 835
    assert tflops("NVIDIA A100-SXM4-80GB", 79.2) == 312 and tflops("NVIDIA A100-SXM4-40GB", 39.4) == 312
    assert tflops("NVIDIA L40S", 45.0) == 362 and tflops("NVIDIA L4", 22.5) == 121
    # the same name with another memory is another part; prefixes and unknown names are not guessed
    assert tflops("NVIDIA H200", 94.0) is None and tflops("NVIDIA H100 80GB HBM3", 94.0) is None
    assert tflops("NVIDIA H100", 79.6) is None and tflops("NVIDIA H200 NVL (new)", 140.4) is None
    assert tflops("Some New GPU", 80.0) is None
    assert "1,671 sparse" in datasheet("NVIDIA H200 NVL", 140.4).source


def test_mfu_is_against_the_datasheet_and_matmul_utilization_against_the_measured_peak():
    from pipeline.training.flops import Speed

    speed = Speed(1e9, 500.0, "measured", 989.0, "sheet", "NVIDIA H200", "cuda max allocated")
    got = speed.figures(100_000.0)  # 100 TFLOP/s
    assert got == {"tflops": 100.0, "mfu": pytest.approx(100 / 989), "matmul_utilization": 0.2}
    cpu = Speed(1e9, 0.5, "measured", None, None, "cpu", "process max RSS").figures(100.0)
    assert cpu["mfu"] is None and cpu["matmul_utilization"] == pytest.approx(0.2)


def test_compile_setting_resolves_and_refuses_zero3():
    from pipeline.config import ConfigError
    from pipeline.training.speed import resolve_compile

    assert resolve_compile("auto", cuda=True, zero_stage=2) is True
    assert resolve_compile("auto", cuda=False, zero_stage=2) is False
    assert resolve_compile("auto", cuda=True, zero_stage=3) is False
    assert resolve_compile(True, cuda=False, zero_stage=1) is True
    with pytest.raises(ConfigError, match="train.compile=true does not work with train.zero_stage=3"):
        resolve_compile(True, cuda=True, zero_stage=3)


def test_compile_with_zero3_is_refused_before_any_process_starts(shards, tmp_path, capsys, monkeypatch):
    from pipeline.cli import main
    from pipeline.training import launcher

    def no_launch(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launcher, "spawn_local", no_launch)
    sets = [
        f"data.train={shards}/train",
        f"train.run_dir={tmp_path / 'run'}",
        "train.zero_stage=3",
        "train.compile=true",
    ]
    assert main(["pretrain", "--config", "tiny_cpu", *[a for s in sets for a in ("--set", s)]]) == 2
    assert "train.compile=true does not work with train.zero_stage=3" in capsys.readouterr().err


def test_a_compile_failure_names_the_setting():
    from pipeline.training.speed import CompileError, compile_errors

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no code for this chip")

    fn = torch.compile(lambda x: x * 2 + 1, backend=broken_backend)
    with pytest.raises(
        CompileError, match=r"train\.compile: torch\.compile of the model failed.*no code for this chip"
    ):
        with compile_errors(True):
            fn(torch.ones(3))


def test_compiled_training_matches_eager(shards, ranks, tmp_path):
    """train.compile=true on the CPU (inductor, the frequency loss's torch path outside the
    graph): the same losses as eager over 4 steps, within 1e-5 relative (inductor's kernels
    reorder float32 sums; measured differences are ~2e-7)."""
    losses = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"run-{compiled}"
        # no val batch: its eval-mode forward would be a second graph to compile
        cfg = _cfg(
            shards,
            run_dir,
            **{"train.max_steps": 4, "train.log_every": 1, "train.compile": compiled, "data.val": None},
        )
        trainer = _fit(cfg, ranks)
        assert trainer.compiled is compiled
        losses[compiled] = [r["loss"] for r in _rows(run_dir) if "loss" in r]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-5), losses
    assert losses[False][0] != losses[False][-1]  # the weights moved


def test_gpu_bench_matrix_runs_its_rows_and_the_real_data_row(shards, ranks, tmp_path):
    """`mfm bench train --gpu`'s matrix, driven on the CPU at toy size: a row per configuration
    with images/s, TFLOP/s, MFU and memory, and the fastest fed by the real loader."""
    from types import SimpleNamespace

    from pipeline.benchmarks.train_gpu import gpu_matrix

    cfg = _cfg(shards, tmp_path / "unused", **{"data.batch_size": 8})
    args = SimpleNamespace(
        compile="off",
        micro_batches=[8],  # 40 training images: 5 batches an epoch, and the real-data row crosses one
        stages=[0, 2],
        steps=4,
        warmup=2,
        real_data=f"{shards}/train",
        workers=0,
        out=str(tmp_path / "bench.json"),
    )
    result = {"rows": []}
    gpu_matrix(args, cfg, ranks, "fp32", result)
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["eager zero-0 mb8", "eager zero-2 mb8"]
    for r in result["rows"]:
        assert r["images_per_s_per_gpu"] > 0 and r["tflops"] > 0 and r["matmul_utilization"] > 0
        assert r["peak_memory_gib"] > 0
    real = result["rows"][2]
    assert real["name"].endswith("real data") and 0 <= real["loader_wait_share"] <= 1
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("preset", ["vit_b16_mfm", "tiny_cpu"])
def test_the_presets_engines_read_nothing_on_ordinary_steps(shards, ranks, tmp_path, monkeypatch, preset):
    """The engine each pretraining preset builds (its ZeRO stage, precision and clipping; auto is
    bf16 on the GPUs it is for) on the tiny model: no tensor value is read into Python on an
    ordinary step, by the trainer or by DeepSpeed (speed.HostReads, the CPU proxy of a GPU's host
    syncs), and TensorBoard's file is flushed on log steps only."""
    from torch.utils.tensorboard import SummaryWriter

    from pipeline.config import load_config
    from pipeline.training import trainer as trainer_mod
    from pipeline.training.speed import HostReads

    preset_cfg = load_config(preset)
    precision = "bf16" if preset_cfg.train.precision == "auto" else preset_cfg.train.precision
    cfg = _cfg(
        shards,
        tmp_path / "run",
        **{
            "train.zero_stage": preset_cfg.train.zero_stage,
            "train.precision": precision,
            "optim.clip_grad": preset_cfg.optim.clip_grad,
            "train.max_steps": 4,
            "train.log_every": 2,
            "train.grad_accum": 2,
            "data.batch_size": 4,
            "data.val": None,
        },
    )
    reads, flushes, current = {}, Counter(), [0]
    real_step, real_flush = trainer_mod.Trainer.train_step, SummaryWriter.flush

    def step(self, batches):
        current[0] = self.step + 1
        with HostReads() as counted:
            out = real_step(self, batches)
        # not pipeline/data: the loader (in this process at data.workers=0) reads its own
        # bookkeeping, host tensors its workers make
        reads[self.step] = {k: n for k, n in counted.sites.items() if "/pipeline/data/" not in k}
        return out

    def flush(self):
        flushes[current[0]] += 1
        return real_flush(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    monkeypatch.setattr(SummaryWriter, "flush", flush)
    trainer = _fit(cfg, ranks)
    monkeypatch.undo()
    assert reads[1] == reads[3] == {}, reads
    # the count sees reads where they are: the meter's one read on each log step
    assert reads[2] and reads[4], reads
    assert flushes[1] == flushes[3] == 0 and flushes[2] >= 1, flushes
    assert trainer.clip is not None and trainer.clip.max_norm == preset_cfg.optim.clip_grad
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in _rows(tmp_path / "run") if "loss" in r)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_device_clipping_gives_deepspeeds_weights(ranks, stage):
    """The trainer's clipping (DeviceClip, no host read) against DeepSpeed's own at a clip that
    bites (0.05): the same weights after 3 steps, and the grad norm DeepSpeed reports (ZeRO-1/2)."""
    import deepspeed

    from pipeline.benchmarks.train import ZeroContender, _batches
    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.training.optim import batch_plan, build_optimizer
    from pipeline.training.trainer import deepspeed_config

    cfg = load_config("tiny_cpu", ["data.batch_size=4", "optim.clip_grad=0.05", 'model.timm_kwargs={"depth": 1}'])
    plan = batch_plan(cfg, 1)
    batches = _batches(cfg, 4, 3, ranks.device, seed=0)
    ours = ZeroContender(cfg, plan, 1e-3, ranks.device, stage, "fp32")
    assert ours.clip is not None
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.corruption)
    staged = cfg.model_copy(update={"train": cfg.train.model_copy(update={"zero_stage": stage})})
    ds_cfg = deepspeed_config(staged, plan, "fp32")
    ds_cfg["gradient_clipping"] = 0.05
    ds_cfg["zero_optimization"].pop("compute_grad_norm", None)
    theirs, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, 1e-3), config=ds_cfg)
    for batch in batches:
        ours.step(batch)
        loss, _ = theirs(*batch)
        theirs.backward(loss)
        theirs.step()
        if stage:  # DeepSpeed keeps no norm without ZeRO
            assert float(ours.grad_norm) == pytest.approx(float(theirs.get_global_grad_norm()), rel=1e-5)
        assert float(ours.grad_norm) > 0.05  # the clip bites
    for (name, a), b in zip(ours.engine.module.named_parameters(), theirs.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_runs_on_a_cpu_and_fp16_is_refused_there():
    from pipeline.config import ConfigError
    from pipeline.training.trainer import resolve_precision

    assert resolve_precision("bf16", cuda=False) == "bf16"
    assert resolve_precision("auto", cuda=False) == "fp32"
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        resolve_precision("fp16", cuda=False)
