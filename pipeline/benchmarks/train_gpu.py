"""`mfm bench train --gpu`: the matrix of eager / compiled x ZeRO stages x micro batches, one
row at a time, and the fastest configuration fed by the real loader (--real-data)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.benchmarks.train import ZeroContender, _batches, _flops_per_image, _timed, host_reads_per_step


def _timed_loader(contender, loader, steps: int, warmup: int, device) -> tuple[float, float]:
    """(seconds, seconds waiting for the loader) for `steps` steps fed by a real loader."""
    import torch
    import torch.distributed as dist

    def endless():
        while True:  # each pass over the loader yields the rest of one epoch
            yield from loader

    batches = endless()
    for _ in range(warmup):
        loss = contender.step(next(batches))
    loss.item()
    dist.barrier()
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        loss = contender.step(batch)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start, waited


def _syncs_per_step(contender, batches, device, steps: int = 2) -> float | None:
    """CUDA: host synchronisations per step, the trainer's and DeepSpeed's alike, counted by
    torch's sync debug mode (a warning per synchronising call)."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                contender.step(batches[i % len(batches)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def _emit(result: dict, row: dict, out: str | None) -> None:
    """Print a row as soon as it is measured and keep the JSON current: a run stopped by its
    time limit keeps what it measured."""
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    if out:
        Path(out).write_text(json.dumps(result))


def gpu_matrix(args, cfg, ranks, precision, result) -> None:
    """eager / compiled x ZeRO stages x micro batches; then, with --real-data, the fastest
    configuration fed by the real loader. Runs on any device (the tests drive it on a CPU)."""
    import torch
    import torch.distributed as dist

    from pipeline.training.flops import Speed, measure_peak, peak_memory_gib
    from pipeline.training.optim import batch_plan, scaled_lrs

    # one static graph per micro batch, shared by the stages (dynamo keeps one per shape)
    torch._dynamo.config.automatic_dynamic_shapes = False
    speed = Speed.of(_flops_per_image(cfg), measure_peak(ranks.device), ranks.device)
    result["speed"] = speed.row()
    main = ranks.rank == 0
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    best = None
    for compiled in modes:
        for micro in args.micro_batches:
            mcfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": micro * ranks.world_size})})
            plan = batch_plan(mcfg, ranks.world_size)
            lr = scaled_lrs(mcfg.optim, plan.global_batch).lr
            batches = _batches(mcfg, micro, 4, ranks.device, seed=ranks.rank)
            for stage in args.stages:
                name = f"{'compiled' if compiled else 'eager'} zero-{stage} mb{micro}"
                row = {"name": name, "compiled": compiled, "zero_stage": stage, "micro_batch": micro}
                if ranks.device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                contender = None
                try:
                    contender = ZeroContender(mcfg, plan, lr, ranks.device, stage, precision, compiled)
                    t0 = time.perf_counter()
                    _timed(contender, batches, args.warmup, ranks.device)
                    row["warmup_s"] = time.perf_counter() - t0  # compile time shows here
                    seconds = _timed(contender, batches, args.steps, ranks.device)
                    row["host_syncs_per_step"] = _syncs_per_step(contender, batches, ranks.device)
                    row["host_reads_per_step"] = host_reads_per_step(contender, batches)[0]
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                else:
                    ips = micro * args.steps / seconds
                    row.update(images_per_s_per_gpu=ips, **speed.figures(ips))
                    if best is None or ips > best[0]["images_per_s_per_gpu"]:
                        best = (row, mcfg, plan, lr)
                row["peak_memory_gib"] = peak_memory_gib(ranks.device)
                del contender
                dist.barrier()
                if main:
                    _emit(result, row, args.out)
    if args.real_data and best is not None:
        from pipeline.data import build_train_loader

        row, mcfg, plan, lr = best
        dcfg = mcfg.model_copy(
            update={"data": mcfg.data.model_copy(update={"train": args.real_data, "workers": args.workers})}
        )
        if ranks.device.type == "cuda":
            torch.cuda.empty_cache()
        contender = ZeroContender(dcfg, plan, lr, ranks.device, row["zero_stage"], precision, row["compiled"])
        loader = build_train_loader(
            dcfg, rank=ranks.rank, world_size=ranks.world_size, micro_batch=plan.micro_batch, device=ranks.device
        )
        seconds, waited = _timed_loader(contender, loader, args.steps, args.warmup, ranks.device)
        ips = plan.micro_batch * args.steps / seconds
        real = {
            "name": f"{row['name']} real data",
            "compiled": row["compiled"],
            "zero_stage": row["zero_stage"],
            "micro_batch": row["micro_batch"],
            "split": args.real_data,
            "images_per_s_per_gpu": ips,
            **speed.figures(ips),
            "loader_wait_share": waited / seconds,
            "peak_memory_gib": peak_memory_gib(ranks.device),
        }
        if main:
            _emit(result, real, args.out)
