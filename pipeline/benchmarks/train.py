"""`mfm bench train`: training images/s under DeepSpeed ZeRO against plain PyTorch DDP.

CPU (default): the tiny preset, N ranks (gloo), the same model, optimiser, clipping and
in-memory batches for every contender; the contenders take turns in rounds inside one process
group so that a busy machine slows them alike. Reported: median images/s over rounds and the
ratio to DDP (goal: ZeRO within 10%).
--gpu: ViT-B/16 MFM at 224 px, one rank per GPU, bf16, ZeRO stages 0-3: images/s per GPU and
peak memory.
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
    def __init__(self, cfg, plan, lr, device, stage: int, precision: str):
        import deepspeed
        import torch

        from pipeline.models import build_model
        from pipeline.training.optim import build_optimizer
        from pipeline.training.trainer import deepspeed_config

        torch.manual_seed(cfg.train.seed)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"zero_stage": stage})})
        model = build_model(cfg.model, cfg.corruption).to(device)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg.optim, lr), config=deepspeed_config(cfg, plan, precision)
        )

    def step(self, batch):
        from pipeline.training.trainer import compute_dtype

        encoder_input, *rest = batch
        loss, _ = self.engine(encoder_input.to(compute_dtype(self.engine)), *rest)
        self.engine.backward(loss)
        self.engine.step()
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


def worker(args) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.training.optim import batch_plan, scaled_lrs
    from pipeline.training.trainer import init_distributed

    ranks = init_distributed()
    if args.gpu:
        cfg = load_config("vit_b16_mfm", [f"data.batch_size={args.micro_batch * ranks.world_size}"])
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        cfg = load_config(
            "tiny_cpu", [f"data.batch_size={args.micro_batch * ranks.world_size}"] if args.micro_batch else []
        )
        precision = "fp32"
    plan = batch_plan(cfg, ranks.world_size)
    lr = scaled_lrs(cfg.optim, plan.global_batch).lr
    batches = _batches(cfg, plan.micro_batch, 4, ranks.device, seed=ranks.rank)
    result = {
        "world_size": ranks.world_size,
        "micro_batch": plan.micro_batch,
        "global_batch": plan.global_batch,
        "model": cfg.model.name,
        "img_size": cfg.model.img_size,
        "precision": precision,
        "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{os.cpu_count()}",
        "rows": [],
    }
    if args.gpu:
        for stage in (0, 1, 2, 3):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            contender = ZeroContender(cfg, plan, lr, ranks.device, stage, precision)
            _timed(contender, batches, args.warmup, ranks.device)
            seconds = _timed(contender, batches, args.steps, ranks.device)
            result["rows"].append(
                {
                    "name": f"zero-{stage}",
                    "images_per_s_per_gpu": plan.micro_batch * args.steps / seconds,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
            del contender
        return result
    contenders = {
        "ddp": DDPContender(cfg, lr, ranks.device),
        "zero-1": ZeroContender(cfg, plan, lr, ranks.device, 1, precision),
        "zero-2": ZeroContender(cfg, plan, lr, ranks.device, 2, precision),
    }
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
            }
        )
    return result


def print_table(result: dict) -> None:
    print(
        f"model {result['model']} @ {result['img_size']} px, {result['world_size']} ranks, micro batch "
        f"{result['micro_batch']}, global batch {result['global_batch']}, {result['precision']}, {result['device']}"
    )
    if "ratio_to_ddp" in result["rows"][0]:
        print(f"{'contender':<10} {'images/s':>10} {'vs DDP':>8}   rounds")
        for r in result["rows"]:
            rounds = " ".join(f"{x:.1f}" for x in r["rounds"])
            print(f"{r['name']:<10} {r['images_per_s']:>10.1f} {r['ratio_to_ddp']:>7.2f}x   {rounds}")
    else:
        print(f"{'stage':<8} {'images/s/GPU':>13} {'peak GiB':>9}")
        for r in result["rows"]:
            print(f"{r['name']:<8} {r['images_per_s_per_gpu']:>13.1f} {r['peak_memory_gib']:>9.2f}")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nprocs", type=int, help="ranks (default: 2 on CPU, every GPU with --gpu)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="CPU: turns each contender takes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, help="per rank (default: the preset's batch / ranks; 64 with --gpu)")
    p.add_argument("--gpu", action="store_true", help="ViT-B/16 on every GPU, ZeRO stages 0-3")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    from pipeline.training.launcher import spawn_local

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("mfm bench train: --gpu needs CUDA, and none is present", file=sys.stderr)
            return 2
        nprocs = args.nprocs or torch.cuda.device_count()
        args.micro_batch = args.micro_batch or 64
    else:
        nprocs = args.nprocs or 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker_args = [
            "--worker",
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
            "--warmup",
            str(args.warmup),
        ]
        if args.micro_batch:
            worker_args += ["--micro-batch", str(args.micro_batch)]
        if args.gpu:
            worker_args.append("--gpu")
        code = spawn_local(MODULE, worker_args, nprocs)
        if code:
            print(f"mfm bench train: a rank failed with exit code {code}", file=sys.stderr)
            return code
        result = json.loads(out.read_text())
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _worker_main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    import torch.distributed as dist

    result = worker(args)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
