"""shard_dataset: list, plan, write shards in worker processes, then commit the manifest."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.jpeg import MAX_PIXELS
from pipeline.sharding import manifest as mf
from pipeline.sharding.plan import plan_shards
from pipeline.sharding.sources import SourceError, available_splits, list_split
from pipeline.sharding.validate import VALIDATIONS
from pipeline.sharding.writer import WORK_DIR, WriteOptions, write_shard


class ShardingError(RuntimeError):
    """The destination conflicts with the request; the message names the URL."""


def run_logger():
    """Prefect's run logger inside a flow or task run (so progress shows in the UI), else logging."""
    if "prefect" in sys.modules:  # never import prefect just to find out we are not in a flow
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() or TaskRunContext.get():
            from prefect import get_run_logger

            return get_run_logger()
    return logging.getLogger("pipeline.sharding")


def shard_dataset(
    source: str,
    dest: str,
    *,
    splits: list[str] | str | None = None,
    workers: int = 1,
    seed: int = 0,
    shard_size_mb: float = 256,
    max_side: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    validation: str = "structural",
    storage: StorageConfig | None = None,
    progress: bool | None = None,
) -> dict[str, dict]:
    """Shard `source` into `<dest>/<split>/`; returns split -> manifest.

    Idempotent: a split whose manifest matches is left alone, committed shards are reused.
    max_pixels: images whose header claims more pixels are rejected before any decoder sees them.
    progress: None shows a bar only on a terminal.
    """
    if validation not in VALIDATIONS:
        raise ValueError(f"validation={validation!r}: expected one of {', '.join(VALIDATIONS)}")
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side={max_side}: must be a positive number of pixels")
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels={max_pixels}: must be a positive number of pixels")
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s]
    splits = splits or [s for s in available_splits(source) if s in ("train", "val")] or available_splits(source)
    if not splits:
        raise SourceError(f"{source}: no splits found")
    options = {"seed": seed, "shard_size_mb": shard_size_mb, "max_side": max_side, "validation": validation}
    if max_pixels != MAX_PIXELS:  # recorded only when set: splits sharded before the option stay current
        options["max_pixels"] = max_pixels
    return {
        split: _shard_split(source, st.join(dest, split), split, options, max(1, workers), storage, progress)
        for split in splits
    }


def _shard_split(source, split_url, split, options, workers, cfg, progress) -> dict:
    log = run_logger()
    listing = list_split(source, split)
    src = {"kind": listing.kind, "path": source, "fingerprint": listing.fingerprint}
    if st.exists(st.join(split_url, mf.MANIFEST), cfg):
        old = mf.read_manifest(split_url, cfg)
        if old["options"] == options and old["source"]["fingerprint"] == src["fingerprint"]:
            log.info(
                "%s: complete already (%d samples in %d shards); nothing to do",
                split_url,
                old["num_samples"],
                len(old["shards"]),
            )
            return old
        raise ShardingError(
            f"{split_url}: holds a split sharded from another source or with other options "
            f"(manifest options {old['options']}, fingerprint {old['source']['fingerprint'][:12]}; "
            f"asked {options}, fingerprint {src['fingerprint'][:12]}); use another --dest or delete it"
        )
    _remove_stale_temporaries(split_url, cfg)
    # The tool version is part of each shard's plan digest: a newer writer never reuses older shards.
    plans = plan_shards(
        split,
        listing.entries,
        listing.classes,
        seed=options["seed"],
        shard_size_mb=options["shard_size_mb"],
        options={**options, "tool": mf.tool_version()},
    )
    class_of = {c["wnid"]: c["index"] for c in listing.classes}
    missing = sorted({e.wnid for e in listing.entries} - class_of.keys())
    if missing:
        raise SourceError(f"{source}: split {split!r} has images of classes not in the class list: {missing[:5]}")
    opts = WriteOptions(
        options["validation"],
        options["max_side"],
        decode_threads(options["validation"], min(workers, len(plans))),
        options.get("max_pixels", MAX_PIXELS),
    )
    log.info(
        "%s: %d images from %s (%s) -> %d shards, %d workers",
        split_url,
        len(listing.entries),
        source,
        listing.kind,
        len(plans),
        workers,
    )
    results = _run(plans, split_url, class_of, opts, workers, cfg, log, progress)
    _remove_extra_shards(split_url, split, len(plans), cfg)
    rejected = listing.rejected + [r for res in results for r in res.rejected]
    manifest = mf.build_manifest(split, results, listing.classes, src, options, rejected)
    st.write_bytes(st.join(split_url, mf.MANIFEST), mf.dumps(manifest), cfg)  # the commit: written last
    _remove_work_dir(split_url, cfg, log)
    log.info(
        "%s: committed %d samples in %d shards (%d reused, %d re-encoded, %d rejected)",
        split_url,
        manifest["num_samples"],
        len(results),
        sum(r.reused for r in results),
        sum(r.reencoded for r in results),
        len(rejected),
    )
    return manifest


def decode_threads(validation: str, workers: int) -> int:
    """Decoding threads per worker: the CPUs this process may use, shared among the workers
    (Pillow decodes without the GIL). Structural checks are Python: one thread."""
    return max(1, available_cpus() // workers) if validation == "decode" else 1


def available_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run(plans, split_url, class_of, opts, workers, cfg, log, progress):
    from tqdm import tqdm

    results = [None] * len(plans)
    bar = tqdm(
        total=len(plans),
        unit="shard",
        desc=split_url.rsplit("/", 1)[-1],
        disable=(None if progress is None else not progress),
    )
    every = max(1, len(plans) // 20)
    count = [0]

    def done(i, r):
        results[i] = r
        bar.update(1)
        count[0] += 1
        n = count[0]
        if n % every == 0 or n == len(plans):
            log.info(
                "%s: %d/%d shards (%s: %d samples%s)",
                split_url,
                n,
                len(plans),
                r.name,
                r.samples,
                ", reused" if r.reused else "",
            )

    try:
        if workers == 1 or len(plans) <= 1:
            for i, p in enumerate(plans):
                done(i, write_shard(p, split_url, class_of, opts, cfg))
        else:
            # spawn, not fork: the caller may run threads (Prefect, an S3 client) that fork would copy mid-state.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                min(workers, len(plans)), mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                futures = {pool.submit(write_shard, p, split_url, class_of, opts, cfg): i for i, p in enumerate(plans)}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
    finally:
        bar.close()
    return results


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a killed run takes its workers with it (Linux), so orphans cannot
    go on writing into a destination that the rerun is cleaning up and resuming."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):  # not Linux
        return
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def _remove_stale_temporaries(split_url, cfg):
    """A killed local run leaves `<shard>.tar.tmp-XXXX` behind (S3 uploads leave nothing visible)."""
    if not st.is_local(split_url):
        return
    fs, path = st.filesystem(split_url, cfg)
    if fs.exists(path):
        for p in fs.glob(f"{path}/*.tmp-*") + fs.glob(f"{path}/{WORK_DIR}/*.tmp-*"):
            fs.rm(p)


def _remove_extra_shards(split_url, split, count, cfg):
    """Shards numbered past this plan, left by an unfinished run with other options."""
    fs, path = st.filesystem(split_url, cfg)
    for p in st.retry(lambda: fs.glob(f"{path}/{split}-*"), what=f"list {split_url}"):
        num = p.rsplit("/", 1)[-1][len(split) + 1 :].split(".", 1)[0]
        if num.isdigit() and int(num) >= count:
            st.retry(lambda: fs.rm(p), what=f"remove {p}")


def _remove_work_dir(split_url, cfg, log):
    fs, path = st.filesystem(st.join(split_url, WORK_DIR), cfg)
    try:
        st.retry(lambda: fs.rm(path, recursive=True), what=f"remove {path}")
    except FileNotFoundError:
        pass
    except Exception as e:  # the manifest is committed; leftover sidecars are harmless
        log.warning("%s: could not remove %s: %s", split_url, WORK_DIR, e)
