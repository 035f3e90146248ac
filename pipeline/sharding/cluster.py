"""Shard writing on a Dask cluster: each planned shard is one task on the cluster's workers.

Listing, planning, the revision claim and the manifest commit stay with the caller (job.py);
the cluster runs only `write_shard`, which commits each shard atomically and reuses a shard
already committed, so a task rerun after its worker died writes the same bytes under the same
name and nothing is lost or doubled. A task's arguments are the plan, the split URL, the write
options and StorageConfig (endpoint and region, never a credential): workers reach the store
with their own credentials (AWS environment, instance or pod role).

A driver that dies leaves its running tasks to finish (Dask cannot stop a running task); they
only write the bytes of their plan. A rerun with the same plan reuses their shards; another
plan waits for the revision claim to go stale (revisions.CLAIM_STALE_S, far longer than a shard).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, replace

from pipeline.config import StorageConfig
from pipeline.sharding.job import ShardingError, decode_threads
from pipeline.sharding.plan import ShardPlan
from pipeline.sharding.writer import ShardResult, WriteOptions, write_shard

# Task exceptions (storage errors past storage.retry) are retried; a worker's death is not an
# exception: the scheduler reruns its tasks elsewhere (distributed.scheduler.allowed-failures).
RETRIES = 2
CONNECT_TIMEOUT_S = 30
_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})")


def check_address(address: str) -> str:
    """A scheduler address `tcp://host:port` or `tls://host:port`; else ValueError naming it."""
    m = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if m is None or not 0 < int(m.group(4)) < 65536:
        raise ValueError(
            f"dask address {address!r}: expected tcp://HOST:PORT or tls://HOST:PORT "
            "(a Dask scheduler, e.g. tcp://scheduler:8786)"
        )
    return address


def import_distributed():
    """`distributed`, without its process-wide hold on exception pickling: on import it registers
    tblib's reducers for every exception class (copyreg), and DALI's worker channel, which admits
    only globals it knows, then refuses every exception a loader worker sends (its end-of-epoch
    StopIteration included), so in-process DALI loading after sharding would fail. The driver
    does not pickle exceptions for Dask; the workers are other processes and keep the reducers."""
    import copyreg

    import distributed

    for cls, reducer in list(copyreg.dispatch_table.items()):
        if getattr(getattr(reducer, "func", reducer), "__module__", "") == "tblib.pickling_support":
            del copyreg.dispatch_table[cls]
    return distributed


def write_on_worker(
    plan: ShardPlan, split_url: str, class_of: dict[str, int], opts: WriteOptions, cfg: StorageConfig | None
) -> ShardResult:
    """write_shard with decoding threads for this worker's CPUs, which the driver cannot know
    (threads never change the bytes), building in the worker's own folder: the partial shard of
    a killed worker is removed when the next worker starts on that machine (Dask purges the
    folders of dead workers)."""
    slots, folder = _worker()
    opts = replace(opts, threads=decode_threads(opts.validation, slots))
    return write_shard(plan, split_url, class_of, opts, cfg, tmp_dir=folder)


def _worker() -> tuple[int, str | None]:
    """(tasks this worker runs at once, its local folder); (1, None) off a Dask worker."""
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return 1, None
    return w.state.nthreads, w.local_directory


def task_name(plan: ShardPlan) -> str:
    return f"write-shard-{plan.split}-{plan.index:06d}"


def task_key(split_url: str, plan: ShardPlan) -> str:
    """The task's name on the dashboard: the shard, and a digest of where and what it writes, so
    two destinations on one cluster never share a task and a resubmission finds its own."""
    digest = hashlib.sha256(f"{split_url}\t{plan.digest}".encode()).hexdigest()
    return f"{task_name(plan)}-{digest[:12]}"


@dataclass(frozen=True)
class DaskShards:
    """Runs shard writes on the Dask cluster whose scheduler is at `address`."""

    address: str

    def __post_init__(self):
        check_address(self.address)

    def __str__(self) -> str:
        return f"the Dask cluster at {self.address}"

    def __call__(
        self,
        plans: list[ShardPlan],
        split_url: str,
        class_of: dict[str, int],
        opts: WriteOptions,
        cfg: StorageConfig | None,
    ) -> Iterator[tuple[int, ShardResult]]:
        """(position in plans, result) of each shard as it is committed."""
        try:
            client = import_distributed().Client(self.address, set_as_default=False, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise ShardingError(f"{self}: could not connect: {e}") from None
        with client:
            futures = [
                client.submit(
                    write_on_worker,
                    p,
                    split_url,
                    class_of,
                    opts,
                    cfg,
                    key=task_key(split_url, p),
                    retries=RETRIES,
                    pure=False,
                )
                for p in plans
            ]
            yield from as_committed(futures, lambda i: futures[i].result(), client.loop, str(self))


def as_committed(futures: list, result_of, loop, where: str) -> Iterator[tuple[int, ShardResult]]:
    """(position, result_of(position)) of each Dask future as it completes; a client that lost
    the scheduler and gave up reconnecting is one clear error saying a rerun resumes."""
    position = {f.key: i for i, f in enumerate(futures)}
    for done in import_distributed().as_completed(futures, loop=loop):
        i = position[done.key]
        try:
            result = result_of(i)
        except CancelledError as e:
            raise ShardingError(
                f"{where}: lost the cluster ({type(e).__name__}); rerun to resume: the shards committed "
                "so far are reused"
            ) from None
        yield i, result
