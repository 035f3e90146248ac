"""Which sample each (rank, worker) reads, in which order: pure functions, no I/O.

A split is the manifest's shards with their sample counts; sample `id` is the running index
over the shards in manifest order. For each epoch one global order of ids is drawn from
(seed, epoch): the shards are permuted, then the concatenated samples are shuffled inside
consecutive windows of `shuffle_buffer` ids (a seeded shuffle buffer that keeps reads
sequential). Every rank slices that order deterministically, so no data has to be read to
know who sees what, and the slicing works for any number of shards.

Remainder policy: drop-last at the global level. An epoch on a layout of `world_size` ranks
of `micro_batch` samples has `len(order) // (world_size * micro_batch)` batches on every rank;
the tail of the order is not seen that epoch (it differs every epoch).

Which draws an epoch keeps is the order's business; who reads them is dealt by shard. The
kept draws are laid out shard by shard (shards in a seeded order, each in file order) and cut
into one run per reader (rank x worker, rank-major) of exactly its batches' size, so each
shard is read by one reader, in one pass, except the at most readers - 1 shards a cut falls
in: a reader starts with the head of the shard it shares with the next reader and ends with the
rest of the one it shares with the reader before, drawn once its other shards are done (that
rest starts deep in its file; through the cache it waits for the other reader's download). Each
reader's stream then draws from INTERLEAVE of its shards at once (the next draw from
a shard chosen with probability proportional to what is left of it) through a seeded shuffle
buffer of `shuffle_buffer` samples that starts yielding after INITIAL (as webdataset's
shuffle): its first batch needs the first samples of a few shards, never whole shards read one
after another. Batch j of a rank comes from its reader j % W.

Resume across a layout change: the state records, for the current epoch, each layout used
and how many batches each rank consumed on it. The samples not consumed yet, in the
epoch's order (including the previous layout's dropped tail), are re-dealt on the new
layout with the same drop-last rule: the epoch is finished on the new layout, no sample is
seen twice, and the new layout's remainder is dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
INTERLEAVE = 4  # shards a reader's stream draws from at once
INITIAL = 100  # samples in a reader's shuffle buffer before its first draw


@dataclass(frozen=True)
class Layout:
    """How an epoch is cut: ranks in the world, samples per rank batch, readers per rank."""

    world_size: int
    micro_batch: int
    workers: int = 1

    def __post_init__(self):
        if self.world_size < 1 or self.micro_batch < 1 or self.workers < 1:
            raise ValueError(f"invalid layout {self}: world_size, micro_batch and workers must be >= 1")


@dataclass
class Segment:
    layout: Layout
    batches: int = 0  # batches each rank consumed on this layout


@dataclass
class SamplerState:
    """Explicit resumable position: the epoch and the batches consumed on each layout used in it."""

    seed: int
    epoch: int = 0
    segments: list[Segment] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "segments": [{**asdict(s.layout), "batches": s.batches} for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SamplerState:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {d.get('version')!r} is not {STATE_VERSION}")
        segs = [Segment(Layout(s["world_size"], s["micro_batch"], s["workers"]), s["batches"]) for s in d["segments"]]
        return cls(seed=d["seed"], epoch=d["epoch"], segments=segs)

    def use_layout(self, layout: Layout) -> None:
        """Continue the epoch on `layout`; a changed layout starts a new segment."""
        if self.segments and self.segments[-1].layout == layout:
            return
        if self.segments and self.segments[-1].batches == 0:
            self.segments.pop()
        self.segments.append(Segment(layout))

    def next_epoch(self) -> None:
        layout = self.segments[-1].layout if self.segments else None
        self.epoch += 1
        self.segments = [Segment(layout)] if layout else []


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): cheap, stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def epoch_order(counts: list[int], *, seed: int, epoch: int, shuffle_buffer: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's global order of sample ids (int64)."""
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    if not shuffle:
        return np.arange(offsets[-1], dtype=np.int64)
    rng = np.random.default_rng(mix_seed(seed, epoch, 0x5AD))
    perm = rng.permutation(len(counts))
    parts = [np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in perm]
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if shuffle_buffer > 1:
        for start in range(0, len(order), shuffle_buffer):
            rng.shuffle(order[start : start + shuffle_buffer])  # in place on the view
    return order


@dataclass(frozen=True)
class Mix:
    """Several sources in one epoch (`data.train` as a list). The combined split holds source s's
    shards as `shards[s]` consecutive entries, in source order; source s gets `weights[s]` of
    each epoch's `epoch_samples` draws (default: all sources' samples together).

    Like mosaicml streaming's Stream(proportion=...): a source whose share is smaller than it
    is sampled without replacement, a larger share repeats it. Each source is read as an
    endless stream of passes (each pass: every sample once, in that source's own seeded
    shard-and-buffer shuffle) and epoch e takes the next `share` draws of it, so no sample is
    drawn twice before every sample of its source has been drawn once, across epochs too.
    The sources' draws are then interleaved by a seeded shuffle of source labels."""

    shards: tuple[int, ...]
    weights: tuple[float, ...]
    epoch_samples: int | None = None

    def __post_init__(self):
        w = self.weights
        if not w or len(w) != len(self.shards) or not all(math.isfinite(x) and x > 0 for x in w):
            raise ValueError(f"mix weights {w}: one finite, positive weight per source ({len(self.shards)})")

    def sizes(self, counts: list[int]) -> list[int]:
        bounds = np.concatenate([[0], np.cumsum(self.shards)])
        if bounds[-1] != len(counts):
            raise ValueError(f"mix of {bounds[-1]} shards for a split of {len(counts)}")
        return [int(sum(counts[bounds[s] : bounds[s + 1]])) for s in range(len(self.shards))]

    def shares(self, counts: list[int]) -> np.ndarray:
        """Draws per source per epoch: largest-remainder rounding of the weights (pure)."""
        total = self.epoch_samples or sum(self.sizes(counts))
        w = np.asarray(self.weights, dtype=np.float64)
        w = w / w.max()  # relative weights: scaled first, so that 1e308 + 1e308 cannot overflow
        exact = total * (w / w.sum())
        out = np.floor(exact).astype(np.int64)
        rest = total - int(out.sum())
        out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
        return out


def source_draws(
    counts: list[int], *, seed: int, source: int, start: int, length: int, shuffle_buffer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draws [start, start + length) of one source's endless stream of passes: (local ids, the
    repeat of each draw within these draws: 0 for the first pass they touch, 1 for the next...)."""
    n = int(sum(counts))
    if length == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first, last = start // n, (start + length - 1) // n
    passes = [
        epoch_order(counts, seed=mix_seed(seed, 0x50, source), epoch=p, shuffle_buffer=shuffle_buffer)
        for p in range(first, last + 1)
    ]
    skip = start - first * n
    ids = np.concatenate(passes)[skip : skip + length]
    return ids, (np.arange(start, start + length, dtype=np.int64) // n) - first


def mixed_epoch_order(counts: list[int], mix: Mix, *, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The epoch's global order over the combined split. Where a share exceeds its source, the
    repeats are encoded as id + k * (samples in the split), k = 1, 2, ...: unique ids."""
    sizes, shares = mix.sizes(counts), mix.shares(counts)
    bounds = np.concatenate([[0], np.cumsum(mix.shards)])
    base = np.concatenate([[0], np.cumsum(sizes)])
    rng = np.random.default_rng(mix_seed(seed, epoch, 0x313))
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), shares))
    order = np.empty(len(labels), dtype=np.int64)
    for s, share in enumerate(shares):
        local, repeat = source_draws(
            counts[bounds[s] : bounds[s + 1]],
            seed=seed,
            source=s,
            start=epoch * int(share),
            length=int(share),
            shuffle_buffer=shuffle_buffer,
        )
        # A repeated draw is id + repeat * total: the same sample (Split.locate takes ids modulo
        # the split's size) with its own per-sample seed, so an upsampled source's repeats in one
        # epoch are different views, not copies.
        order[labels == s] = local + base[s] + repeat * base[-1]
    return order


def deal(
    order: np.ndarray,
    layout: Layout,
    rank: int,
    *,
    counts: list[int] | None = None,
    seed: int = 0,
    shuffle_buffer: int = 0,
    drop_last: bool = True,
) -> np.ndarray:
    """The rank's batches for `order` over a split of shards of `counts` samples:
    (num_batches, micro_batch) ids, batch j from reader j % W, each reader streaming whole shards
    (see the module's docstring); `seed` draws the shard order and the readers' shuffles.

    With drop_last=False (evaluation) the ranks split the order into contiguous parts that
    differ by at most one sample and the last batch of a rank may be short; the result is then
    a list of arrays.
    """
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} is outside world_size {layout.world_size}")
    b = layout.micro_batch
    if not drop_last:
        part = np.array_split(order, layout.world_size)[rank]
        return [part[i : i + b] for i in range(0, len(part), b)]
    return np.asarray(order)[_dealt(order, layout, rank, counts, seed, shuffle_buffer)]


def _dealt(order, layout: Layout, rank: int, counts, seed: int, shuffle_buffer: int) -> np.ndarray:
    """deal's batches as positions in `order`."""
    b, w = layout.micro_batch, layout.workers
    order = np.asarray(order, dtype=np.int64)
    counts = counts if counts is not None else [len(order)]
    nb = len(order) // (layout.world_size * b)
    kept = order[: nb * layout.world_size * b]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    local = kept % offsets[-1]
    shard = np.searchsorted(offsets, local, side="right") - 1
    place = np.random.default_rng(mix_seed(seed, 0x5D)).permutation(len(counts))
    line = np.lexsort((kept // offsets[-1], local, place[shard]))  # positions, shard by shard
    quota = [len(range(r, nb, w)) * b for r in range(w)]
    start = rank * nb * b
    out = np.empty((nb, b), dtype=np.int64)
    for reader in range(w):
        run, rest = _cut_shards_outward(line, shard, start, start + quota[reader])
        rng = np.random.default_rng(mix_seed(seed, rank, reader, 0x4EAD))
        stream = run[_reader_order(shard[run], rng, shuffle_buffer, rest_last=rest)]
        out[reader::w] = stream.reshape(-1, b)
        start += quota[reader]
    return out


def _cut_shards_outward(line: np.ndarray, shard: np.ndarray, start: int, end: int) -> tuple[np.ndarray, bool]:
    """(the run line[start:end] with the head of a shard that the next run takes the rest of
    first and the rest of a shard that the run before began last, whether it has such a rest):
    the head is at the start of its file; the rest, read early, would wait for the bytes before
    it (through the cache: the other reader's download of the whole shard)."""
    run = line[start:end]
    s = shard[run]
    bounds = [0, *(np.flatnonzero(np.diff(s)) + 1).tolist(), len(run)]
    if len(bounds) < 3:  # one shard: nothing to move
        return run, False
    pieces = [run[a:b] for a, b in zip(bounds, bounds[1:])]
    rest = bool(start > 0 and shard[line[start - 1]] == s[0])  # the first piece ends a shard begun before
    begun = bool(end < len(line) and shard[line[end]] == s[-1])  # the last piece begins one finished after
    middle = pieces[int(rest) : len(pieces) - int(begun)]
    return np.concatenate(pieces[-1:] * begun + middle + pieces[:1] * rest), rest


def _reader_order(
    shard: np.ndarray, rng: np.random.Generator, shuffle_buffer: int, rest_last: bool = False
) -> np.ndarray:
    """A reader's order of its run (positions into `shard`, grouped by shard): INTERLEAVE shards
    at a time, then the shuffle buffer. rest_last: the last shard joins once the others are done."""
    n = len(shard)
    pieces = np.split(np.arange(n), np.flatnonzero(np.diff(shard)) + 1) if n else []
    merged = np.empty(n, dtype=np.int64)
    draws = rng.random(n)
    active: list[list[int]] = []  # [piece, next position in it]
    nxt = 0
    for t in range(n):
        while len(active) < INTERLEAVE and nxt < len(pieces) - (rest_last and bool(active)):
            active.append([nxt, 0])
            nxt += 1
        left = [len(pieces[p]) - c for p, c in active]
        x, k = draws[t] * sum(left), 0
        while k < len(left) - 1 and x >= left[k]:
            x -= left[k]
            k += 1
        p, c = active[k]
        merged[t] = pieces[p][c]
        active[k][1] += 1
        if active[k][1] == len(pieces[p]):
            active.pop(k)
    if shuffle_buffer <= 1:
        return merged
    out = np.empty(n, dtype=np.int64)
    picks = rng.random(n)
    initial = min(shuffle_buffer, INITIAL)
    buf: list[int] = []
    src, got = 0, 0

    def pick():
        nonlocal got
        k = int(picks[got] * len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        out[got] = buf.pop()
        got += 1

    while src < n:
        # as webdataset's shuffle: two in per draw until the buffer is full, then one
        buf.append(merged[src])
        src += 1
        if len(buf) < shuffle_buffer and src < n:
            buf.append(merged[src])
            src += 1
        if len(buf) >= initial:
            pick()
    while buf:
        pick()
    return out


def remaining_order(
    order: np.ndarray,
    segments: list[Segment],
    *,
    counts: list[int] | None = None,
    seed: int = 0,
    shuffle_buffer: int = 0,
) -> np.ndarray:
    """`order` without what every rank consumed on the given (earlier) segments (by position in
    the order, which needs no unique ids), dealt as `deal` deals them."""
    pos = np.arange(len(order), dtype=np.int64)
    for seg in segments:
        if seg.batches == 0:
            continue
        sub = np.asarray(order)[pos]
        consumed = np.concatenate(
            [
                _dealt(sub, seg.layout, r, counts, seed, shuffle_buffer)[: seg.batches].ravel()
                for r in range(seg.layout.world_size)
            ]
        )
        pos = np.delete(pos, consumed)
    return np.asarray(order)[pos]


def rank_plan(
    counts: list[int],
    state: SamplerState,
    rank: int,
    *,
    shuffle_buffer: int,
    shuffle: bool = True,
    mix: Mix | None = None,
) -> np.ndarray:
    """All batches of the rank for the current segment of the state's epoch (consumed ones included)."""
    if mix is not None and len(mix.shards) > 1:
        order = mixed_epoch_order(counts, mix, seed=state.seed, epoch=state.epoch, shuffle_buffer=shuffle_buffer)
    else:
        order = epoch_order(counts, seed=state.seed, epoch=state.epoch, shuffle_buffer=shuffle_buffer, shuffle=shuffle)
    seed = mix_seed(state.seed, state.epoch, 0xDEA1)
    order = remaining_order(order, state.segments[:-1], counts=counts, seed=seed, shuffle_buffer=shuffle_buffer)
    return deal(order, state.segments[-1].layout, rank, counts=counts, seed=seed, shuffle_buffer=shuffle_buffer)


def reader_batches(num_batches: int, start: int, workers: int, reader: int) -> range:
    """Batch indices reader `reader` produces when a run (re)starts at batch `start`.

    Reader r takes start + r, start + r + W, ...: the rest of one original reader's stream, and
    a round-robin over the readers gives back the batches in order.
    """
    return range(start + reader, num_batches, workers)
