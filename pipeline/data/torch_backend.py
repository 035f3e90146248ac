"""The pure-PyTorch backend: DataLoader workers, each a reader of its run of the rank's batches,
Pillow decode + crop/resize (bicubic) + flip to uint8; the corruption (each sample's own seed)
then runs in the training process, on its device."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import Config
from pipeline.data.augment import (
    CorruptSample,
    corrupt_samples,
    corruption_threads,
    decode_rgb,
    eval_view,
    normalize,
    torch_threads,
    train_view,
)
from pipeline.data.reading import RawBatch, raw_batches
from pipeline.data.sampling import reader_batches
from pipeline.data.shards import SampleReader, Split

log = logging.getLogger(__name__)


@dataclass
class PretextBatches:
    """Raw batch -> {"views": uint8 (B, 3, S, S), "seeds": the corruption seeds}. The corruption
    runs after the batch reaches the training process (`corrupt_views`): a quarter of the bytes
    cross from the workers, and on a GPU the FFTs run there."""

    cfg: Config

    def __call__(self, raw: RawBatch) -> dict:
        size, down = self.cfg.model.img_size, self.cfg.data.downscale
        views = [
            _view_or_skip(raw, i, lambda: train_view(d, p, size, down, uint8=True))
            for i, (d, p) in enumerate(zip(raw.data, raw.params))
        ]
        views = fill_gaps(views, raw)
        return {
            "views": torch.stack(views),
            "seeds": torch.tensor([p.corruption_seed for p in raw.params], dtype=torch.int64),
        }


def _view_or_skip(raw: RawBatch, i: int, make: Callable):
    """make() for slot i, or None (logged and recorded in raw.skipped) when its bytes have a header
    that reads but a body that does not decode."""
    try:
        return make()
    except CorruptSample as e:
        name = raw.names[i] if i < len(raw.names) else f"sample {raw.ids[i]}"
        log.warning("skipping corrupt sample %s: %s", name, e)
        raw.skipped.append(f"{name}: {e}")
        return None


def _labelled(views: list, raw: RawBatch) -> tuple[list, list[int]]:
    """fill_gaps for labelled batches: a failed slot takes the next good view with its label."""
    slots = fill_gaps([i if v is not None else None for i, v in enumerate(views)], raw)
    return [views[j] for j in slots], [raw.labels[j] for j in slots]


def fill_gaps(views: list, raw: RawBatch) -> list:
    """Each failed slot takes the next good view of the batch (its own corruption seed stays)."""
    if all(v is None for v in views):
        raise ValueError(f"every sample of batch {raw.index} is corrupt: {raw.skipped}")
    n = len(views)
    return [
        v if v is not None else next(views[(i + k) % n] for k in range(1, n) if views[(i + k) % n] is not None)
        for i, v in enumerate(views)
    ]


def corrupt_views(out: dict, cfg: Config, device: torch.device) -> tuple:
    """(encoder_input, target, keep or None) on `device` from a PretextBatches output; on a CPU
    on the cores the DataLoader workers leave, as the DALI backend's corruption."""
    images = out["views"].to(device, non_blocking=True).float().div_(255)
    if device.type != "cpu":
        return corrupt_samples(images, cfg.corruption, out["seeds"].tolist())
    with torch_threads(corruption_threads(cfg.data.workers)):
        return corrupt_samples(images, cfg.corruption, out["seeds"].tolist())


@dataclass
class LabelledBatches:
    """Raw batch -> {"images" normalised, "labels"}: evaluation (resize + centre crop) or, with
    `transform` (PIL RGB image -> float (3, S, S) in [0, 1]), any training augmentation."""

    size: int
    train: bool = False
    transform: Callable | None = None

    def __call__(self, raw: RawBatch) -> dict:
        if self.transform is not None:
            make = lambda d, p: self.transform(decode_rgb(d))  # noqa: E731
        elif self.train:
            make = lambda d, p: train_view(d, p, self.size)  # noqa: E731
        else:
            make = lambda d, p: eval_view(d, self.size)  # noqa: E731
        views = [_view_or_skip(raw, i, lambda: make(d, p)) for i, (d, p) in enumerate(zip(raw.data, raw.params))]
        views, labels = _labelled(views, raw)
        return {"images": normalize(torch.stack(views)), "labels": torch.tensor(labels, dtype=torch.long)}


@contextlib.contextmanager
def seeded(seed: int):
    """Python, NumPy and torch RNGs seeded for the block, then put back as they were (transforms
    such as timm's RandAugment draw from all three global RNGs)."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU generator only: torch.manual_seed also queues a CUDA seed, and on a CUDA build
        # without an initialised GPU that records a stack trace each call (~1.7 ms, per sample)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


@dataclass
class SeededLabelledBatches:
    """Raw batch -> {"images", "labels"} with `transform` (PIL RGB -> normalised float (3, S, S),
    e.g. timm's create_transform(is_training=True)), drawing each sample's randomness from its
    own seed (mix_seed(seed, epoch, sample id)) as the pretraining views do."""

    transform: Callable

    def __call__(self, raw: RawBatch) -> dict:
        views = []
        for i, (data, p) in enumerate(zip(raw.data, raw.params)):
            with seeded(p.corruption_seed):
                views.append(_view_or_skip(raw, i, lambda: self.transform(decode_rgb(data))))
        views, labels = _labelled(views, raw)
        return {"images": torch.stack(views), "labels": torch.tensor(labels, dtype=torch.long)}


class PlanDataset(IterableDataset):
    """Yields the processed batches start.. of a rank's plan, reader w in DataLoader worker w."""

    def __init__(
        self,
        split: Split,
        cfg: Config,
        plan,
        start: int,
        readers: int,
        epoch: int,
        make: Callable[[RawBatch], dict],
        augment: bool = True,
        jobs: list | None = None,
    ):
        self.split, self.cfg, self.plan, self.start = split, cfg, plan, start
        self.readers, self.epoch, self.make, self.augment = readers, epoch, make, augment
        self.jobs = jobs  # persistent workers: one queue per reader handing it each (plan, start, epoch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        reader_id = info.id if info is not None else 0
        if self.jobs is not None:
            try:
                self.plan, self.start, self.epoch = self.jobs[reader_id].get(timeout=600)
            except queue.Empty:
                raise RuntimeError(f"{self.split.url}: loader worker {reader_id} got no epoch to read") from None
        readers = [reader_id] if info is not None else range(self.readers)
        d = self.cfg.data
        sr = SampleReader(
            self.split,
            self.cfg.storage,
            prefetch=d.prefetch_shards,
            cache_dir=d.cache_dir,
            cache_limit_gb=d.cache_limit_gb,
        )
        streams = [
            raw_batches(
                self.split,
                self.plan,
                reader_batches(len(self.plan), self.start, self.readers, r),
                sr,
                seed=self.cfg.train.seed,
                epoch=self.epoch,
                scale=tuple(d.crop_scale) if self.augment else None,
                max_pixels=d.max_pixels,
            )
            for r in readers
        ]
        # in-process (workers=0) with several readers: round-robin, as a DataLoader would
        while streams:
            for s in list(streams):
                raw = next(s, None)
                if raw is None:
                    streams.remove(s)
                    continue
                out = self.make(raw)
                out["index"], out["skipped"], out["ids"] = raw.index, raw.skipped, torch.tensor(raw.ids)
                yield out


class Workers:
    """DataLoader workers that live as long as the loader holding them (persistent_workers):
    each pass hands every worker its (plan, start, epoch) through a queue, instead of starting
    new processes per epoch, which dominates short epochs."""

    def __init__(self, split: Split, cfg: Config, readers: int, make, *, pin_memory: bool, augment: bool):
        self.key = (split.url, readers, pin_memory, augment)
        # the DataLoader's own start method (its default context), so the queues reach the workers
        self.jobs = [multiprocessing.get_context().Queue() for _ in range(readers)]
        ds = PlanDataset(split, cfg, None, 0, readers, 0, make, augment, jobs=self.jobs)
        self.loader = DataLoader(
            ds, batch_size=None, num_workers=readers, pin_memory=pin_memory, prefetch_factor=2, persistent_workers=True
        )

    def run(self, plan, start: int, epoch: int) -> Iterator[dict]:
        for q in self.jobs:
            q.put((plan, start, epoch))
        # iter() starts the workers once, then resumes them: each takes its job in __iter__; a
        # pass left unfinished is drained by the DataLoader before the next one starts
        yield from iter(self.loader)


def iterate(
    split: Split,
    cfg: Config,
    plan,
    start: int,
    readers: int,
    epoch: int,
    make,
    *,
    workers: int,
    pin_memory: bool = False,
    augment: bool = True,
    pool: Workers | None = None,
) -> Iterator[dict]:
    """`make`'s batches; augment=False draws no per-sample crop params (evaluation views).
    With workers, `pool` (from `workers_for`) keeps the worker processes across epochs."""
    if workers == 0:
        yield from PlanDataset(split, cfg, plan, start, readers, epoch, make, augment)
        return
    # DataLoader worker w is reader w and the DataLoader's round-robin over its workers gives
    # the batches back in plan order (see sampling.reader_batches)
    pool = pool or Workers(split, cfg, readers, make, pin_memory=pin_memory, augment=augment)
    yield from pool.run(plan, start, epoch)


def workers_for(pool: Workers | None, split: Split, cfg: Config, readers: int, make, **kw) -> Workers:
    """`pool` when it fits (same split, readers and options), else a new one (a layout change)."""
    key = (split.url, readers, kw.get("pin_memory", False), kw.get("augment", True))
    return pool if pool is not None and pool.key == key else Workers(split, cfg, readers, make, **kw)
