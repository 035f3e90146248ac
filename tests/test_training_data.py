"""A small loader obeying the batch contract (docs/architecture.md) for the training tests:
smooth synthetic images through the real corruption, drawn from a seeded generator whose seed
is the loader's position, so state_dict() / load_state_dict() resume it exactly.

The training processes import it as `test_training_data:build_train_loader` (the tests put
this folder on PYTHONPATH and set train.loader)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.corruptions import corrupt

POOL = 96  # distinct images: few enough that a few steps show learning


@dataclass
class Batch:
    encoder_input: torch.Tensor
    target: torch.Tensor
    keep: torch.Tensor | None


def _pool(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(POOL, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


class SyntheticLoader:
    def __init__(self, cfg, *, rank: int, world_size: int, micro_batch: int, device, steps_per_epoch: int = 12):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.micro_batch, self.device = micro_batch, device
        self.steps_per_epoch = steps_per_epoch
        self.images = _pool(cfg.model.img_size, cfg.train.seed)
        self.epoch = 0
        self.position = 0

    def _batch(self) -> Batch:
        seed = ((self.cfg.train.seed * 1000 + self.epoch) * 10_000 + self.position) * 64 + self.rank
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, POOL, (self.micro_batch,), generator=g)
        images = self.images[idx]
        flip = torch.rand(self.micro_batch, generator=g) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        enc, tgt, keep = corrupt(images, self.cfg.corruption, g)
        return Batch(enc.to(self.device), tgt.to(self.device), None if keep is None else keep.to(self.device))

    def __iter__(self):
        while self.position < self.steps_per_epoch:
            batch = self._batch()
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_train_loader(cfg, *, rank, world_size, micro_batch, device):
    return SyntheticLoader(cfg, rank=rank, world_size=world_size, micro_batch=micro_batch, device=device)


def write_manifest(folder: Path) -> str:
    """The launcher refuses to start without data.train/manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "split": "train", "num_samples": POOL,
                                                      "shards": []}))
    return str(folder)


def test_loader_resumes_where_it_stopped():
    from pipeline.config import load_config

    cfg = load_config("tiny_cpu")
    a = SyntheticLoader(cfg, rank=0, world_size=1, micro_batch=4, device="cpu")
    it = iter(a)
    first = [next(it) for _ in range(5)]
    b = SyntheticLoader(cfg, rank=0, world_size=1, micro_batch=4, device="cpu")
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(it).encoder_input, next(iter(b)).encoder_input)
    assert not torch.equal(first[0].encoder_input, first[1].encoder_input)
