"""`mfm bench data`: images/s of decode + RandomResizedCrop + flip + corruption, per backend,
against a plain PIL DataLoader baseline (webdataset + torchvision transforms + the same
corruption on each batch), over the same shards in the same run.

Without --split it writes ImageNet-like synthetic JPEGs (default 500x375) to a temporary folder.
The first batch of each loader (worker start-up, pipeline build) is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.corruptions import corrupt
from pipeline.data.augment import corruption_threads, torch_threads


def synthetic_split(dest: str, images: int, per_shard: int, width: int, height: int) -> str:
    """Photo-like JPEGs (smooth structure plus texture), quality 90, in the shard contract (tars
    with their .idx, as `mfm shard` writes them)."""
    import json

    from PIL import Image

    from pipeline.sharding.tarfmt import TarWriter
    from pipeline.storage import join, write_bytes

    rng = np.random.default_rng(0)
    shards, i = [], 0
    while i < images:
        buf = io.BytesIO()
        count = min(per_shard, images - i)
        with TarWriter(buf) as tar:
            for _ in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
                    (width, height), Image.BICUBIC
                )
                arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3))
                jb = io.BytesIO()
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(jb, format="JPEG", quality=90)
                tar.add_sample(f"b{i:07d}", [("jpg", jb.getvalue()), ("cls", str(i % 10).encode())])
                i += 1
        name = f"train-{len(shards):06d}.tar"
        write_bytes(join(dest, name), buf.getvalue())
        write_bytes(join(dest, name.replace(".tar", ".idx")), tar.index())
        shards.append(
            {"name": name, "index": name.replace(".tar", ".idx"), "samples": count, "bytes": len(buf.getvalue())}
        )
    write_bytes(
        join(dest, "manifest.json"),
        json.dumps({"format_version": 1, "split": "train", "num_samples": images, "shards": shards}).encode(),
    )
    return dest


def _proc_cpu(pid: int | str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cpu_seconds() -> dict[int, float]:
    """CPU time of this process and of each live child (DataLoader workers), read from /proc so
    that it can be sampled while the workers run; elsewhere only this process's own time."""
    if not os.path.exists("/proc/self/stat"):
        r = resource.getrusage(resource.RUSAGE_SELF)
        return {os.getpid(): r.ru_utime + r.ru_stime}
    pids = {os.getpid()}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    times = {}
    for pid in pids:
        try:
            times[pid] = _proc_cpu(pid)
        except OSError:  # a worker that just exited
            pass
    return times


def _time(batches, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image), both over the steady state after the first batch (worker
    start-up, pipeline build). The CPU figure hardly depends on what else the machine runs:
    cores / (CPU s per image) bounds the rate on an idle machine."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    start = _cpu_seconds()
    last = dict(start)
    for _ in it:
        n += batch_size
        last.update(_cpu_seconds())  # sampled per batch, kept per process: workers exit when the epoch ends
    wall = time.perf_counter() - t0
    cpu = sum(last.values()) - sum(start.values())
    return n / wall, 1000 * cpu / max(n, 1)


class ThreadClock:
    """The consuming thread's own CPU time (time.thread_time) inside next(loader), and the part of
    it spent in the corruption's maths (corrupt_samples, wherever a backend calls it on that
    thread): what the training thread pays per batch beside its step."""

    def __init__(self):
        self.owner = threading.get_ident()
        self.inside = self.corruption = 0.0
        self.images = 0

    def batches(self, loader, batch_size: int):
        """`loader`'s batches, the first one (start-up) not counted."""
        it = iter(loader)
        first = True
        while True:
            t = time.thread_time()
            c = self.corruption
            try:
                b = next(it)
            except StopIteration:
                return
            if first:  # start-up: not counted
                self.corruption, first = c, False
            else:
                self.inside += time.thread_time() - t
                self.images += batch_size
            yield b

    @contextlib.contextmanager
    def counting_corruption(self):
        from pipeline.data import augment, dali_backend, torch_backend

        real = augment.corrupt_samples

        def timed(*a, **kw):
            if threading.get_ident() != self.owner:
                return real(*a, **kw)
            t = time.thread_time()
            try:
                return real(*a, **kw)
            finally:
                self.corruption += time.thread_time() - t

        mods = (dali_backend, torch_backend)
        for m in mods:
            m.corrupt_samples = timed
        try:
            yield self
        finally:
            for m in mods:
                m.corrupt_samples = real

    def per_256(self) -> tuple[float, float]:
        """(ms outside the corruption, ms of the corruption) per 256 images."""
        k = 256 * 1000 / max(1, self.images)
        return (self.inside - self.corruption) * k, self.corruption * k


def bench_loader(cfg, backend: str, batch: int, device: str, epochs: int = 1) -> tuple[float, float, tuple]:
    """(images/s, CPU ms per image, ThreadClock.per_256())."""
    from pipeline.data import build_train_loader

    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=batch, device=device, backend=backend)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clock = ThreadClock()

    def batches():
        for _ in range(epochs):
            yield from clock.batches(loader, batch)
        sync()

    with clock.counting_corruption():
        rate, cpu = _time(batches(), batch)
    return rate, cpu, clock.per_256()


def bench_pil_baseline(
    cfg, split_url: str, batch: int, workers: int, device: str, *, tuned: bool = True
) -> tuple[float, int]:
    """The plain way: webdataset tar streaming, PIL decode, torchvision RandomResizedCrop (bicubic)
    + flip + ToTensor in DataLoader workers, corruption on each batch in this process. `tuned`:
    the corruption the DALI path runs (corrupt_samples, per-sample seeds) on the cores the workers
    leave, so that the comparison is of the loaders; else corrupt() with torch's default threads,
    as a plain script would."""
    import webdataset as wds
    from torchvision import transforms as T

    from pipeline.data.augment import corrupt_samples
    from pipeline.data.shards import read_split

    split = read_split(split_url, cfg.storage)
    interp = T.InterpolationMode.BILINEAR if cfg.data.downscale == "bilinear" else T.InterpolationMode.BICUBIC
    tf = T.Compose(
        [
            T.RandomResizedCrop(cfg.model.img_size, scale=tuple(cfg.data.crop_scale), interpolation=interp),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
        ]
    )
    ds = (
        wds.WebDataset([s.url for s in split.shards], shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg")
        .map_tuple(tf)
        .batched(batch, partial=False)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    gen = torch.Generator().manual_seed(0)
    threads = corruption_threads(workers) if tuned and not device.startswith("cuda") else torch.get_num_threads()

    def batches():
        with torch_threads(threads):
            for (images,) in loader:
                if tuned:
                    seeds = torch.randint(0, 2**62, (len(images),), generator=gen).tolist()
                    enc, target, keep = corrupt_samples(images.to(device), cfg.corruption, seeds)
                else:
                    enc, target, keep = corrupt(images.to(device), cfg.corruption, gen)
                yield enc
            if device.startswith("cuda"):
                torch.cuda.synchronize()

    return _time(batches(), batch)


@dataclass
class EncodedBatches:
    """Raw batch -> the encoded JPEGs and their crop/flip/seed params (the nvjpeg baseline decodes
    on the GPU in the training process)."""

    def __call__(self, raw) -> dict:
        return {
            "data": [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw.data],
            "params": torch.tensor(
                [[q.top, q.left, q.height, q.width, int(q.flip), q.corruption_seed] for q in raw.params]
            ),
        }


def bench_nvjpeg(cfg, split_url: str, batch: int, workers: int, device: str, epochs: int = 1) -> tuple[float, float]:
    """torchvision.io.decode_jpeg(device="cuda") of whole images (nvJPEG, no crop-window decode),
    then per-sample crop, antialiased bicubic resize and flip with torch on the GPU, and the same
    corruption; reading and the header check in DataLoader workers, as the torch backend does."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    from pipeline.data import torch_backend
    from pipeline.data.augment import corrupt_samples
    from pipeline.data.sampling import Layout, deal, epoch_order
    from pipeline.data.shards import read_split

    split = read_split(split_url, cfg.storage)
    order = epoch_order(split.counts, seed=cfg.train.seed, epoch=0, shuffle_buffer=cfg.data.shuffle_buffer)
    plan = deal(order, Layout(1, batch, max(1, workers)), 0)
    size = cfg.model.img_size

    def encoded():
        for _ in range(epochs):
            yield from torch_backend.iterate(
                split,
                cfg,
                plan,
                0,
                max(1, workers),
                0,
                EncodedBatches(),
                workers=workers,
                pin_memory=device.startswith("cuda"),
            )

    def batches():
        for out in encoded():
            images = decode_jpeg(out["data"], device=device)
            views = []
            for img, (top, left, h, w, flip, _) in zip(images, out["params"].tolist()):
                v = F.interpolate(
                    img[None, :, top : top + h, left : left + w].float(),
                    size=(size, size),
                    mode="bicubic",
                    antialias=True,
                )
                views.append(v.flip(-1) if flip else v)
            views = torch.cat(views).div_(255).clamp_(0, 1)
            enc, _, _ = corrupt_samples(views, cfg.corruption, out["params"][:, 5].tolist())
            yield enc
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return _time(batches(), batch)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--split", help="URL of a sharded split (default: synthetic JPEGs in a temporary folder)")
    p.add_argument("--images", type=int, default=768, help="synthetic images (default 768)")
    p.add_argument("--image-size", default="500x375", help="synthetic image WxH (default 500x375, ImageNet-like)")
    p.add_argument("--size", type=int, default=224, help="crop size (model.img_size)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI reader processes and threads")
    p.add_argument("--kind", default="mfm", choices=["mfm", "sr", "deblur", "denoise"])
    p.add_argument(
        "--backends", default="pil,torch,dali", help="comma list of pil,pil-plain,torch,dali,nvjpeg (nvjpeg: cuda only)"
    )
    p.add_argument("--device", default="cpu", help="comma list of cpu,cuda: where the loaders put their batches")
    p.add_argument(
        "--hw-decoder-load", default=None, help="comma list: data.dali_hw_decoder_load values to try (dali on cuda)"
    )
    p.add_argument(
        "--fancy-upsampling",
        default="on,off",
        help="comma list of on,off: data.dali_fancy_upsampling in the --hw-decoder-load sweep (default both)",
    )
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per loader (dali, torch, nvjpeg; default 1)")
    p.add_argument("--downscale", default="bicubic,bilinear", help="comma list: filters for shrinking crops")
    args = p.parse_args(argv)
    if not set(args.fancy_upsampling.split(",")) <= {"on", "off"}:
        p.error(f"--fancy-upsampling: a comma list of on,off, not {args.fancy_upsampling!r}")

    tmp = None
    url = args.split
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="mfm-bench-data-")
        w, h = (int(v) for v in args.image_size.split("x"))
        print(f"writing {args.images} synthetic {w}x{h} JPEGs ...", flush=True)
        url = synthetic_split(os.path.join(tmp.name, "train"), args.images, 128, w, h)
    from pipeline.data.loader import dali_available

    names = args.backends.split(",")
    devices = args.device.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("mfm bench data: --device cuda but torch sees no CUDA device")
    runs = {}  # (device, downscale, backend) -> [(img/s, CPU ms/img, thread ms per 256 or None)] per round
    for rnd in range(args.repeat):
        for device in devices:
            for down in args.downscale.split(","):
                overrides = [
                    f"data.train={url}",
                    f"model.img_size={args.size}",
                    f"corruption.kind={args.kind}",
                    f"data.workers={args.workers}",
                    "data.shuffle_buffer=256",
                    f"data.downscale={down}",
                ]
                cfg = load_config(None, overrides)
                # the backends of a round run back to back, so that a change in the machine's load
                # between rounds moves them together
                for name in names:
                    variants = [(name, [])]  # (label, config overrides)
                    if name == "dali" and not dali_available():
                        continue
                    if name == "nvjpeg" and device != "cuda":
                        continue
                    if name == "dali" and device == "cuda" and args.hw_decoder_load:
                        fancy = {"on": "true", "off": "false"}
                        variants = [
                            (
                                f"{name}@{load}/{'fancy' if f == 'on' else 'plain'}",
                                [f"data.dali_hw_decoder_load={load}", f"data.dali_fancy_upsampling={fancy[f]}"],
                            )
                            for load in args.hw_decoder_load.split(",")
                            for f in args.fancy_upsampling.split(",")
                        ]
                    for label, extra in variants:
                        thread = None
                        if name in ("pil", "pil-plain"):
                            rate, cpu = bench_pil_baseline(
                                cfg, url, args.batch, args.workers, device, tuned=name == "pil"
                            )
                        elif name == "nvjpeg":
                            rate, cpu = bench_nvjpeg(cfg, url, args.batch, args.workers, device, args.epochs)
                        else:
                            c = load_config(None, [*overrides, *extra]) if extra else cfg
                            rate, cpu, thread = bench_loader(c, name, args.batch, device, args.epochs)
                        runs.setdefault((device, down, label), []).append((rate, cpu, thread))
                        print(
                            f"  round {rnd + 1}: {label} ({device}, {down} downscale): {rate:.1f} img/s, "
                            f"{cpu:.1f} CPU ms/img, {rate * cpu / 1000:.1f} cores"
                            + ("" if thread is None else f", training thread {thread[0]:.2f} + {thread[1]:.2f} ms/256"),
                            flush=True,
                        )
    if "dali" in names and not dali_available():
        print("dali: not installed, skipped")
    print(
        f"\nimages/s: decode + RandomResizedCrop({args.size}) + flip + {args.kind}, batch {args.batch}, "
        f"workers {args.workers}, {os.cpu_count()} CPUs, {args.repeat} interleaved rounds (medians)"
    )
    print("img/s: wall clock (depends on the machine's load), one device; CPU ms/img: all our processes' CPU")
    print(
        f"time per image; cores: CPU s per wall s. idle bound: {os.cpu_count()} cores / CPU time per image. "
        "Ratios: median over rounds of the ratio to the baseline (pil on a CPU, torch on cuda) in the same round."
    )
    print(
        f"pil: the DALI path's corruption (corrupt_samples) on {corruption_threads(args.workers)} torch thread(s) "
        f"on a CPU; pil-plain: corrupt() on torch's default {torch.get_num_threads()} threads"
    )
    print(
        "thread ms/256: the training thread's own CPU time (time.thread_time) inside next(loader) per 256 images, "
        "outside the corruption; corr ms/256: the corruption's maths on that thread (kernel launches on cuda)"
    )
    med = statistics.median
    print(
        f"{'loader':<16} {'device':<6} {'downscale':<9} {'img/s':>8} {'vs base':>7} {'CPU ms/img':>11} {'cores':>6} "
        f"{'idle img/s':>11} {'vs base':>7} {'thread ms/256':>13} {'corr ms/256':>11}"
    )
    for (dev, down, name), rs in runs.items():
        base = runs.get((dev, down, "torch" if dev == "cuda" else "pil"))
        rate, cpu = med(r[0] for r in rs), med(r[1] for r in rs)
        # a tiny run can fall under the clock's 10 ms tick: no CPU figure, no bound
        idle = f"{1000 * os.cpu_count() / cpu:.1f}" if cpu > 0 else "-"
        ratio = f"{med(r[0] / b[0] for r, b in zip(rs, base)):.2f}x" if base else "-"
        timed = base and all(r[1] > 0 for r in rs)
        cratio = f"{med(b[1] / r[1] for r, b in zip(rs, base)):.2f}x" if timed else "-"
        threads = [r[2] for r in rs if r[2] is not None]
        thread = f"{med(t[0] for t in threads):>13.2f} {med(t[1] for t in threads):>11.2f}" if threads else ""
        print(
            f"{name:<16} {dev:<6} {down:<9} {rate:>8.1f} {ratio:>7} {cpu:>11.1f} {rate * cpu / 1000:>6.1f} "
            f"{idle:>11} {cratio:>7} {thread}"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0
