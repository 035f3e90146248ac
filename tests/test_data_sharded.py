"""The loaders over shards written by the real sharder (pipeline.sharding from
pipeline.sample_data): the two stages meet at the manifest contract."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import build_eval_loader, build_train_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.sample_data import build
    from pipeline.sharding import shard_dataset

    root = tmp_path_factory.mktemp("sharded")
    info = build(str(root / "src"), per_class=4, size=40)
    manifests = shard_dataset(
        info["folder"], str(root / "shards"), splits=["train", "val"], workers=1, shard_size_mb=0.01, progress=False
    )
    return root / "shards", manifests


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_train_loader_reads_real_shards(shards, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    url, manifests = shards
    n = manifests["train"]["num_samples"]
    assert len(manifests["train"]["shards"]) > 1
    cfg = load_config(
        None,
        [
            f"data.train={url}/train",
            "model.img_size=32",
            "corruption.radius=4",
            "data.workers=0",
            "data.shuffle_buffer=8",
        ],
    )
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, micro_batch=4, device="cpu", backend=backend)
        for b in loader:
            assert b.encoder_input.shape == (4, 3, 32, 32) and b.keep.shape == (4, 32, 32)
            seen += loader.last_ids
        assert loader.skipped == 0
    assert len(seen) == len(set(seen)) == n // 8 * 8


def test_eval_loader_reads_real_shards(shards):
    url, manifests = shards
    cfg = load_config(None, ["model.img_size=32"])
    labels = torch.cat(
        [y for _, y in build_eval_loader(cfg, f"{url}/val", rank=0, world_size=1, batch_size=5, device="cpu")]
    )
    assert len(labels) == manifests["val"]["num_samples"]
    assert labels.min() >= 0 and labels.max() < len(manifests["val"]["classes"])
