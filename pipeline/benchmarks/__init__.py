"""Benchmarks: scripts that print figures as ratios against a baseline measured in the same run."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "kernels": "frequency ops: literal spec formulation vs ours (CPU, and GPU when present)",
    "data": "loader images/s per backend vs a PIL DataLoader baseline",
    "shard": "sharding MB/s and images/s vs plain tar and Pillow decode",
    "train": "training images/s under DeepSpeed ZeRO-1/2 vs PyTorch DDP",
    "registry": "load_model cold (download, verify) vs warm (local cache), light vs full install size",
    "plan": "one rank's epoch plan at ImageNet scale (world 512): time, memory, manifest load, S3 first batch",
    "checkpoint": "training stall per checkpoint to S3 over a slow link, blocking vs background",
    "summary": "an infra/gpu-checks.sh summary.json as the README's GPU table",
    "stream": "one epoch from S3 behind a latency/bandwidth proxy: ours vs webdataset, MDS, litdata",
}


def cli(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        rows = "\n".join(f"  {k:<10} {v}" for k, v in BENCHES.items())
        print(f"usage: mfm bench NAME [ARGS]\n\n{rows}", file=sys.stderr if argv else sys.stdout)
        return 2 if argv else 0
    return importlib.import_module(f"pipeline.benchmarks.{argv[0]}").cli(argv[1:]) or 0
