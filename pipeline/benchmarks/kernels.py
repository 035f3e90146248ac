"""`mfm bench kernels`: the frequency ops, literal spec formulation vs ours, in the same run.

Per-image times (median over repeats) for the corruption, the loss forward, and the loss
forward + backward, on CPU and, when CUDA is present, on the GPU. On the GPU the fused
masked-magnitude reduction is also reported against the memory-bandwidth roofline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from kernels import frequency as F

# Peak memory bandwidth (GB/s) by device name, for when the driver does not report clocks.
KNOWN_PEAK_GBS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
}


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return sync


def _measure(fns, sync, warmup: int, repeats: int) -> list[float]:
    """Median seconds per call of each fn. The fns alternate within every repeat, so that load
    from other processes falls on all of them alike and the ratios stay fair."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _cases(x, hp, pred, target, keep, radius):
    def corrupt(op):
        return lambda: op(x, radius, hp)

    def loss(op):
        return lambda: op(pred, target, keep)

    def loss_bwd(op):
        def run():
            pred.grad = None
            op(pred, target, keep).backward()

        return run

    return [
        ("corruption", corrupt(F.literal_mask_frequencies), corrupt(F.mask_frequencies)),
        ("loss forward", loss(F.literal_frequency_loss), loss(F.frequency_loss)),
        ("loss fwd+bwd", loss_bwd(F.literal_frequency_loss), loss_bwd(F.frequency_loss)),
    ]


def _peak_gbs(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak GB/s, where the figure came from)."""
    if override:
        return override, "--peak-gbs"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width"  # double data rate
    known = next((v for k, v in KNOWN_PEAK_GBS.items() if k in props.name), None)
    return known, "datasheet figure by name" if known else "unknown"


def bench_device(
    device: torch.device,
    batch: int,
    size: int,
    radius: float,
    warmup: int,
    repeats: int,
    peak_override: float | None = None,
) -> list[tuple]:
    """Rows (op, literal s/img, ours s/img) and, on CUDA, the reduction roofline row."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    hp = (torch.rand(batch, generator=g) < 0.5).to(device)
    pred = torch.randn(batch, 3, size, size, generator=g).to(device).requires_grad_(True)
    target = torch.randn(batch, 3, size, size, generator=g).to(device)
    keep = F.mask_frequencies(x, radius, hp)[1]
    sync = _timer(device)
    rows = []
    cases = _cases(x, hp, pred, target, keep, radius)
    for i, (name, literal, ours) in enumerate(cases, 1):
        print(f"  [{device.type} {i}/{len(cases)}] {name} ...", file=sys.stderr, flush=True)
        t_lit, t_ours = _measure([literal, ours], sync, warmup, repeats)
        rows.append((name, t_lit / batch, t_ours / batch))
    total = ("corruption + loss fwd+bwd", rows[0][1] + rows[2][1], rows[0][2] + rows[2][2])
    rows.append(total)
    if device.type == "cuda":
        from triton.testing import do_bench

        from kernels import triton_frequency as T

        z = torch.fft.rfft2(pred.detach() - target, norm="ortho")
        # Microseconds-long: CUDA-event timing (median), not a host clock around a sync.
        t = do_bench(lambda: T.masked_magnitude_sum(z, keep, size), warmup=25, rep=200, return_mode="median") / 1e3
        # Compulsory traffic: the half spectrum once, the mask once (its C re-reads hit the cache).
        moved = z.numel() * 8 + keep.numel() * 4
        rows.append(("fused reduction", t, moved / t / 1e9, *_peak_gbs(device, peak_override)))
        rows.append(("device copy", None, _copy_gbs(device), None, "measured"))
    return rows


def _copy_gbs(device: torch.device, nbytes: int = 2**31) -> float:
    """Measured bandwidth ceiling: a large device-to-device copy, bytes read plus bytes written."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    t = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median") / 1e3
    return 2 * nbytes / t / 1e9


def _print_table(device_name: str, batch: int, size: int, rows: list[tuple]) -> None:
    print(f"\n{device_name}: batch {batch}x3x{size}x{size}, times per image")
    print(f"{'op':<28}{'literal':>12}{'ours':>12}{'speed-up':>10}")
    copy = next((row[2] for row in rows if row[0] == "device copy"), None)
    for row in rows:
        if row[0] == "device copy":
            continue
        if row[0] == "fused reduction":
            _, t, gbs, peak, source = row
            share = f", {100 * gbs / peak:.0f}% of {peak:.0f} GB/s peak ({source})" if peak else ", peak unknown"
            if copy:
                share += f", {100 * gbs / copy:.0f}% of the {copy:.0f} GB/s a device copy reaches"
            print(f"fused masked-magnitude reduction: {t * 1e3:.3f} ms per batch, {gbs:.0f} GB/s{share}")
            continue
        name, lit, ours = row
        print(f"{name:<28}{lit * 1e3:>9.3f} ms{ours * 1e3:>9.3f} ms{lit / ours:>9.2f}x")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="CPU batch size (default 32)")
    p.add_argument("--gpu-batch", type=int, default=256, help="GPU batch size (default 256)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--radius", type=float, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    p.add_argument("--peak-gbs", type=float, default=None, help="GPU peak memory bandwidth, GB/s")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", file=sys.stderr)
    if args.device in ("all", "cpu"):
        rows = bench_device(torch.device("cpu"), args.batch, args.size, args.radius, args.warmup, args.repeats)
        _print_table("CPU", args.batch, args.size, rows)
    if args.device in ("all", "cuda"):
        if not torch.cuda.is_available():
            print("\nGPU: no CUDA device here; GPU figures not measured.")
            return 0 if args.device == "all" else 1
        dev = torch.device("cuda")
        rows = bench_device(dev, args.gpu_batch, args.size, args.radius, args.warmup, args.repeats, args.peak_gbs)
        _print_table(f"GPU ({torch.cuda.get_device_name(dev)})", args.gpu_batch, args.size, rows)
    return 0
