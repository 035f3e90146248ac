"""`mfm bench plan`: the epoch plan at ImageNet scale, by simulation.

A synthetic manifest of 1,281,167 samples in 1,024 shards (ImageNet-1k train). Reports, for
one rank of `--world` ranks with `--workers` readers each:
- the time and peak memory (tracemalloc: numpy's arrays included) to compute its epoch plan,
  fresh and after a layout change (resume on another world size), against one
  `numpy.random.permutation` of every sample id (the least any global shuffle costs);
- the manifest's load time (parse and check, as every rank does), local and from S3;
- the first-batch latency of a real loader (torch backend, rank 0) reading from a moto S3
  endpoint, against one GET of the shard that batch comes from;
- how time and memory grow with samples and with ranks.
Goal: plan under 2 s and 200 MB per rank.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import tracemalloc

import numpy as np

IMAGENET_TRAIN = 1_281_167


def synthetic_manifest(samples: int, shards: int, split: str = "train") -> dict:
    counts = np.full(shards, samples // shards)
    counts[: samples % shards] += 1
    return {
        "format_version": 1,
        "tool": "mfm bench plan",
        "split": split,
        "num_samples": samples,
        "shards": [
            {
                "name": f"{split}-{i:06d}.tar",
                "index": f"{split}-{i:06d}.idx",
                "samples": int(n),
                "bytes": None,
                "sha256": "",
            }
            for i, n in enumerate(counts)
        ],
        "classes": [{"index": c, "wnid": f"n{c:08d}", "name": str(c)} for c in range(1000)],
    }


def _measure(fn, repeat: int = 3) -> tuple[float, float]:
    """(best seconds, peak MB of traced allocations)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak / 1e6


def plan_cost(
    counts: list[int], world: int, workers: int, micro: int, buffer: int, resume: bool = False, mix=None
) -> tuple[float, float]:
    from pipeline.data.sampling import Layout, SamplerState, rank_plan

    state = SamplerState(seed=0)
    if resume:  # half an epoch on half the ranks, then the rest on `world`
        state.use_layout(Layout(max(1, world // 2), micro, workers))
        state.segments[-1].batches = len(rank_plan(counts, state, 0, shuffle_buffer=buffer, mix=mix)) // 2
    state.use_layout(Layout(world, micro, workers))
    return _measure(lambda: rank_plan(counts, state, world - 1, shuffle_buffer=buffer, mix=mix))


def _write_shard(url: str, name: str, samples: int, first_key: int, jpeg: bytes, cfg) -> int:
    from pipeline import storage
    from pipeline.sharding.tarfmt import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf) as tw:
        for k in range(first_key, first_key + samples):
            meta = json.dumps({"file": f"s{k}.JPEG", "wnid": "n00000000", "class": 0}).encode()
            tw.add_image(f"s{k:07d}", b"0", jpeg, meta)
    storage.write_bytes(storage.join(url, name), buf.getvalue(), cfg)
    storage.write_bytes(storage.join(url, name.replace(".tar", ".idx")), tw.index(), cfg)
    return len(buf.getvalue())


def first_batch(manifest: dict, world: int, micro: int, buffer: int, size: int) -> dict:
    """A loader for rank 0 on a moto S3 endpoint: time to its first batch vs one GET of that shard."""
    from moto.server import ThreadedMotoServer
    from PIL import Image

    from pipeline import storage
    from pipeline.config import StorageConfig, load_config
    from pipeline.data import build_train_loader
    from pipeline.data.sampling import Layout, SamplerState, rank_plan
    from pipeline.data.shards import read_split

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        cfg_s3 = StorageConfig(endpoint_url=endpoint, region="us-east-1")
        url = "s3://bench/imagenet/train"
        counts = [s["samples"] for s in manifest["shards"]]
        state = SamplerState(seed=0)
        state.use_layout(Layout(world, micro, 1))
        plan = rank_plan(counts, state, 0, shuffle_buffer=buffer)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        needed = sorted({int(np.searchsorted(offsets, i, side="right") - 1) for i in plan.ravel()})
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
        jpeg = io.BytesIO()
        img.save(jpeg, "JPEG", quality=90)
        m = json.loads(json.dumps(manifest))
        for i in needed:  # only the shards this rank reads exist: the rest are never opened
            m["shards"][i]["bytes"] = _write_shard(
                url, m["shards"][i]["name"], counts[i], int(offsets[i]), jpeg.getvalue(), cfg_s3
            )
        storage.write_bytes(storage.join(url, "manifest.json"), json.dumps(m).encode(), cfg_s3)

        load_s3, _ = _measure(lambda: read_split(url, cfg_s3))
        first_shard = m["shards"][int(np.searchsorted(offsets, plan[0][0], side="right") - 1)]["name"]
        get_s, _ = _measure(lambda: storage.read_bytes(storage.join(url, first_shard), cfg_s3))
        cfg = load_config(
            None,
            [
                f"data.train={url}",
                "data.backend=torch",
                "data.workers=0",
                f"data.batch_size={micro * world}",
                f"data.shuffle_buffer={buffer}",
                f"storage.endpoint_url={endpoint}",
                "storage.region=us-east-1",
                "model.img_size=224",
            ],
        )
        t = time.perf_counter()
        loader = build_train_loader(cfg, rank=0, world_size=world, micro_batch=micro, device="cpu")
        built = time.perf_counter() - t
        batches = iter(loader)
        next(batches)
        latency = time.perf_counter() - t
        batches.close()
        import threading

        deadline = time.monotonic() + 120  # a shard read in flight finishes before the endpoint goes
        while any(t.name.startswith("shard-prefetch") for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"manifest_load_s3_s": load_s3, "first_batch_s": latency, "loader_build_s": built, "get_shard_s": get_s}
    finally:
        server.stop()


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm bench plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--shards", type=int, default=1024)
    p.add_argument("--world", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8, help="per rank (default 8: a 4096 batch on 512 ranks)")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=160, help="side of the synthetic JPEGs (first batch)")
    p.add_argument("--no-s3", action="store_true", help="skip the moto S3 first-batch measurement")
    p.add_argument("--no-growth", action="store_true", help="skip the growth table")
    a = p.parse_args(argv)

    from pipeline.data.shards import read_split

    manifest = synthetic_manifest(a.samples, a.shards)
    counts = [s["samples"] for s in manifest["shards"]]
    print(f"synthetic manifest: {a.samples:,} samples in {a.shards:,} shards; world {a.world}, {a.workers} workers")
    with tempfile.TemporaryDirectory(prefix="mfm-bench-plan-") as tmp:
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        load_s, load_mb = _measure(lambda: read_split(tmp))
    perm_s, perm_mb = _measure(lambda: np.random.default_rng(0).permutation(a.samples))
    plan_s, plan_mb = plan_cost(counts, a.world, a.workers, a.micro_batch, a.shuffle_buffer)
    res_s, res_mb = plan_cost(counts, a.world, a.workers, a.micro_batch, a.shuffle_buffer, resume=True)
    print(f"manifest load (local):          {load_s * 1e3:8.1f} ms   peak {load_mb:6.1f} MB")
    print(f"baseline permutation of all ids: {perm_s * 1e3:7.1f} ms   peak {perm_mb:6.1f} MB")
    print(
        f"epoch plan, one rank:           {plan_s * 1e3:8.1f} ms   peak {plan_mb:6.1f} MB   "
        f"({plan_s / perm_s:.2f}x the permutation's time)"
    )
    print(f"  after a layout change:        {res_s * 1e3:8.1f} ms   peak {res_mb:6.1f} MB   ({res_s / perm_s:.2f}x)")
    # + a new week of 10% more samples (its own 10% more shards) drawn at 20% of each epoch
    from pipeline.data.sampling import Mix

    week = synthetic_manifest(a.samples // 10, max(1, a.shards // 10))
    mixed = counts + [s["samples"] for s in week["shards"]]
    mix = Mix((len(counts), len(week["shards"])), (0.8, 0.2))
    mix_s, mix_mb = plan_cost(mixed, a.world, a.workers, a.micro_batch, a.shuffle_buffer, mix=mix)
    print(f"  two sources (+10% at 20%):    {mix_s * 1e3:8.1f} ms   peak {mix_mb:6.1f} MB   ({mix_s / perm_s:.2f}x)")
    ok = all(t < 2 and mb < 200 for t, mb in ((plan_s, plan_mb), (res_s, res_mb), (mix_s, mix_mb)))
    print(f"goal < 2 s and < 200 MB per rank: {'met' if ok else 'NOT met'}")
    if not a.no_s3:
        fb = first_batch(manifest, a.world, a.micro_batch, a.shuffle_buffer, a.image_size)
        print(f"manifest load (moto S3):        {fb['manifest_load_s3_s'] * 1e3:8.1f} ms")
        print(
            f"first batch from moto S3:       {fb['first_batch_s'] * 1e3:8.1f} ms   (loader built in "
            f"{fb['loader_build_s'] * 1e3:.0f} ms; {fb['first_batch_s'] / fb['get_shard_s']:.2f}x one GET of its "
            f"shard, {fb['get_shard_s'] * 1e3:.0f} ms)"
        )
    if not a.no_growth:
        print("growth (one rank's plan): samples x world -> ms, peak MB")
        for scale in (0.25, 1, 4):
            n = int(a.samples * scale)
            c = [s["samples"] for s in synthetic_manifest(n, max(1, int(a.shards * scale)))["shards"]]
            for world in (64, a.world, 4096):
                s, mb = plan_cost(c, world, a.workers, a.micro_batch, a.shuffle_buffer)
                print(f"  {n:>10,} samples x {world:>5} ranks: {s * 1e3:8.1f} ms {mb:7.1f} MB")
    return 0
