"""mfm bench stream: the project's loader against webdataset, mosaicml-streaming (MDS) and litdata, streaming
the same synthetic ImageNet-like JPEGs from an S3 endpoint (moto) behind a counting proxy (s3proxy) that can add
first-byte latency and cap bandwidth like a remote store.

Each measurement is one shuffled epoch in a fresh process with fresh local caches; rounds interleave the
loaders and the figures are medians over rounds. Per loader: samples/s and its ratio to the project's torch
backend, time to first batch (from building the dataset, listing and manifests included), GET/HEAD requests and
MB the proxy served, peak PSS of the process tree (/proc/*/smaps_rollup), and whether each sample came exactly
once. A resume check (half an epoch, state saved, a new loader finishes it) runs once per loader that has one.

The project's loader is driven through its public API (pipeline.data.loader: build_train_loader, TrainLoader
with `make`), so the benchmark measures whichever loader is on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LOADERS = ("project", "project-dali", "webdataset", "mds", "litdata")
LABELS = {
    "project": "this project (torch backend)",
    "project-dali": "this project (DALI backend)",
    "webdataset": "webdataset",
    "mds": "mosaicml streaming (MDS)",
    "litdata": "litdata",
}
WORKLOADS = {"io": "I/O only (raw bytes)", "decode": "decode + crop/resize + MFM corruption"}
BUCKET = "mfm-bench"
CHILD_TIMEOUT_S = 900
MEDIANS = ("samples_per_s", "first_batch_s", "get", "head", "mb_read", "peak_pss_mb")
# moto takes any credentials; a real endpoint's come from the environment as usual
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------- data: one set of JPEGs, three formats


def synthetic_jpegs(n: int, width: int, height: int, seed: int = 0):
    """(id, wnid, JPEG bytes) of photo-like images: smooth structure plus texture, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), 3)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        yield i, f"n{i % 10:08d}", buf.getvalue()


def _litdata_item(item: tuple[int, int, str]) -> dict:
    sample_id, cls, path = item
    return {"id": sample_id, "cls": cls, "jpg": Path(path).read_bytes()}


@dataclass(frozen=True)
class Dataset:
    project: str  # s3:// URL of the sharded split (manifest.json)
    mds: str
    litdata: str
    wds_prefix: str  # bucket/prefix holding the project's tars, for webdataset
    samples: int
    jpeg_mb: float
    shards: dict  # format -> (files, MB)


def write_datasets(
    work: Path, root_url: str, images: int, width: int, height: int, shards: int, endpoint: str
) -> Dataset:
    """The same JPEGs as the project's shards (pipeline.sharding), MDS (MDSWriter) and litdata (optimize),
    built locally, then uploaded straight to the endpoint (not through the proxy)."""
    import s3fs

    from pipeline.sharding import shard_dataset

    src = work / "source" / "train"
    items = []
    total = 0
    for i, wnid, data in synthetic_jpegs(images, width, height):
        (src / wnid).mkdir(parents=True, exist_ok=True)
        path = src / wnid / f"img{i:07d}.JPEG"
        path.write_bytes(data)
        items.append((i, int(wnid[1:]), str(path)))
        total += len(data)
    shard_bytes = max(1, total // shards)
    shard_dataset(
        str(work / "source"),
        str(work / "project"),
        splits="train",
        shard_size_mb=shard_bytes / 2**20 * 1.01,
        progress=False,
    )

    from streaming import MDSWriter

    with MDSWriter(
        out=str(work / "mds"), columns={"id": "int", "cls": "int", "jpg": "bytes"}, size_limit=int(shard_bytes * 1.01)
    ) as w:
        for i, cls, path in items:
            w.write({"id": i, "cls": cls, "jpg": Path(path).read_bytes()})

    from litdata import optimize

    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        optimize(
            fn=_litdata_item,
            inputs=items,
            output_dir=str(work / "litdata"),
            chunk_bytes=int(shard_bytes * 1.01),
            num_workers=1,
            verbose=False,
            start_method="fork",
        )

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)
    bucket_path = root_url.removeprefix("s3://")
    for name, local in (("project", work / "project" / "train"), ("mds", work / "mds"), ("litdata", work / "litdata")):
        fs.put(str(local) + "/", f"{bucket_path}/{name}/", recursive=True)
    sizes = {
        fmt: (len(files), sum(f.stat().st_size for f in files) / 1e6)
        for fmt, files in (
            ("project", list((work / "project" / "train").glob("*.tar"))),
            ("mds", list((work / "mds").glob("*.mds"))),
            ("litdata", list((work / "litdata").glob("*.bin"))),
        )
    }
    shutil.rmtree(work / "source")
    return Dataset(
        project=f"{root_url}/project",
        mds=f"{root_url}/mds",
        litdata=f"{root_url}/litdata",
        wds_prefix=f"{bucket_path}/project",
        samples=images,
        jpeg_mb=total / 1e6,
        shards=sizes,
    )


# ---------------------------------------------------------------- one measurement, in a fresh process


def _config(spec: dict):
    from pipeline.config import load_config

    d = spec["dataset"]
    sets = [
        f"data.train={d['project']}",
        f"data.workers={spec['workers']}",
        f"data.batch_size={spec['batch']}",
        f"train.seed={spec['seed']}",
        *spec.get("set", []),
    ]
    cfg = load_config(None, sets)
    if cfg.data.cache_dir is not None:  # a default shard cache: a fresh one, as for the peers
        cfg = load_config(None, [*sets, f"data.cache_dir={spec['cache_dir']}/project"])
    return cfg


def decode_view(data: bytes, sample_id: int, cfg, epoch: int = 0):
    """The torch backend's per-sample work (pipeline.data.augment): header size, crop window and flip
    from the sample's seed, decode + crop + resize to uint8 (3, S, S); and the corruption seed."""
    from pipeline.data.augment import image_size, sample_params, train_view

    w, h = image_size(data, cfg.data.max_pixels)
    p = sample_params(cfg.train.seed, epoch, sample_id, w, h, tuple(cfg.data.crop_scale))
    return train_view(data, p, cfg.model.img_size, cfg.data.downscale, uint8=True), p.corruption_seed


class _PeerSample:
    """A peer's sample -> (id, bytes count) for I/O only, or (id, uint8 view, corruption seed)."""

    def __init__(self, workload: str, cfg):
        self.workload, self.cfg = workload, cfg

    def __call__(self, sample_id: int, data: bytes):
        if self.workload == "io":
            return sample_id, len(data)
        view, seed = decode_view(data, sample_id, self.cfg)
        return sample_id, view, seed


def _collate(samples: list) -> dict:
    import torch

    out = {"ids": [int(s[0]) for s in samples]}
    if len(samples[0]) == 2:
        out["nbytes"] = sum(int(s[1]) for s in samples)
    else:
        out["views"] = torch.stack([s[1] for s in samples])
        out["seeds"] = [int(s[2]) for s in samples]
    return out


def _finish(batch: dict, cfg) -> tuple | None:
    """The training-process side of a peer's decode batch: the corruption, torch_backend.corrupt_views.
    Its caller holds the result until the next batch is made, as a training loop (and the project's
    loader's consumer here) holds its batch: the same tensors alive at once for every loader."""
    if "views" in batch:
        import torch

        from pipeline.data.torch_backend import corrupt_views

        return corrupt_views({"views": batch["views"], "seeds": torch.tensor(batch["seeds"])}, cfg, torch.device("cpu"))
    return None


def _raw_sizes(raw) -> dict:
    """TrainLoader `make` for the I/O workload: the raw batch's byte counts, nothing decoded."""
    import torch

    return {"images": torch.tensor([len(d) for d in raw.data]), "labels": torch.tensor(list(raw.labels))}


def _project_loader(spec: dict, cfg, backend: str):
    from pipeline.data.loader import TrainLoader, build_train_loader, read_train_split

    if spec["workload"] == "io":  # the public `make` hook: raw batches, nothing decoded
        return TrainLoader(
            cfg, read_train_split(cfg), rank=0, world_size=1, micro_batch=spec["batch"], device="cpu", make=_raw_sizes
        )
    return build_train_loader(cfg, rank=0, world_size=1, micro_batch=spec["batch"], device="cpu", backend=backend)


def _project_epoch(spec: dict, cfg, half: bool, state: dict | None):
    """(batches of ids, state after them, samples in a full epoch): half an epoch, or the rest from `state`."""
    loader = _project_loader(spec, cfg, "dali" if spec["loader"] == "project-dali" else "torch")
    if state is not None:
        loader.load_state_dict(state)
    stop = loader.steps_per_epoch // 2 if half else None
    out = []
    for _ in loader:
        out.append(list(loader.last_ids))
        if len(out) == stop:
            break
    return out, loader.state_dict(), loader.steps_per_epoch * spec["batch"]


def _wds_urls(spec: dict) -> list[str]:
    """The shards as presigned HTTP URLs (what webdataset streams with curl), from one listing."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket, prefix = spec["dataset"]["wds_prefix"].split("/", 1)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
    keys = sorted(o["Key"] for o in listing if o["Key"].endswith(".tar"))
    return [s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=3600) for k in keys]


def _wds_loader(spec: dict, cfg):
    import webdataset as wds

    per_sample = _PeerSample(spec["workload"], cfg)
    urls = _wds_urls(spec)
    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), workersplitter=wds.split_by_worker, seed=spec["seed"])
        .shuffle(cfg.data.shuffle_buffer)
        .map(lambda s: per_sample(zlib.crc32(s["__key__"].encode()), s["jpg"]))
        .batched(spec["batch"], collation_fn=_collate, partial=True)
    )
    return wds.WebLoader(ds, batch_size=None, num_workers=spec["workers"])


def _mds_loader(spec: dict, cfg):
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    per_sample = _PeerSample(spec["workload"], cfg)

    class Samples(StreamingDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return per_sample(int(s["id"]), s["jpg"])

    ds = Samples(
        remote=spec["dataset"]["mds"],
        local=os.path.join(spec["cache_dir"], "mds"),
        shuffle=True,
        shuffle_seed=spec["seed"],
        batch_size=spec["batch"],
    )
    dl = StreamingDataLoader(
        ds, batch_size=spec["batch"], num_workers=spec["workers"], collate_fn=_collate, drop_last=False
    )
    return dl


def _litdata_loader(spec: dict, cfg):
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming import downloader

    # its chunk downloads go through obstore, which refuses a plain-HTTP endpoint (moto) unless told
    if os.environ["AWS_ENDPOINT_URL"].startswith("http://"):
        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True

    per_sample = _PeerSample(spec["workload"], cfg)

    class Samples(StreamingDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return per_sample(int(s["id"]), bytes(s["jpg"]))  # a memoryview into its chunk

    ds = Samples(
        spec["dataset"]["litdata"],
        cache_dir=os.path.join(spec["cache_dir"], "litdata"),
        shuffle=True,
        drop_last=False,
        seed=spec["seed"],
        storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
    )
    return StreamingDataLoader(
        ds, batch_size=spec["batch"], num_workers=spec["workers"], collate_fn=_collate, drop_last=False
    )


PEERS = {"webdataset": _wds_loader, "mds": _mds_loader, "litdata": _litdata_loader}
RESUMABLE = ("project", "project-dali", "mds", "litdata")
# imported before the clock starts (forked workers inherit them), the decode functions included
IMPORTS = {
    "project": ("torch", "pipeline.data.loader", "pipeline.data.torch_backend", "s3fs"),
    "project-dali": ("torch", "pipeline.data.loader", "pipeline.data.dali_backend", "nvidia.dali", "s3fs"),
    "webdataset": ("torch", "pipeline.data.torch_backend", "webdataset", "boto3"),
    "mds": ("torch", "pipeline.data.torch_backend", "streaming", "boto3"),
    "litdata": ("torch", "pipeline.data.torch_backend", "litdata", "litdata.streaming.downloader", "boto3", "obstore"),
}


def _exactly_once(batches: list[list[int]], expected: int) -> dict:
    ids = [i for b in batches for i in b]
    dups = len(ids) - len(set(ids))
    return {"seen": len(ids), "expected": expected, "duplicates": dups, "ok": dups == 0 and len(ids) == expected}


def _peer_epoch(spec: dict, cfg, half: bool, state: dict | None):
    dl = PEERS[spec["loader"]](spec, cfg)
    if state is not None:
        dl.load_state_dict(state)
    samples = spec["dataset"]["samples"]
    stop = -(-samples // spec["batch"]) // 2 if half else None
    out = []
    for batch in dl:
        held = _finish(batch, cfg)  # noqa: F841 - alive until the next batch is made
        out.append(batch["ids"])
        if len(out) == stop:
            break
    return out, dl.state_dict(), samples


def measure(spec: dict) -> dict:
    """One epoch (or, with spec["resume"], a resume check) of one loader; runs in a fresh process."""
    cfg = _config(spec)
    loader = spec["loader"]
    if spec.get("resume"):
        return _resume(spec, cfg)
    import pipeline

    assert spec.get("tree", "") in ("", str(Path(pipeline.__file__).resolve().parent.parent)), "wrong tree"
    for module in IMPORTS[loader]:
        __import__(module)
    t0 = time.perf_counter()
    first = None
    batches: list[list[int]] = []
    if loader.startswith("project"):
        backend = "dali" if loader == "project-dali" else "torch"
        it = _project_loader(spec, cfg, backend)
        expected = it.steps_per_epoch * spec["batch"]
        for _ in it:
            first = first or time.perf_counter()
            batches.append(list(it.last_ids))
    else:
        expected = spec["dataset"]["samples"]
        for batch in PEERS[loader](spec, cfg):
            held = _finish(batch, cfg)  # noqa: F841 - alive until the next batch is made
            first = first or time.perf_counter()
            batches.append(batch["ids"])
    end = time.perf_counter()
    check = _exactly_once(batches, expected)
    return {
        "samples": check["seen"],
        "seconds": end - t0,
        "samples_per_s": check["seen"] / (end - t0),
        "first_batch_s": (first or end) - t0,
        "exactly_once": check,
    }


def _resume(spec: dict, cfg) -> dict:
    """spec["resume"] "first": half an epoch and the loader's state; "rest": a new loader from spec["state"]
    finishes the epoch. Two processes, as a job killed and restarted."""
    epoch = _project_epoch if spec["loader"].startswith("project") else _peer_epoch
    first = spec["resume"] == "first"
    batches, state, expected = epoch(spec, cfg, first, None if first else spec["state"])
    return {"ids": batches, "state": state if first else None, "expected": expected}


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON: {type(o)}")


# ---------------------------------------------------------------- the parent: store, proxy, rounds


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def tree_pss_kb(pid: int) -> int:
    """PSS (kB) of pid and its descendants, from /proc/PID/smaps_rollup."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        todo += _children(p)
    return total


def run_child(spec: dict, endpoint: str, log_path: Path) -> dict:
    """measure(spec) in a fresh interpreter whose S3 endpoint is `endpoint`; adds its tree's peak PSS.
    Its stderr goes to log_path; a failure's error holds the log's last lines."""
    import pipeline

    env = dict(os.environ)
    # the same pipeline package as this process, or the tree under comparison
    root = spec.get("tree") or str(Path(pipeline.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(AWS_ENDPOINT_URL=endpoint, S3_ENDPOINT_URL=endpoint)
    env["MFM_CACHE"] = os.path.join(spec["cache_dir"], "mfm")  # the project's default caches: fresh too
    for k, v in MOTO_ENV.items():
        env.setdefault(k, v)
    # this file run by path with the tree as working directory: `pipeline` is the tree's (which may not have
    # this benchmark), the harness this one
    run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", run, str(Path(__file__).resolve()), "_measure", json.dumps(spec)]
    peak = 0
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=log, preexec_fn=_dies_with_this_process()
        )
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while proc.poll() is None:
            peak = max(peak, tree_pss_kb(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.1)
        reader.join()
    lines = b"".join(out).decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-40:] or ["no output"]
        print("\n".join(tail), file=sys.stderr)
        return {"error": f"exit {proc.returncode}: {tail[-1][:300]}"}
    result = json.loads(lines[-1])
    result["peak_pss_mb"] = peak / 1024
    return result


def _dies_with_this_process():
    """A preexec_fn: the child is killed when this process dies (Linux), a killed benchmark leaves no moto
    server or measurement behind."""
    import functools

    from pipeline.processes import die_with_parent

    return functools.partial(die_with_parent, os.getpid())


class _Moto:
    """moto's S3 server in its own process (so the proxy and the server do not share a GIL)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_dies_with_this_process(),
        )
        for _ in range(200):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            time.sleep(0.05)
        self.close()
        raise RuntimeError("moto server did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Case:
    loader: str
    workers: int
    workload: str
    proxy: str  # "on": latency + bandwidth cap, "off": counting only
    tree: str = ""  # the project's loaders: another source tree's (--compare-tree), "" this one's


def _label(loader: str, tree: str = "") -> str:
    return LABELS[loader] + (f" @ {Path(tree).name}" if tree else "")


def _available(loader: str) -> str | None:
    """None, or why the loader cannot run here."""
    import importlib.util

    module = {"project-dali": "nvidia.dali", "webdataset": "webdataset", "mds": "streaming", "litdata": "litdata"}
    name = module.get(loader)
    if name is None:
        return None
    try:
        __import__(name)
    except Exception as e:  # noqa: BLE001 - an import that fails for any reason is the reason to show
        return (
            f"{name} does not import: {type(e).__name__}: {e}"
            if importlib.util.find_spec(name.split(".")[0])
            else (f"{name} is not installed (pip install 'mfm-pipeline[bench]')")
        )
    return None


def run(args) -> dict:
    import boto3

    work = Path(tempfile.mkdtemp(prefix="mfm-bench-stream-", dir=args.work_dir))
    moto = None if args.endpoint else _Moto()
    endpoint = args.endpoint or moto.url
    for k, v in MOTO_ENV.items():
        os.environ.setdefault(k, v)
    from pipeline.benchmarks.s3proxy import CountingProxy

    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            s3.create_bucket(Bucket=BUCKET)
        root = f"s3://{BUCKET}/stream-{time.time_ns()}"
        width, height = args.size
        t = time.perf_counter()
        data = write_datasets(work / "data", root, args.images, width, height, args.shards, endpoint)
        print(
            f"data: {data.samples} JPEGs {width}x{height}, {data.jpeg_mb:.1f} MB; shards (files, MB): "
            + ", ".join(f"{k} {n}, {mb:.1f}" for k, (n, mb) in data.shards.items())
            + f"; written in {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
        skipped = {name: why for name in args.loaders if (why := _available(name))}
        loaders = [name for name in args.loaders if name not in skipped]
        for name, why in skipped.items():
            print(f"{name}: skipped, {why}", file=sys.stderr)
        cases = [
            Case(loader, w, wl, px)
            for px in args.proxy
            for wl in args.workloads
            for w in args.workers
            for loader in loaders
            if not (loader == "project-dali" and wl == "io")  # DALI decodes: no raw-bytes path
        ]
        for tree in args.compare_tree:  # the same cases with another tree's loader, interleaved with ours
            cases += [
                Case(c.loader, c.workers, c.workload, c.proxy, tree)
                for c in cases
                if c.loader.startswith("project") and not c.tree
            ]
        proxies = {
            "on": CountingProxy(endpoint, latency_s=args.latency_ms / 1000, bandwidth_bps=args.bandwidth_mbps * 1e6),
            "off": CountingProxy(endpoint),
        }
        results: dict[Case, list[dict]] = {c: [] for c in cases}
        resume: dict[tuple[str, str], str] = {}
        try:
            for r in range(args.rounds):
                # interleaved: every case once per round, the order rotated so none always runs first
                k = r % max(1, len(cases))
                for c in cases[k:] + cases[:k]:
                    res = _one(c, data, args, proxies[c.proxy], work)
                    results[c].append(res)
                    _progress(r, c, res)
            if args.resume:
                for key in dict.fromkeys((c.loader, c.tree) for c in cases):
                    resume[key] = _resume_check(*key, data, args, proxies["off"], work)
                    print(f"resume check {_label(*key)}: {resume[key]}", file=sys.stderr)
        finally:
            for p in proxies.values():
                p.close()
        return _summary(cases, results, resume, skipped, data, args)
    finally:
        if moto is not None:
            moto.close()
        shutil.rmtree(work, ignore_errors=True)


def _spec(c: Case, data: Dataset, args, cache: Path) -> dict:
    return {
        "loader": c.loader,
        "workers": c.workers,
        "workload": c.workload,
        "batch": args.batch,
        "seed": args.seed,
        "dataset": asdict(data),
        "cache_dir": str(cache),
        "set": args.set,
        "tree": c.tree,
    }


def _one(c: Case, data: Dataset, args, proxy, work: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    proxy.reset()
    res = run_child(_spec(c, data, args, cache), proxy.url, work / "child.log")
    counts = proxy.counts()
    res.update(get=counts["GET"], head=counts["HEAD"], requests=counts["requests"], mb_read=counts["bytes"] / 1e6)
    shutil.rmtree(cache, ignore_errors=True)  # caches emptied between measurements
    return res


def _resume_check(loader: str, tree: str, data: Dataset, args, proxy, work: Path) -> str:
    """ "ok" when half an epoch in one process and the rest, from its saved state, in another see every
    sample of the epoch once; "n/a" for a loader without mid-epoch resume."""
    if loader not in RESUMABLE:
        return "n/a"
    case = Case(loader, 2, "decode" if loader == "project-dali" else "io", "off", tree)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # one node's cache, kept across the restart
    spec = _spec(case, data, args, cache)
    first = run_child({**spec, "resume": "first"}, proxy.url, work / "child.log")
    if "error" in first:
        return f"FAIL (first half: {first['error']})"
    rest = run_child({**spec, "resume": "rest", "state": first["state"]}, proxy.url, work / "child.log")
    shutil.rmtree(cache, ignore_errors=True)
    if "error" in rest:
        return f"FAIL (resumed: {rest['error']})"
    check = _exactly_once(first["ids"] + rest["ids"], first["expected"])
    return "ok" if check["ok"] else f"FAIL ({check['seen']} of {check['expected']}, {check['duplicates']} repeated)"


def _progress(r: int, c: Case, res: dict) -> None:
    if "error" in res:
        print(
            f"round {r + 1} {_label(c.loader, c.tree)} w{c.workers} {c.workload} proxy {c.proxy}: {res['error']}",
            file=sys.stderr,
        )
        return
    print(
        f"round {r + 1} {_label(c.loader, c.tree)} w{c.workers} {c.workload} proxy {c.proxy}: "
        f"{res['samples_per_s']:.0f} samples/s, "
        f"first batch {res['first_batch_s']:.2f} s, {res['get']} GET + {res['head']} HEAD, {res['mb_read']:.1f} MB, "
        f"PSS {res['peak_pss_mb']:.0f} MB, exactly once {res['exactly_once']['ok']}",
        file=sys.stderr,
    )


def _median(rs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rs if key in r]
    return statistics.median(vals) if vals else None


def _summary(cases, results, resume, skipped, data: Dataset, args) -> dict:
    rows = []
    for c in cases:
        rs = [r for r in results[c] if "error" not in r]
        rows.append(
            {
                **asdict(c),
                "rounds": len(rs),
                "errors": [r["error"] for r in results[c] if "error" in r],
                **{k: _median(rs, k) for k in MEDIANS},
                "exactly_once": bool(rs) and all(r["exactly_once"]["ok"] for r in rs),
                "exactly_once_detail": [r["exactly_once"] for r in rs],
                "resume": resume.get((c.loader, c.tree), "n/a" if c.loader not in RESUMABLE else "not run"),
            }
        )
    for row in rows:
        base = next(
            (
                b
                for b in rows
                if b["loader"] == "project"
                and not b["tree"]
                and (b["workers"], b["workload"], b["proxy"]) == (row["workers"], row["workload"], row["proxy"])
            ),
            None,
        )
        ours = base and base["samples_per_s"]
        row["vs_ours"] = row["samples_per_s"] / ours if ours and row["samples_per_s"] else None
    return {
        "data": asdict(data),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work_dir", "endpoint")},
        "skipped": skipped,
        "rows": rows,
    }


def markdown(summary: dict) -> str:
    s, d = summary["settings"], summary["data"]
    mb = d["shards"]["project"][1]
    out = []
    for px in s["proxy"]:
        for wl in s["workloads"]:
            rows = [r for r in summary["rows"] if r["proxy"] == px and r["workload"] == wl]
            if not rows:
                continue
            shaping = f"{s['latency_ms']:g} ms first byte, {s['bandwidth_mbps']:g} MB/s" if px == "on" else "no shaping"
            out += [
                f"{WORKLOADS[wl]}, proxy {px} ({shaping}), medians of {s['rounds']}:",
                "",
                f"| loader | workers | samples/s | vs ours | first batch | GET + HEAD | MB read ({_mb(mb)} MB of tars) "
                "| peak PSS | exactly once | resume |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            notes = []
            for r in sorted(rows, key=lambda r: (r["workers"], LOADERS.index(r["loader"]), r["tree"])):
                name = _label(r["loader"], r["tree"])
                if r["samples_per_s"] is None:
                    out.append(f"| {name} | {r['workers']} | failed: {r['errors'][0]} |")
                    continue
                if r["errors"]:
                    n = len(r["errors"])
                    notes.append(
                        f"{name}, {r['workers']} workers: {n} of {n + r['rounds']} rounds failed: {r['errors'][0]}"
                    )
                ratio = f"{r['vs_ours']:.2f}" if r["vs_ours"] else "-"
                out.append(
                    f"| {name} | {r['workers']} | {r['samples_per_s']:,.0f} | {ratio} "
                    f"| {r['first_batch_s']:.2f} s | {r['get']:.0f} + {r['head']:.0f} | {_mb(r['mb_read'])} "
                    f"| {r['peak_pss_mb']:,.0f} MB | {'yes' if r['exactly_once'] else 'NO'} | {r['resume']} |"
                )
            out += ["", *notes, ""] if notes else [""]
    for name, why in summary["skipped"].items():
        out.append(f"{LABELS[name]}: not measured, {why}")
    return "\n".join(out).rstrip() + "\n"


def _mb(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 500x375") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"--size {text!r}: at least 16x16")
    return w, h


def _choices(allowed, kind=str):
    def parse(text: str) -> list:
        vals = [kind(v) for v in text.split(",") if v]
        bad = [v for v in vals if allowed is not None and v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
        return vals

    return parse


def _workers(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected positive integers, e.g. 2,4")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mfm bench stream",
        description="Stream one epoch from S3 (moto behind a latency/bandwidth proxy) with the project's loader, "
        "webdataset, mosaicml-streaming and litdata. The issue's study: --images 4000 --size 500x375 --shards 9 "
        "--proxy on,off --rounds 3",
    )
    p.add_argument("--images", type=int, default=600, help="synthetic JPEGs (default 600)")
    p.add_argument("--size", type=_size, default=(250, 188), help="WIDTHxHEIGHT (default 250x188)")
    p.add_argument("--shards", type=int, default=9, help="shards (tars, MDS shards, litdata chunks) to aim for")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=_workers, default=[2, 4], help="loader workers, comma-separated (2,4)")
    p.add_argument("--loaders", type=_choices(LOADERS), default=list(LOADERS), help=",".join(LOADERS))
    p.add_argument("--workloads", type=_choices(tuple(WORKLOADS)), default=list(WORKLOADS), help="io,decode")
    p.add_argument("--proxy", type=_choices(("on", "off")), default=["on"], help="on (shaped), off, or on,off")
    p.add_argument("--latency-ms", type=float, default=20.0, help="proxy on: added first-byte latency")
    p.add_argument("--bandwidth-mbps", type=float, default=200.0, help="proxy on: cap, MB/s (10^6 bytes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="skip the resume checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides (all loaders)")
    p.add_argument(
        "--compare-tree",
        action="append",
        default=[],
        metavar="PATH",
        help="also run the project's loaders from this source tree (e.g. a branch's worktree), interleaved",
    )
    p.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto")
    p.add_argument("--work-dir", help="where the local copies and caches go (default: the system temp dir)")
    p.add_argument("--json", help="write the figures here")
    return p


def cli(argv: list[str]) -> int:
    if argv[:1] == ["_measure"]:  # a child measurement (run_child)
        print(json.dumps(measure(json.loads(argv[1])), default=_jsonable))
        return 0
    args = parser().parse_args(argv)
    for name, value, low in (("--images", args.images, 1), ("--shards", args.shards, 1), ("--batch", args.batch, 1)):
        if value < low:
            parser().error(f"{name} {value}: must be >= {low}")
    if args.rounds < 1:
        parser().error(f"--rounds {args.rounds}: must be >= 1")
    args.compare_tree = [str(Path(t).resolve()) for t in args.compare_tree]
    for tree in args.compare_tree:
        if not (Path(tree) / "pipeline" / "__init__.py").is_file():
            parser().error(f"--compare-tree {tree}: no pipeline package there")
    summary = run(args)
    text = markdown(summary)
    print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "markdown": text}, indent=1, default=_jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
