"""The loaders the trainer and the evaluation code hold: epoch bookkeeping, resumable state,
skip counters; the backends only turn a rank's plan into batches."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import torch_backend
from pipeline.data.sampling import Layout, Mix, SamplerState, deal, epoch_order, mix_seed, rank_plan
from pipeline.data.shards import Split, cache_folder, read_split
from pipeline.storage import is_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixedSplit(Split):
    """Several sources' shards as one split (data.train as a list), with how to draw them."""

    mix: Mix | None = None


class Batch(NamedTuple):
    """A pretraining batch on the training device: float32, normalised; keep None unless mfm."""

    encoder_input: torch.Tensor
    target: torch.Tensor
    keep: torch.Tensor | None


class LabelledBatch(NamedTuple):
    """A fine-tuning batch on the training device: float32 normalised images, int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise RuntimeError("data.backend is 'dali' but nvidia.dali is not installed; use data.backend=torch or auto")
    return name


class TrainLoader:
    """Iterating yields the rest of the current epoch for this rank, then the epoch advances.

    `steps_per_epoch` is the number of batches of a full epoch on this layout (what a schedule
    needs); `batches_left` what remains of the current one. `skipped` counts corrupt samples
    replaced on this rank since the loader was built, `skipped_keys` names the latest ones.
    """

    def __init__(
        self,
        cfg: Config,
        split: Split,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        device,
        backend: str | None = None,
        make: Callable | None = None,
    ):
        self.cfg, self.split, self.rank = cfg, split, rank
        self.device = torch.device(device)
        # `make` (RawBatch -> {"images", "labels"}, e.g. torch_backend.SeededLabelledBatches) runs
        # on the torch backend: it is arbitrary per-sample Python, which DALI cannot run fast
        self.make = make
        self.backend = "torch" if make is not None else resolve_backend(backend or cfg.data.backend)
        self.layout = Layout(world_size, micro_batch, max(1, cfg.data.workers))
        self.state = SamplerState(seed=cfg.train.seed)
        self.state.use_layout(self.layout)
        self.mix = getattr(split, "mix", None)
        full = len_epoch(split)
        self.steps_per_epoch = full // (world_size * micro_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{split.url}: {full} samples are fewer than one global batch ({world_size} ranks x {micro_batch})"
            )
        self.skipped = 0
        self.skipped_keys: list[str] = []
        self.last_ids: list[int] = []  # sample ids (manifest order) of the latest batch, for logs and tests
        self._dali = None  # the DALI pipeline, kept across epochs (dali_backend.Runner)
        self._pool: torch_backend.Workers | None = None  # torch backend: workers kept across epochs

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def batches_left(self) -> int:
        return len(self._plan()) - self.state.segments[-1].batches

    def __len__(self) -> int:
        return self.batches_left

    def _plan(self) -> np.ndarray:
        # the plan depends on the epoch and the earlier segments only: recompute when those change
        key = (
            self.state.seed,
            self.state.epoch,
            tuple((s.layout, s.batches) for s in self.state.segments[:-1]),
            self.state.segments[-1].layout,
        )
        if getattr(self, "_plan_key", None) != key:
            self._plan_cached = rank_plan(
                self.split.counts, self.state, self.rank, shuffle_buffer=self.cfg.data.shuffle_buffer, mix=self.mix
            )
            self._plan_key = key
        return self._plan_cached

    def state_dict(self) -> dict:
        out = {**self.state.to_dict(), "num_samples": self.split.num_samples, "skipped": self.skipped}
        if self.mix is not None:  # a resume must see the same sources, in the same proportions
            out["mix"] = {
                "shards": list(self.mix.shards),
                "weights": list(self.mix.weights),
                "epoch": len_epoch(self.split),
            }
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples") != self.split.num_samples:
            raise ValueError(
                f"{self.split.url}: loader state is for a split of {state.get('num_samples')} samples, "
                f"this one holds {self.split.num_samples}"
            )
        mine = self.state_dict().get("mix")
        if state.get("mix") != mine:
            raise ValueError(f"{self.split.url}: loader state is for the sources {state.get('mix')}, these are {mine}")
        st = SamplerState.from_dict(state)
        if st.seed != self.cfg.train.seed:
            log.warning(
                "loader state has seed %d, config train.seed is %d: continuing with the state's",
                st.seed,
                self.cfg.train.seed,
            )
        st.use_layout(self.layout)  # a new world size / batch / workers finishes the epoch on the new layout
        self.state = st
        self.skipped = int(state.get("skipped", 0))
        self._roll()

    def _roll(self) -> np.ndarray:
        """The current plan, first moving to the next epoch when nothing is left of this one (a
        state saved after an epoch's last batch, or a layout change with less than a global
        batch left), so that iterating never yields an empty epoch."""
        plan = self._plan()
        if self.state.segments[-1].batches >= len(plan):
            self.state.next_epoch()
            plan = self._plan()
        return plan

    def _outputs(self, plan: np.ndarray, start: int) -> Iterator[dict]:
        if self.backend == "dali":
            from pipeline.data import dali_backend

            if self._dali is None or not self._dali.expects(self.epoch, start):
                later = dali_backend.LaterEpochs(
                    tuple(self.split.counts),
                    self.state.seed,
                    self.layout,
                    self.rank,
                    self.cfg.data.shuffle_buffer,
                    self.mix,
                )
                cfg = self._dali_config()
                source = dali_backend.BatchSource(self.split, cfg, plan, start, self.epoch, later)
                self._dali = None  # the old pipeline and its workers go before new ones start
                self._dali = dali_backend.Runner(source, cfg, workers=self.layout.workers, device=self.device)
            return self._dali.batches(plan, self.epoch, start)
        make = self.make or torch_backend.PretextBatches(self.cfg)
        pin = self.device.type == "cuda"
        if self.cfg.data.workers:
            self._pool = torch_backend.workers_for(
                self._pool, self.split, self.cfg, self.layout.workers, make, pin_memory=pin, augment=True
            )
        return torch_backend.iterate(
            self.split,
            self.cfg,
            plan,
            start,
            self.layout.workers,
            self.epoch,
            make,
            workers=self.cfg.data.workers,
            pin_memory=pin,
            pool=self._pool,
        )

    def _dali_config(self) -> Config:
        """DALI's worker processes each take whichever batch comes next, so they share remote
        shards through the local cache: data.cache_dir, or while it is off the default one
        ($MFM_CACHE/shards: this user's, not a predictable name in the shared temporary folder),
        shared by this machine's ranks (each shard downloaded once), data.cache_limit_gb bounding it."""
        d = self.cfg.data
        if d.cache_dir is not None or all(is_local(s.url) for s in self.split.shards):
            return self.cfg
        folder = cache_folder("auto")
        return self.cfg.model_copy(update={"data": d.model_copy(update={"cache_dir": folder})})

    def __iter__(self) -> Iterator[Batch]:
        plan = self._roll()
        seg = self.state.segments[-1]
        for out in self._outputs(plan, seg.batches):
            if out["index"] != seg.batches:
                raise RuntimeError(f"loader produced batch {out['index']}, expected {seg.batches}")
            self.skipped += len(out["skipped"])
            self.skipped_keys = (self.skipped_keys + list(out["skipped"]))[-100:]
            self.last_ids = out["ids"].tolist()
            seg.batches += 1  # counted before the yield: a state taken now resumes after this batch
            if "labels" in out:
                yield LabelledBatch(
                    out["images"].to(self.device, torch.float32, non_blocking=True),
                    out["labels"].to(self.device, non_blocking=True),
                )
                continue
            if "views" in out:
                yield Batch(*torch_backend.corrupt_views(out, self.cfg, self.device))
                continue
            yield Batch(
                *(
                    None if out[k] is None else out[k].to(self.device, torch.float32, non_blocking=True)
                    for k in ("encoder_input", "target", "keep")
                )
            )
        if seg.batches >= len(plan):
            self.state.next_epoch()


class EvalLoader:
    """(images, labels) batches of a labelled split on this rank.

    Evaluation (train_augment=False): every sample exactly once across the ranks, in manifest
    order; ranks differ by at most one sample and the last batch may be short. Training
    (train_augment=True): shuffled per epoch, drop-last, equal batches, like TrainLoader.
    """

    def __init__(
        self,
        cfg: Config,
        split: Split,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        device,
        train_augment: bool = False,
        sample_transform: Callable | None = None,
    ):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.batch_size, self.device, self.train = batch_size, torch.device(device), train_augment
        self.make = torch_backend.LabelledBatches(cfg.model.img_size, train_augment, sample_transform)
        self.epoch = 0
        self.skipped = 0  # corrupt samples replaced (within their batch), as TrainLoader counts them
        self.skipped_keys: list[str] = []
        self._pool: torch_backend.Workers | None = None

    def _plan(self):
        order = epoch_order(
            self.split.counts,
            seed=self.cfg.train.seed,
            epoch=self.epoch,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            shuffle=self.train,
        )
        layout = Layout(self.world_size, self.batch_size, max(1, self.cfg.data.workers) if self.train else 1)
        plan = deal(
            order,
            layout,
            self.rank,
            counts=self.split.counts,
            seed=mix_seed(self.cfg.train.seed, self.epoch, 0xDEA1),
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            drop_last=self.train,
        )
        return plan, layout.workers

    def __len__(self) -> int:
        return len(self._plan()[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan, readers = self._plan()
        workers = self.cfg.data.workers if self.train else min(self.cfg.data.workers, 1)
        pin = self.device.type == "cuda"
        if workers:
            self._pool = torch_backend.workers_for(
                self._pool, self.split, self.cfg, readers, self.make, pin_memory=pin, augment=self.train
            )
        for out in torch_backend.iterate(
            self.split,
            self.cfg,
            plan,
            0,
            readers,
            self.epoch,
            self.make,
            workers=workers,
            pin_memory=pin,
            augment=self.train,
            pool=self._pool,
        ):
            self.skipped += len(out["skipped"])
            self.skipped_keys = (self.skipped_keys + list(out["skipped"]))[-100:]
            yield out["images"].to(self.device, non_blocking=True), out["labels"].to(self.device, non_blocking=True)
        self.epoch += 1


def len_epoch(split: Split) -> int:
    mix = getattr(split, "mix", None)
    return split.num_samples if mix is None else int(mix.shares(split.counts).sum())


def read_train_split(cfg: Config) -> Split:
    """data.train as one Split: a URL, or a list of sources combined (shards in source order)
    with the Mix that draws each in proportion to its weight."""
    from pipeline.config import train_sources

    sources = train_sources(cfg.data)
    if isinstance(cfg.data.train, str):
        return read_split(cfg.data.train, cfg.storage)
    splits = [read_split(s.url, cfg.storage) for s in sources]
    mix = Mix(tuple(len(s.shards) for s in splits), tuple(s.weight for s in sources), cfg.data.epoch_samples)
    combined = MixedSplit(
        "+".join(s.url for s in splits), tuple(sh for s in splits for sh in s.shards), splits[0].classes, mix
    )
    shares = mix.shares(combined.counts)
    for src, split, share in zip(sources, splits, shares):
        log.info(
            "data.train source %s: %d samples, weight %g -> %d draws per epoch (%.2fx its size)",
            src.url,
            split.num_samples,
            src.weight,
            share,
            share / split.num_samples,
        )
    return combined


def build_train_loader(
    cfg: Config, *, rank: int, world_size: int, micro_batch: int, device, backend: str | None = None
) -> TrainLoader:
    """The pretraining loader of cfg.data.train for one rank (see docs/architecture.md)."""
    return TrainLoader(
        cfg,
        read_train_split(cfg),
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        device=device,
        backend=backend,
    )


def build_labelled_train_loader(
    cfg: Config, *, rank: int, world_size: int, micro_batch: int, device, transform: Callable
) -> TrainLoader:
    """A resumable labelled loader of cfg.data.train yielding LabelledBatch: `transform` (PIL RGB
    image -> normalised float (3, S, S)) runs per sample with that sample's own seed, so the
    augmentation does not depend on rank, worker or resume (see SeededLabelledBatches)."""
    from pipeline.config import single_train_split

    return TrainLoader(
        cfg,
        read_split(single_train_split(cfg.data, "fine-tuning"), cfg.storage),
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        device=device,
        make=torch_backend.SeededLabelledBatches(transform),
    )


def build_eval_loader(
    cfg: Config,
    split_url: str,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    device,
    train_augment: bool = False,
    sample_transform: Callable | None = None,
) -> EvalLoader:
    """A labelled loader: evaluation views (resize S*256/224, centre crop S) or, with train_augment,
    RandomResizedCrop + flip, or any `sample_transform(PIL image) -> (3, S, S) in [0, 1]`."""
    return EvalLoader(
        cfg,
        read_split(split_url, cfg.storage),
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        device=device,
        train_augment=train_augment,
        sample_transform=sample_transform,
    )
