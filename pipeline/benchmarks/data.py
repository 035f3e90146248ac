"""`mfm bench data`: images/s of decode + RandomResizedCrop + flip + corruption, per backend,
against a plain PIL DataLoader baseline (webdataset + torchvision transforms + the same
corruption on each batch), over the same shards in the same run.

Without --split it writes ImageNet-like synthetic JPEGs (default 500x375) to a temporary folder.
The first batch of each loader (worker start-up, pipeline build) is not timed.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import tempfile
import time

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.corruptions import corrupt


def synthetic_split(dest: str, images: int, per_shard: int, width: int, height: int) -> str:
    """Photo-like JPEGs (smooth structure plus texture), quality 90, in the shard contract."""
    import json
    import tarfile

    from PIL import Image

    from pipeline.storage import join, write_bytes

    rng = np.random.default_rng(0)
    shards, i = [], 0
    while i < images:
        buf = io.BytesIO()
        count = min(per_shard, images - i)
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for _ in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
                arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3))
                jb = io.BytesIO()
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(jb, format="JPEG", quality=90)
                for ext, data in ((".jpg", jb.getvalue()), (".cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"b{i:07d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        name = f"train-{len(shards):06d}.tar"
        write_bytes(join(dest, name), buf.getvalue())
        shards.append({"name": name, "samples": count, "bytes": len(buf.getvalue())})
    write_bytes(join(dest, "manifest.json"), json.dumps({"format_version": 1, "split": "train", "num_samples": images,
                                                         "shards": shards}).encode())
    return dest


def _proc_cpu(pid: int | str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers), read from /proc so
    that it can be sampled while the workers run; elsewhere only this process's own time."""
    if not os.path.exists("/proc/self/stat"):
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    pids = {os.getpid()}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    total = 0.0
    for pid in pids:
        try:
            total += _proc_cpu(pid)
        except OSError:  # a worker that just exited
            pass
    return total


def _time(batches, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image), both over the steady state after the first batch (worker
    start-up, pipeline build). The CPU figure hardly depends on what else the machine runs:
    cores / (CPU s per image) bounds the rate on an idle machine."""
    it = iter(batches)
    next(it)
    n, t0, cpu0 = 0, time.perf_counter(), _cpu_seconds()
    cpu1 = cpu0
    for _ in it:
        n += batch_size
        cpu1 = _cpu_seconds()  # sampled per batch: workers exit when the epoch ends
    wall = time.perf_counter() - t0
    return n / wall, 1000 * (cpu1 - cpu0) / n


def bench_loader(cfg, backend: str, batch: int, device: str) -> tuple[float, int]:
    from pipeline.data import build_train_loader

    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch=batch, device=device, backend=backend)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def batches():
        for b in loader:
            yield b
        sync()
    return _time(batches(), batch)


def bench_pil_baseline(cfg, split_url: str, batch: int, workers: int, device: str) -> tuple[float, int]:
    """The plain way: webdataset tar streaming, PIL decode, torchvision RandomResizedCrop (bicubic)
    + flip + ToTensor in DataLoader workers, corruption on each batch."""
    import webdataset as wds
    from torchvision import transforms as T

    from pipeline.data.shards import read_split

    split = read_split(split_url, cfg.storage)
    interp = T.InterpolationMode.BILINEAR if cfg.data.downscale == "bilinear" else T.InterpolationMode.BICUBIC
    tf = T.Compose([T.RandomResizedCrop(cfg.model.img_size, scale=tuple(cfg.data.crop_scale), interpolation=interp),
                    T.RandomHorizontalFlip(), T.ToTensor()])
    ds = (wds.WebDataset([s.url for s in split.shards], shardshuffle=False, empty_check=False)
          .decode("pil").to_tuple("jpg").map_tuple(tf).batched(batch, partial=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    gen = torch.Generator().manual_seed(0)

    def batches():
        for (images,) in loader:
            enc, target, keep = corrupt(images.to(device), cfg.corruption, gen)
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
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI reader+decode threads")
    p.add_argument("--kind", default="mfm", choices=["mfm", "sr", "deblur", "denoise"])
    p.add_argument("--backends", default="pil,torch,dali", help="comma list of pil,torch,dali")
    p.add_argument("--downscale", default="bicubic,bilinear", help="comma list: filters for shrinking crops")
    args = p.parse_args(argv)

    tmp = None
    url = args.split
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="mfm-bench-data-")
        w, h = (int(v) for v in args.image_size.split("x"))
        print(f"writing {args.images} synthetic {w}x{h} JPEGs ...", flush=True)
        url = synthetic_split(os.path.join(tmp.name, "train"), args.images, 128, w, h)
    from pipeline.data.loader import dali_available

    runs = []  # (device, downscale, backend, img/s, images)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for down in args.downscale.split(","):
            cfg = load_config(None, [f"data.train={url}", f"model.img_size={args.size}", f"corruption.kind={args.kind}",
                                     f"data.workers={args.workers}", "data.shuffle_buffer=256",
                                     f"data.downscale={down}"])
            for name in args.backends.split(","):
                if name == "dali" and not dali_available():
                    print("dali: not installed, skipped")
                    continue
                if name == "pil":
                    rate, cpu = bench_pil_baseline(cfg, url, args.batch, args.workers, device)
                else:
                    rate, cpu = bench_loader(cfg, name, args.batch, device)
                runs.append((device, down, name, rate, cpu))
                print(f"  {name} ({device}, {down} downscale): {rate:.1f} img/s, {cpu:.1f} CPU ms/img", flush=True)
    base = {(dev, down): rate for dev, down, name, rate, _ in runs if name == "pil"}
    print(f"\nimages/s: decode + RandomResizedCrop({args.size}) + flip + {args.kind}, batch {args.batch}, "
          f"workers {args.workers}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("img/s: wall clock (depends on the machine's load); CPU ms/img: all our processes' CPU time per image;")
    print(f"idle bound: {os.cpu_count()} cores / CPU time per image. Ratios are against pil with the same filter.")
    cpu_base = {(dev, down): cpu for dev, down, name, _, cpu in runs if name == "pil"}
    print(f"{'loader':<8} {'device':<6} {'downscale':<9} {'img/s':>8} {'vs pil':>7} {'CPU ms/img':>11} {'idle img/s':>11} {'vs pil':>7}")
    for dev, down, name, rate, cpu in runs:
        key = (dev, down)
        ratio = f"{rate / base[key]:.2f}x" if key in base else "-"
        cratio = f"{cpu_base[key] / cpu:.2f}x" if key in cpu_base else "-"
        print(f"{name:<8} {dev:<6} {down:<9} {rate:>8.1f} {ratio:>7} {cpu:>11.1f} {1000 * os.cpu_count() / cpu:>11.1f} {cratio:>7}")
    if tmp is not None:
        tmp.cleanup()
    return 0
