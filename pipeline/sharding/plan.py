"""The shard plan: which samples go to which shard, decided before any image is read (pure)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from pipeline.sharding.sources import Entry

# Per-sample bytes the tar adds around the image (3 headers, .cls, .json, padding).
TAR_OVERHEAD = 3 * 512 + 2 * 512 + 512


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    entries: tuple[Entry, ...]
    digest: str  # sha256 of what determines this shard's bytes: reuse it only if this matches

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    @property
    def index_name(self) -> str:
        return f"{self.split}-{self.index:06d}.idx"


def plan_shards(
    split: str,
    entries: list[Entry],
    classes: list[dict],
    *,
    seed: int,
    shard_size_mb: float,
    options: dict,
    start: int = 0,
    revision: int = 1,
) -> list[ShardPlan]:
    """Shuffle samples with the seed (independent of listing order) and cut into shards of
    about shard_size_mb of source bytes, numbered from `start`. A later revision of a growing
    split shuffles its new samples with its own stream."""
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb={shard_size_mb}: must be > 0")
    order = sorted(entries, key=lambda e: e.key)
    random.Random(f"mfm-shard:{seed}:{split}" + (f":r{revision}" if revision > 1 else "")).shuffle(order)
    limit = shard_size_mb * 1024 * 1024
    groups: list[list[Entry]] = []
    size = 0
    for e in order:
        if not groups or (size + e.size + TAR_OVERHEAD > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.size + TAR_OVERHEAD
    class_of = {c["wnid"]: c["index"] for c in classes}
    common = json.dumps({"options": options, "classes": classes}, sort_keys=True)
    plans = []
    for i, g in enumerate(groups):
        h = hashlib.sha256(common.encode())
        h.update("".join([f"{e.key}\t{e.file}\t{e.size}\t{class_of[e.wnid]}\n" for e in g]).encode())
        plans.append(ShardPlan(split, start + i, tuple(g), h.hexdigest()))
    return plans
