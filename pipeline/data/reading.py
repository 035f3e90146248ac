"""Raw batches for one reader: encoded bytes plus each sample's crop/flip/corruption params.

Corrupt samples: a sample whose bytes fail the header check (pipeline.data.augment.image_size)
is skipped, logged with its shard and key, counted, and its slot is filled with the next good
sample of the same batch (keeping the skipped sample's own random params). Batches therefore
keep their size and every rank its batch count, and a resumed run sees the same replacements.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.augment import CorruptSample, SampleParams, image_bytes, image_size, sample_params
from pipeline.data.shards import SampleReader, Split
from pipeline.jpeg import MAX_PIXELS

log = logging.getLogger(__name__)


@dataclass
class RawBatch:
    index: int  # batch index in the rank's epoch plan
    ids: list[int]
    data: list[bytes]
    params: list[SampleParams | None]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)  # "shard/key: reason"
    names: list[str] = field(default_factory=list)  # "shard/key" of each slot's bytes, for messages


def _label(sample: dict) -> int:
    raw = sample.get("cls")
    try:
        return int(raw) if raw is not None else -1
    except ValueError:
        return -1


def _name(split: Split, gid: int, sample: dict) -> str:
    return f"{split.shards[int(split.locate(np.array([gid]))[0][0])].name}/{sample.get('__key__')}"


def raw_batches(
    split: Split,
    plan: np.ndarray,
    batch_indices: range,
    reader: SampleReader,
    *,
    seed: int,
    epoch: int,
    scale: tuple[float, float] | None,
    max_pixels: int | None = MAX_PIXELS,
) -> Iterator[RawBatch]:
    """The batches `batch_indices` of `plan` ((num_batches, B) sample ids), read in order.
    scale None: no crop/flip/corruption params (evaluation views take none); params are None.
    max_pixels: the header check's limit (data.max_pixels)."""
    ids = np.concatenate([plan[j] for j in batch_indices]) if len(batch_indices) else np.zeros(0, np.int64)
    stream = reader.read(ids)
    for j in batch_indices:
        entries = [next(stream) for _ in range(len(plan[j]))]
        good, skipped = [], []
        for gid, sample in entries:
            try:
                data = image_bytes(sample)
                good.append((gid, data, image_size(data, max_pixels), _label(sample), _name(split, gid, sample)))
            except CorruptSample as e:
                msg = f"{_name(split, gid, sample)}: {e}"
                log.warning("skipping corrupt sample %s", msg)
                skipped.append(msg)
                good.append(None)
        ok = [g for g in good if g is not None]
        if not ok:
            raise ValueError(f"{split.url}: every sample of batch {j} is corrupt: {skipped}")
        batch = RawBatch(j, [], [], [], [], skipped)
        for pos, (gid, _) in enumerate(entries):
            src = good[pos]
            if src is None:  # the next good sample of the batch, wrapping around
                src = next(g for g in good[pos + 1 :] + good[:pos] if g is not None)
            _, data, (w, h), label, name = src
            batch.names.append(name)
            batch.ids.append(gid)
            batch.data.append(data)
            batch.params.append(sample_params(seed, epoch, gid, w, h, scale) if scale else None)
            batch.labels.append(label)
        yield batch
