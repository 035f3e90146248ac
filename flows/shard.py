"""Prefect flow `mfm-shard`: shard a dataset (thin: all the work is in pipeline.sharding)."""

from __future__ import annotations

from prefect import flow

from pipeline.jpeg import MAX_PIXELS
from pipeline.sharding import shard_dataset


@flow(name="mfm-shard", log_prints=True)
def shard_flow(
    source: str,
    dest: str,
    splits: list[str] | None = None,
    workers: int = 1,
    seed: int = 0,
    shard_size_mb: float = 256,
    max_side: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    validation: str = "structural",
) -> dict[str, dict]:
    """Shard `source` into `<dest>/<split>/`; returns per split the sample, shard and rejection counts."""
    manifests = shard_dataset(
        source,
        dest,
        splits=splits,
        workers=workers,
        seed=seed,
        shard_size_mb=shard_size_mb,
        max_side=max_side,
        max_pixels=max_pixels,
        validation=validation,
        progress=False,
    )
    # The full manifests live beside the shards; the flow result stays small.
    return {
        split: {"num_samples": m["num_samples"], "shards": len(m["shards"]), "rejected": len(m["rejected"])}
        for split, m in manifests.items()
    }


if __name__ == "__main__":
    import sys

    print(shard_flow(sys.argv[1], sys.argv[2]))
