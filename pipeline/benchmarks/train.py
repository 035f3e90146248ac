"""`mfm bench train`: training images/s, TFLOP/s and MFU of the trainer's step.

CPU (default): the tiny preset, N ranks (gloo), the same model, optimiser, clipping and
in-memory batches for every contender: plain PyTorch DDP, ZeRO-1, ZeRO-2 and ZeRO-2 with
train.compile; the contenders take turns in rounds inside one process group so that a busy
machine slows them alike. Reported: median images/s over rounds and the ratios to DDP (goal:
ZeRO within 10%) and to eager ZeRO-2.
Beside them, host reads per ordinary step (tensor values read into Python: on a GPU each is
a host sync), and the same count for ZeRO 0-3 x fp32/bf16 engines as the trainer builds them.
--gpu: a preset (ViT-B/16 MFM at 224 px by default), one rank per GPU, bf16, eager and
compiled x ZeRO stages x micro batches: images/s per GPU, TFLOP/s, MFU (datasheet dense bf16
peak), matmul utilization (measured bf16 matmul peak), peak memory, host reads and host syncs
per step; --real-data SPLIT adds the fastest configuration fed by the real loader, with the
share of time spent waiting for it. --summary FILE prints a gpu-checks summary.json as the
README's GPU table.
FLOPs per image are counted by torch (pipeline.training.flops), never by formula.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODULE = "pipeline.benchmarks.train"


def _batches(cfg, micro_batch: int, count: int, device, seed: int):
    import torch
    import torch.nn.functional as F

    from pipeline.corruptions import corrupt

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        coarse = torch.rand(micro_batch, 3, 8, 8, generator=g)
        images = F.interpolate(coarse, size=cfg.model.img_size, mode="bicubic", align_corners=False).clamp(0, 1)
        out.append(tuple(t.to(device) if t is not None else None for t in corrupt(images, cfg.corruption, g)))
    return out


class DDPContender:
    """The baseline: torch DDP, the same AdamW groups, clip_grad_norm_ and schedule-free lr."""

    def __init__(self, cfg, lr, device):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        from pipeline.models import build_model
        from pipeline.training.optim import build_optimizer

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, cfg.corruption).to(device)
        self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = build_optimizer(model, cfg.optim, lr)
        self.clip = cfg.optim.clip_grad

    def step(self, batch):
        import torch

        loss, _ = self.model(*batch)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class ZeroContender:
    """The trainer's own pieces: speed.prepare_model (channels_last, train.compile), the fused
    AdamW groups, the DeepSpeed config."""

    def __init__(self, cfg, plan, lr, device, stage: int, precision: str, compiled: bool = False):
        import torch

        from pipeline.models import build_model
        from pipeline.training import speed
        from pipeline.training.optim import build_optimizer
        from pipeline.training.trainer import initialize

        torch.manual_seed(cfg.train.seed)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"zero_stage": stage, "compile": compiled})})
        model = build_model(cfg.model, cfg.corruption).to(device)
        self.compiled = speed.prepare_model(model, cfg, device)
        self.engine, self.clip = initialize(model, build_optimizer(model, cfg.optim, lr), cfg, plan, precision)
        self.grad_norm = None

    def step(self, batch):
        from pipeline.training import speed
        from pipeline.training.trainer import compute_dtype, optimizer_step

        encoder_input, *rest = batch
        with speed.compile_errors(self.compiled):
            loss, _ = self.engine(encoder_input.to(compute_dtype(self.engine)), *rest)
            self.engine.backward(loss)
        self.grad_norm = optimizer_step(self.engine, self.clip, boundary=True)
        return loss


def _timed(contender, batches, steps: int, device) -> float:
    """Seconds for `steps` steps, between barriers so that every rank's work is counted."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        loss = contender.step(batches[i % len(batches)])
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def host_reads_per_step(contender, batches, steps: int = 2) -> tuple[float, dict[str, int]]:
    """Reads of tensor values into Python per ordinary step, the trainer's and DeepSpeed's
    (speed.HostReads, the CPU proxy of a GPU's host syncs), and where they are made."""
    from pipeline.training.speed import HostReads

    with HostReads() as reads:
        for i in range(steps):
            contender.step(batches[i % len(batches)])
    return reads.total / steps, dict(reads.sites)


def host_reads_grid(cfg, plan, lr, device, batches) -> list[dict]:
    """ZeRO 0-3 x fp32/bf16 (the GPU's precision, which DeepSpeed's CPU accelerator also runs),
    each engine as the trainer builds it: host reads per ordinary step after one warm-up step."""
    rows = []
    for precision in ("fp32", "bf16"):
        for stage in (0, 1, 2, 3):
            contender = ZeroContender(cfg, plan, lr, device, stage, precision)
            contender.step(batches[0])
            per_step, sites = host_reads_per_step(contender, batches)
            rows.append({"zero_stage": stage, "precision": precision, "host_reads_per_step": per_step, "sites": sites})
            del contender
    return rows


def _flops_per_image(cfg) -> float:
    """FLOPs of forward + loss + backward per image, counted by torch on the meta device."""
    import torch

    from pipeline.data import Batch
    from pipeline.models import build_model
    from pipeline.training.flops import count_step_flops, meta_copy
    from pipeline.training.trainer import _pretrain_forward

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.corruption)
    size = cfg.model.img_size
    images = torch.empty(2, 3, size, size)
    return count_step_flops(meta_copy(model), Batch(images, images, torch.empty(2, size, size)), _pretrain_forward) / 2


def worker(args) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.training.flops import Speed, measure_peak
    from pipeline.training.optim import batch_plan, scaled_lrs
    from pipeline.training.trainer import init_distributed

    ranks = init_distributed()
    if args.gpu:
        cfg = load_config(args.preset, [f"data.batch_size={args.micro_batches[0] * ranks.world_size}"])
        if ranks.device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:  # --device cpu: a dry run of the matrix
            precision = "fp32"
    else:
        cfg = load_config(
            "tiny_cpu", [f"data.batch_size={args.micro_batch * ranks.world_size}"] if args.micro_batch else []
        )
        precision = "fp32"
    plan = batch_plan(cfg, ranks.world_size)
    lr = scaled_lrs(cfg.optim, plan.global_batch).lr
    result = {
        "world_size": ranks.world_size,
        "micro_batch": plan.micro_batch,
        "global_batch": plan.global_batch,
        "model": cfg.model.name,
        "img_size": cfg.model.img_size,
        "precision": precision,
        "device": torch.cuda.get_device_name() if ranks.device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "rows": [],
    }
    if args.gpu:
        from pipeline.benchmarks.train_gpu import gpu_matrix

        gpu_matrix(args, cfg, ranks, precision, result)
        return result
    batches = _batches(cfg, plan.micro_batch, 4, ranks.device, seed=ranks.rank)
    speed = Speed.of(_flops_per_image(cfg), measure_peak(ranks.device), ranks.device)
    result["speed"] = speed.row()
    contenders = {
        "ddp": DDPContender(cfg, lr, ranks.device),
        "zero-1": ZeroContender(cfg, plan, lr, ranks.device, 1, precision),
        "zero-2": ZeroContender(cfg, plan, lr, ranks.device, 2, precision),
    }
    if args.compile != "off":
        contenders["zero-2 compiled"] = ZeroContender(cfg, plan, lr, ranks.device, 2, precision, compiled=True)
    for c in contenders.values():
        _timed(c, batches, args.warmup, ranks.device)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, c in contenders.items():
            rates[name].append(plan.global_batch * args.steps / _timed(c, batches, args.steps, ranks.device))
    base = statistics.median(rates["ddp"])
    for name, r in rates.items():
        result["rows"].append(
            {
                "name": name,
                "images_per_s": statistics.median(r),
                "rounds": r,
                "ratio_to_ddp": statistics.median(r) / base,
                "ratio_to_zero2": statistics.median(r) / statistics.median(rates["zero-2"]),
                "host_reads_per_step": host_reads_per_step(contenders[name], batches)[0],
                **speed.figures(statistics.median(r) / ranks.world_size),
            }
        )
    del contenders
    if args.host_reads:
        result["host_reads"] = host_reads_grid(cfg, plan, lr, ranks.device, batches)
    return result


def print_table(result: dict) -> None:
    print(
        f"model {result['model']} @ {result['img_size']} px, {result['world_size']} ranks, "
        f"{result['precision']}, {result['device']}"
    )
    speed = result.get("speed")
    if speed:
        print(
            f"{speed['flops_per_image'] / 1e9:.2f} GFLOP per image (forward + backward, FlopCounterMode); "
            f"peak {speed['peak_tflops']:.3g} TFLOP/s ({speed['peak_source']}), "
            f"datasheet {speed['datasheet_tflops'] or 'unknown'}"
        )
    print(
        "MFU: against the datasheet's dense bf16 peak (none on a CPU or an unknown GPU); matmul util.: against "
        "the measured matmul peak. host reads: tensor values read into Python per ordinary step (CPU proxy); "
        "host syncs: torch's CUDA sync debug mode"
    )

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    def num(x):
        return "-" if x is None else f"{x:g}"

    if result["rows"] and "ratio_to_ddp" in result["rows"][0]:
        print(f"micro batch {result['micro_batch']}, global batch {result['global_batch']}")
        print(
            f"{'contender':<16} {'images/s':>10} {'vs DDP':>8} {'vs ZeRO-2':>9} {'TFLOP/s':>8} {'MFU':>6} "
            f"{'matmul util.':>12} {'host reads':>10}   rounds"
        )
        for r in result["rows"]:
            rounds = " ".join(f"{x:.1f}" for x in r["rounds"])
            print(
                f"{r['name']:<16} {r['images_per_s']:>10.1f} {r['ratio_to_ddp']:>7.2f}x {r['ratio_to_zero2']:>8.2f}x "
                f"{r['tflops']:>8.3f} {pct(r['mfu']):>6} {pct(r['matmul_utilization']):>12} "
                f"{num(r.get('host_reads_per_step')):>10}   {rounds}"
            )
        if result.get("host_reads"):
            print("host reads per ordinary step, engines as the trainer builds them (where: file:line x count)")
            for r in result["host_reads"]:
                where = ", ".join(f"{k.split('site-packages/')[-1]} x{v}" for k, v in r["sites"].items())
                print(f"  zero-{r['zero_stage']} {r['precision']:<5} {r['host_reads_per_step']:>6g}  {where}")
        return
    print("per GPU")
    print(
        f"{'configuration':<30} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'matmul util.':>12} {'peak GiB':>9} "
        f"{'host reads':>10} {'host syncs':>10}  notes"
    )
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['name']:<30} {r['error']}")
            continue
        notes = f"loader wait {r['loader_wait_share']:.0%}" if "loader_wait_share" in r else ""
        if "warmup_s" in r:
            notes = f"warm-up {r['warmup_s']:.0f} s"
        print(
            f"{r['name']:<30} {r['images_per_s_per_gpu']:>9.1f} {r['tflops']:>8.1f} {pct(r['mfu']):>6} "
            f"{pct(r['matmul_utilization']):>12} {r['peak_memory_gib']:>9.2f} "
            f"{num(r.get('host_reads_per_step')):>10} {num(r.get('host_syncs_per_step')):>10}  {notes}"
        )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nprocs", type=int, help="ranks (default: 2 on CPU, every GPU with --gpu)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="CPU: turns each contender takes")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiling happens here)")
    p.add_argument("--micro-batch", type=int, help="CPU: per rank (default: the preset's batch / ranks)")
    p.add_argument("--compile", choices=("both", "on", "off"), default="both", help="eager, compiled or both")
    p.add_argument("--gpu", action="store_true", help="the GPU matrix (below) on every GPU, bf16")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="--gpu: cpu runs the matrix on CPU ranks (dry run)"
    )
    p.add_argument("--preset", default="vit_b16_mfm", help="--gpu: the model's preset")
    p.add_argument("--stages", type=_ints, default=[0, 1, 2], help="--gpu: ZeRO stages (default 0,1,2)")
    p.add_argument("--micro-batches", type=_ints, default=[64, 128, 256], help="--gpu: per GPU (default 64,128,256)")
    p.add_argument("--real-data", metavar="SPLIT", help="--gpu: also the fastest configuration fed by this split")
    p.add_argument("--workers", type=int, default=8, help="--real-data: loader workers per rank")
    p.add_argument(
        "--host-reads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: also count host reads per step for ZeRO 0-3 x fp32/bf16 (default on)",
    )
    p.add_argument("--json", help="also write the result here (kept current row by row with --gpu)")
    args = p.parse_args(argv)
    from pipeline.training.launcher import spawn_local

    env = None
    if args.gpu and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("mfm bench train: --gpu needs CUDA, and none is present (--device cpu: a dry run)", file=sys.stderr)
            return 2
        nprocs = args.nprocs or torch.cuda.device_count()
    elif args.gpu:
        import torch

        nprocs = args.nprocs or 1
        env = {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.is_available() else None
    else:
        nprocs = args.nprocs or 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.json or Path(tmp) / "result.json")
        worker_args = ["--worker", "--out", str(out)]
        for key in ("steps", "rounds", "warmup", "micro_batch", "compile", "preset", "real_data", "workers"):
            value = getattr(args, key)
            if value is not None:
                worker_args += [f"--{key.replace('_', '-')}", str(value)]
        worker_args += ["--stages", ",".join(map(str, args.stages))]
        worker_args += ["--micro-batches", ",".join(map(str, args.micro_batches))]
        if args.gpu:
            worker_args.append("--gpu")
        if args.host_reads:
            worker_args.append("--host-reads")
        code = spawn_local(MODULE, worker_args, nprocs, env=env)
        if code:
            print(f"mfm bench train: a rank failed with exit code {code}", file=sys.stderr)
            return code
        result = json.loads(out.read_text())
    print_table(result)
    return 0


def _worker_main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--compile", default="both")
    p.add_argument("--preset")
    p.add_argument("--stages", type=_ints)
    p.add_argument("--micro-batches", type=_ints)
    p.add_argument("--real-data")
    p.add_argument("--workers", type=int)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--host-reads", action="store_true")
    args = p.parse_args()
    import torch.distributed as dist

    result = worker(args)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
