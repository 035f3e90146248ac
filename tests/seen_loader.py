"""`train.loader=seen_loader:build` for tests: the real train loader, recording what it yields.

Each batch appends one JSON row to `$MFM_SEEN_DIR/<pid>-rank<R>.jsonl`: the epoch, the
layouts used earlier in it with their batch counts, the current layout, the batch's index
on it and the sample ids. A test replays them against the checkpoints that were kept."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from pipeline.data import build_train_loader


class Recording:
    def __init__(self, inner, path: Path):
        self.inner, self.path = inner, path

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        for batch in self.inner:
            st = self.inner.state
            row = {
                "epoch": st.epoch,
                "earlier": [[asdict(s.layout), s.batches] for s in st.segments[:-1]],
                "layout": asdict(st.segments[-1].layout),
                "index": st.segments[-1].batches - 1,
                "ids": list(self.inner.last_ids),
            }
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            yield batch


def build(cfg, *, rank: int, world_size: int, micro_batch: int, device):
    inner = build_train_loader(cfg, rank=rank, world_size=world_size, micro_batch=micro_batch, device=device)
    folder = Path(os.environ["MFM_SEEN_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return Recording(inner, folder / f"{os.getpid()}-rank{rank}.jsonl")
