"""What a config or a shared folder can throw at the data layer: mixing weights at the edge of
float range, and a shard cache pointed at a folder that holds other files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.sampling import Mix, mixed_epoch_order

# --- mixing weights (issue 26, item 8) -------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, epoch_samples, want",
    [((1e308, 1e308), None, [10, 10]), ((1e308,) * 3, 20, [7, 7, 6]), ((1.7e308, 1e-300), None, [20, 0])],
)
def test_huge_weights_mix_in_proportion(weights, epoch_samples, want):
    mix = Mix((1,) * len(weights), weights, epoch_samples)
    counts = [10] * len(weights)
    assert mix.shares(counts).tolist() == want
    order = mixed_epoch_order(counts, mix, seed=0, epoch=0, shuffle_buffer=4)
    assert len(order) == sum(want) and np.all(order >= 0)


@pytest.mark.parametrize("weights", [(float("inf"), 1.0), (float("nan"), 1.0), (0.0, 1.0), (-1.0, 2.0), ()])
def test_a_mix_refuses_weights_it_cannot_normalise(weights):
    with pytest.raises(ValueError, match="weights"):
        Mix((1,) * len(weights), weights).shares([10] * len(weights))


def test_config_takes_huge_weights_and_bounds_epoch_samples():
    """Weights are relative: 1e308 each is a fair mix. epoch_samples past int64-exact ranges
    would overflow the shares, so the config refuses it, naming the key."""
    cfg = load_config(None, ["data.train=[{url: a, weight: 1e308}, {url: b, weight: 1e308}]"])
    assert [t.weight for t in cfg.data.train] == [1e308, 1e308]
    with pytest.raises(ConfigError, match=r"data.train.0.weight"):
        load_config(None, ["data.train=[{url: a, weight: .inf}, {url: b, weight: 1}]"])
    with pytest.raises(ConfigError, match=r"data.epoch_samples"):
        load_config(None, [f"data.epoch_samples={10**30}"])
