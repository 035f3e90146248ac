"""Prefect flow `mfm-shard`: shard a dataset (thin: all the work is in pipeline.sharding).

With `dask_address` the shards are written by `write-shard` task runs on that Dask cluster
(prefect-dask's DaskTaskRunner), one per shard, each shown in the UI; listing, planning and
the manifest commit stay in the flow run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NONE

from pipeline.config import StorageConfig
from pipeline.jpeg import MAX_PIXELS
from pipeline.sharding import shard_dataset
from pipeline.sharding.cluster import DaskShards, as_committed, write_on_worker
from pipeline.sharding.plan import ShardPlan
from pipeline.sharding.writer import ShardResult, WriteOptions


def _shard_run_name() -> str:
    from prefect.runtime import task_run

    from pipeline.sharding.cluster import task_name

    return task_name(task_run.parameters["plan"])


# No cache: the shard's sidecar is its commit record, checked by write_shard itself.
@task(name="write-shard", task_run_name=_shard_run_name, cache_policy=NONE, retries=2, retry_delay_seconds=5)
def write_shard_task(
    plan: ShardPlan, split_url: str, class_of: dict[str, int], opts: WriteOptions, cfg: StorageConfig | None
) -> ShardResult:
    """Commit one shard on a Dask worker (or reuse it when committed already)."""
    return write_on_worker(plan, split_url, class_of, opts, cfg)


@dataclass(frozen=True)
class PrefectDaskShards(DaskShards):
    """Runs shard writes as `write-shard` task runs on the Dask cluster at `address`."""

    def __str__(self) -> str:
        return f"the Dask cluster at {self.address} (DaskTaskRunner)"

    def __call__(
        self,
        plans: list[ShardPlan],
        split_url: str,
        class_of: dict[str, int],
        opts: WriteOptions,
        cfg: StorageConfig | None,
    ) -> Iterator[tuple[int, ShardResult]]:
        from prefect_dask import DaskTaskRunner

        with DaskTaskRunner(address=self.address) as runner:
            futures = [
                runner.submit(
                    write_shard_task,
                    {"plan": p, "split_url": split_url, "class_of": class_of, "opts": opts, "cfg": cfg},
                )
                for p in plans
            ]
            dask_futures = [f.wrapped_future for f in futures]
            yield from as_committed(dask_futures, lambda i: futures[i].result(), runner.client.loop, str(self))


def dask_runner(address: str | None) -> PrefectDaskShards | None:
    """The flows' `dask_address`: None (or empty) keeps the local process pool."""
    return PrefectDaskShards(address) if address else None


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
    rebuild: bool = False,
    dask_address: str | None = None,
) -> dict[str, dict]:
    """Shard `source` into `<dest>/<split>/`; returns per split the sample, shard and rejection counts.

    dask_address: a Dask scheduler (tcp://scheduler:8786) whose workers write the shards instead
    of `workers` local processes; they need the same access to `source` and `dest`.
    """
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
        rebuild=rebuild,
        runner=dask_runner(dask_address),
    )
    # The full manifests live beside the shards; the flow result stays small.
    return {
        split: {"num_samples": m["num_samples"], "shards": len(m["shards"]), "rejected": len(m["rejected"])}
        for split, m in manifests.items()
    }


if __name__ == "__main__":
    import sys

    print(shard_flow(sys.argv[1], sys.argv[2]))
