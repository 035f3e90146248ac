"""`mfm bench registry`: cold vs warm `load_model` of a ViT-B-sized export from an S3 endpoint
(moto's server on 127.0.0.1 unless --endpoint is given), and the light install's size against the
full one.

Cold: an empty cache, so the version is downloaded, verified and filled. Warm: the same version
again, from the cache (the manifest is still read from the store, the weights are not)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

TORCH_STACK = ("torch", "torchvision", "triton", "nvidia", "cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> str:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise SystemExit(
            "mfm bench registry: needs moto for a local S3 endpoint (the [dev] extra), or --endpoint URL"
        ) from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return f"http://127.0.0.1:{port}"


def _write_export(url: str, arch: str) -> int:
    """A random-weight export of `arch` (built on the meta device: no time spent on timm's init)."""
    import timm
    import torch
    from safetensors.torch import save

    from pipeline import storage

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) * 0.02 for k, v in model.state_dict().items()}
    data = save(state)
    storage.write_bytes(storage.join(url, "model.safetensors"), data)
    config = {"architecture": arch, "num_classes": 0, "num_features": model.num_features}
    storage.write_bytes(storage.join(url, "config.json"), json.dumps(config).encode())
    return len(data)


def _du(path: Path) -> dict[str, int]:
    """Bytes under a venv's site-packages: the torch stack apart from everything else."""
    out = {"torch stack": 0, "rest": 0}
    for site in path.glob("lib/python*/site-packages"):
        for entry in site.iterdir():
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if entry.is_dir() else 0
            size += entry.stat().st_size if entry.is_file() else 0
            out["torch stack" if entry.name.lower().startswith(TORCH_STACK) else "rest"] += size
    return out


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm bench registry", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture of the export")
    p.add_argument("--repeats", type=int, default=3, help="cold and warm loads each")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: a moto server started here)")
    p.add_argument("--bucket", default="mfm-bench")
    p.add_argument("--light-venv", type=Path, help="a venv with only `pip install mfm-pipeline`, to size it")
    args = p.parse_args(argv)

    import boto3

    from pipeline.registry import Registry, load_model

    endpoint = args.endpoint or _start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3 = boto3.client("s3", endpoint_url=endpoint)
    if args.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=args.bucket)
    prefix = f"s3://{args.bucket}/bench-{time.time_ns()}"
    size = _write_export(f"{prefix}/export", args.arch)
    reg = Registry(f"{prefix}/registry")
    reg.register("bench", f"{prefix}/export", aliases=("latest", "production"))
    print(f"{args.arch}: {size / 1e6:.0f} MB of weights on {endpoint} (under whatever load this machine has)")

    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="mfm-bench-cache-") as tmp:
        for i in range(args.repeats):
            os.environ["MFM_CACHE"] = str(Path(tmp) / f"cold-{i}")  # empty: a miss
            t0 = time.perf_counter()
            load_model("bench@production", registry=reg.url)
            cold.append(time.perf_counter() - t0)
            print(f"  cold {i + 1}: {cold[-1]:.2f}s", flush=True)
        for i in range(args.repeats):  # the last cold cache, now filled
            t0 = time.perf_counter()
            load_model("bench@production", registry=reg.url)
            warm.append(time.perf_counter() - t0)
            print(f"  warm {i + 1}: {warm[-1]:.2f}s", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"load_model cold {c:.2f}s ({size / 1e6 / c:.0f} MB/s), warm {w:.2f}s: warm is {c / w:.1f}x faster (median)")

    if args.light_venv:
        light, full = _du(args.light_venv), _du(Path(sys.prefix))
        for label, d in (("light", light), ("full", full)):
            print(
                f"{label} install: {sum(d.values()) / 1e9:.2f} GB "
                f"(torch stack {d['torch stack'] / 1e9:.2f} GB, everything else {d['rest'] / 1e9:.2f} GB)"
            )
        print(
            f"light/full: {sum(light.values()) / sum(full.values()):.2f} in all, "
            f"{light['rest'] / full['rest']:.2f} beside the torch stack"
        )
    return 0
