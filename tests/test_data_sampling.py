"""The pure assignment: exactly-once, equal batch counts, determinism, layout changes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sampling import (
    Layout,
    SamplerState,
    deal,
    epoch_order,
    mix_seed,
    rank_plan,
    reader_batches,
    remaining_order,
)


def _all_batches(counts, state, world):
    return [rank_plan(counts, state, r, shuffle_buffer=7) for r in range(world)]


@pytest.mark.parametrize("counts", [[10, 13, 7, 11], [41], [3, 2]])  # [41], [3, 2]: fewer shards than 2 x 2 readers
def test_exactly_once_and_equal_batches(counts):
    layout = Layout(world_size=2, micro_batch=3, workers=2)
    state = SamplerState(seed=5)
    state.use_layout(layout)
    plans = _all_batches(counts, state, 2)
    n = sum(counts)
    nb = n // 6
    assert [len(p) for p in plans] == [nb, nb]
    seen = np.concatenate([p.ravel() for p in plans])
    assert len(seen) == len(set(seen.tolist())) == nb * 6  # each sample at most once, only the global tail dropped
    # the dropped tail is less than one global batch and is the end of the epoch's order
    order = epoch_order(counts, seed=5, epoch=0, shuffle_buffer=7)
    assert set(seen.tolist()) == set(order[: nb * 6].tolist())


def test_readers_cover_the_rank_in_order():
    plan = deal(np.arange(40), Layout(1, 2, 3), 0, counts=[40])
    for start in (0, 1, 5):
        got = []
        iters = [iter(reader_batches(len(plan), start, 3, r)) for r in range(3)]
        while iters:  # a DataLoader's round-robin over its workers
            for it in list(iters):
                j = next(it, None)
                if j is None:
                    iters.remove(it)
                else:
                    got.append(j)
        assert got == list(range(start, len(plan)))


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 4)])
def test_each_shard_is_read_by_one_reader_but_where_a_reader_s_run_is_cut(world, workers):
    counts = [30, 25, 41, 33, 28, 37, 30, 26]
    layout = Layout(world_size=world, micro_batch=4, workers=workers)
    state = SamplerState(seed=3)
    state.use_layout(layout)
    offsets = np.cumsum([0, *counts])
    readers_of = {}  # shard -> the readers that read some of it
    for rank in range(world):
        plan = rank_plan(counts, state, rank, shuffle_buffer=50)
        for w in range(workers):
            stream = plan[w::workers].ravel()
            for s in set((np.searchsorted(offsets, stream, side="right") - 1).tolist()):
                readers_of.setdefault(s, set()).add((rank, w))
            # shuffled across the shards in flight: the stream is not in file order
            assert len(stream) < 2 or (np.diff(stream) != 1).any()
    # each cut between two readers' runs adds one reader to one shard
    assert sum(len(r) for r in readers_of.values()) <= len(counts) + world * workers - 1
    # a reader's first batch draws from a few shards' first samples, not whole shards one after another
    first = rank_plan(counts, state, 0, shuffle_buffer=50)[0]
    assert (first - offsets[np.searchsorted(offsets, first, side="right") - 1]).max() < 60


def test_order_is_seeded_and_changes_per_epoch():
    a = epoch_order([50, 50], seed=1, epoch=0, shuffle_buffer=10)
    assert (a == epoch_order([50, 50], seed=1, epoch=0, shuffle_buffer=10)).all()
    assert not (a == epoch_order([50, 50], seed=1, epoch=1, shuffle_buffer=10)).all()
    assert not (a == epoch_order([50, 50], seed=2, epoch=0, shuffle_buffer=10)).all()
    assert sorted(a.tolist()) == list(range(100))
    assert not (a[:10] == np.sort(a[:10])).all()  # the buffer shuffles inside a window


def test_state_round_trip_and_next_epoch():
    st = SamplerState(seed=3)
    st.use_layout(Layout(2, 4, 2))
    st.segments[-1].batches = 5
    back = SamplerState.from_dict(st.to_dict())
    assert back == st
    back.next_epoch()
    assert back.epoch == 1 and back.segments == [type(st.segments[0])(Layout(2, 4, 2), 0)]
    with pytest.raises(ValueError, match="version"):
        SamplerState.from_dict({**st.to_dict(), "version": 99})


def test_world_size_change_finishes_the_epoch_without_repeats():
    counts = [17, 23, 9]
    old = Layout(world_size=4, micro_batch=2, workers=2)
    st = SamplerState(seed=0)
    st.use_layout(old)
    k = 3
    consumed = np.concatenate([p[:k].ravel() for p in _all_batches(counts, st, 4)])
    st.segments[-1].batches = k
    st.use_layout(Layout(world_size=3, micro_batch=2, workers=1))  # a resumed run on 3 ranks
    rest = np.concatenate([p.ravel() for p in _all_batches(counts, st, 3)])
    both = np.concatenate([consumed, rest]).tolist()
    assert len(both) == len(set(both))
    left = remaining_order(
        epoch_order(counts, seed=0, epoch=0, shuffle_buffer=7),
        st.segments[:-1],
        counts=counts,
        seed=mix_seed(0, 0, 0xDEA1),
        shuffle_buffer=7,
    )
    assert len(left) == sum(counts) - len(consumed)
    assert len(left) - len(rest) < 3 * 2  # only the new layout's global remainder is dropped


def test_a_reader_reads_the_shard_it_shares_with_the_next_first_and_the_one_with_the_one_before_last():
    """Runs are cut from the shards laid end to end; a reader that began with the rest of a shard
    the reader before it began would wait for those earlier bytes at the start of the epoch."""
    from pipeline.data.sampling import _cut_shards_outward

    shard = np.repeat([7, 3, 5, 9], [4, 3, 3, 4])  # positions 0-13, shard by shard
    line = np.arange(len(shard))
    middle, rest = _cut_shards_outward(line, shard, 2, 12)  # the rest of 7, all of 3 and 5, the head of 9
    assert middle.tolist() == [10, 11, 4, 5, 6, 7, 8, 9, 2, 3] and rest
    assert _cut_shards_outward(line, shard, 0, 6)[0].tolist() == [4, 5, 0, 1, 2, 3]  # first run: no rest
    assert _cut_shards_outward(line, shard, 5, 14)[0].tolist() == [7, 8, 9, 10, 11, 12, 13, 5, 6]  # last run
    assert _cut_shards_outward(line, shard, 1, 3)[0].tolist() == [1, 2]  # inside one shard: as it was
    assert _cut_shards_outward(line, shard, 4, 10)[0].tolist() == [4, 5, 6, 7, 8, 9]  # whole shards only


def test_the_rest_of_a_shard_begun_by_another_reader_joins_last():
    from pipeline.data.sampling import _reader_order

    shard = np.repeat([4, 1, 6], 50)
    early = [
        int(np.argmax(shard[_reader_order(shard, np.random.default_rng(k), 0, rest_last=last)] == 6))
        for last in (False, True)
        for k in range(5)
    ]
    assert min(early[:5]) < 10 and early[5:] == [100] * 5  # interleaved from the start / after the others
