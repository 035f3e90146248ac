"""Several training sources in one epoch (data.train as a list with weights): shares within 1%
of the weights, each sample once within its share (a larger share repeats whole passes),
deterministic, and a resumed loader gives exactly the batches an uninterrupted one would."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from test_data_loader import epoch_ids
from test_data_shards import write_split

from pipeline.config import ConfigError, load_config
from pipeline.data import build_train_loader
from pipeline.data.sampling import Layout, Mix, SamplerState, mixed_epoch_order, rank_plan

BIG, NEW = [250] * 40, [100] * 10  # ImageNet-like and "the new week": 10,000 and 1,000 samples


def test_each_source_gets_its_share_of_what_the_ranks_see():
    mix = Mix((len(BIG), len(NEW)), (0.8, 0.2))
    counts = BIG + NEW
    layout = Layout(world_size=8, micro_batch=32, workers=4)
    state = SamplerState(seed=5)
    state.use_layout(layout)
    drawn = np.concatenate([rank_plan(counts, state, r, shuffle_buffer=500, mix=mix).ravel() for r in range(8)])
    assert len(np.unique(drawn)) == len(drawn)  # repeats are encoded: each draw its own id (and view)
    seen = drawn % sum(counts)
    share_new = np.mean(seen >= sum(BIG))
    assert abs(share_new - 0.2) <= 0.01 * 0.2, share_new  # within 1% of the weight (drop-last aside, exact)
    # the big source is subsampled: no sample twice in the epoch
    big = seen[seen < sum(BIG)]
    assert len(np.unique(big)) == len(big)
    # the small source is upsampled 2.2x: each sample 2 or 3 times in the epoch
    new = collections.Counter(seen[seen >= sum(BIG)].tolist())
    assert set(new.values()) <= {2, 3} and len(new) == sum(NEW)


def test_exactly_once_per_pass_across_epochs_and_deterministic():
    mix = Mix((len(BIG), len(NEW)), (0.8, 0.2))
    counts = BIG + NEW
    orders = [mixed_epoch_order(counts, mix, seed=1, epoch=e, shuffle_buffer=100) % 11000 for e in range(5)]
    assert all(len(o) == 11000 for o in orders)
    for e in range(5):
        assert np.sum(orders[e] >= 10000) == 2200
    # 5 epochs x 2200 draws of a 1000-sample source: 11 whole passes, each sample exactly 11 times
    new = collections.Counter(np.concatenate(orders)[np.concatenate(orders) >= 10000].tolist())
    assert set(new.values()) == {11}
    # 5 x 8800 draws of 10000: 4 passes and 4000 more; nobody a third time before everyone twice
    big = collections.Counter(np.concatenate(orders)[np.concatenate(orders) < 10000].tolist())
    assert set(big.values()) == {4, 5} and sum(v == 5 for v in big.values()) == 4000
    assert np.array_equal(orders[2], mixed_epoch_order(counts, mix, seed=1, epoch=2, shuffle_buffer=100) % 11000)
    assert not np.array_equal(orders[2], mixed_epoch_order(counts, mix, seed=2, epoch=2, shuffle_buffer=100) % 11000)
    # epoch_samples sets the epoch's length; the weights still split it
    short = Mix(mix.shards, mix.weights, epoch_samples=5000)
    assert list(short.shares(counts)) == [4000, 1000]


def _cfg(urls, *overrides):
    sources = "[" + ", ".join(f"{{url: {u}, weight: {w}}}" for u, w in urls) + "]"
    return load_config(
        None,
        [
            f"data.train={sources}",
            "model.img_size=32",
            "corruption.radius=4",
            "data.backend=torch",
            "data.shuffle_buffer=5",
            "data.prefetch_shards=1",
            *overrides,
        ],
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mixed_loader_resumes_exactly(tmp_path, workers):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_split(a, [6, 5, 7], size=(40, 30))
    write_split(b, [3], size=(40, 30))
    cfg = _cfg([(a, 0.6), (b, 0.4)], f"data.workers={workers}")
    build = lambda: build_train_loader(cfg, rank=1, world_size=2, micro_batch=2, device="cpu")  # noqa: E731
    ref = build()
    assert ref.steps_per_epoch == 21 // 4
    ids = epoch_ids(ref)
    # b (3 samples) gets 40% of 21 draws: upsampled, its samples read more than once per epoch,
    # each repeat a view of its own
    assert sum(i % 21 >= 18 for batch in ids for i in batch) >= 2 and any(i >= 21 for batch in ids for i in batch)
    whole = build()
    want = [x for _ in range(2) for x in whole]  # two uninterrupted epochs
    first = build()
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    del it
    again = build()
    again.load_state_dict(state)
    got = list(again) + list(again)
    assert len(got) == len(want) - 2
    for x, y in zip(got, want[2:]):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    # the state is for these sources in these proportions
    other = build_train_loader(_cfg([(a, 0.5), (b, 0.5)]), rank=1, world_size=2, micro_batch=2, device="cpu")
    with pytest.raises(ValueError, match="loader state is for the sources"):
        other.load_state_dict(state)


def test_source_lists_are_checked():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["data.train=[]"])
    with pytest.raises(ConfigError, match="data.train.0.weight"):
        load_config(None, ["data.train=[{url: a, weight: 0}]"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["data.train=[{url: a}, {url: a}]"])


def test_repeats_of_an_upsampled_source_are_different_views(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_split(a, [6, 5, 7], size=(40, 30))
    write_split(b, [3], size=(40, 30))
    loader = build_train_loader(
        _cfg([(a, 0.6), (b, 0.4)], "data.workers=0"), rank=0, world_size=1, micro_batch=2, device="cpu"
    )
    views: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
    for batch in loader:
        for i, x in zip(loader.last_ids, batch.target):
            views[i % 21].append(x)
    repeated = [v for i, v in views.items() if i >= 18 and len(v) > 1]
    assert repeated, "b's 3 samples fill 8 of 21 draws: some sample is drawn twice"
    for v in repeated:
        assert not torch.equal(v[0], v[1])  # another crop/flip of the same image


def test_dali_gives_a_mixed_epoch_the_same_ids_and_resumes_exactly(tmp_path):
    """The DALI backend computes later epochs' plans in its workers: with the sources' mix too."""
    pytest.importorskip("nvidia.dali")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_split(a, [6, 5, 7], size=(40, 30))
    write_split(b, [3], size=(40, 30))
    cfg = _cfg([(a, 0.6), (b, 0.4)], "data.workers=1")

    def build(backend):
        return build_train_loader(cfg, rank=0, world_size=1, micro_batch=2, device="cpu", backend=backend)

    torch_ids = [epoch_ids(ld) for ld in [build("torch")] for _ in range(2)]
    dali = build("dali")
    assert [epoch_ids(dali) for _ in range(2)] == torch_ids  # epoch 1 comes from the workers' plan
    first = build("dali")
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    del it
    again = build("dali")
    again.load_state_dict(state)
    assert epoch_ids(again) + epoch_ids(again) == [x for e in torch_ids for x in e][3:]
