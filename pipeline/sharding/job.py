"""shard_dataset: list, plan, write shards in worker processes, then commit the manifest."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Protocol

from pipeline import split_manifest as mf
from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.jpeg import MAX_PIXELS
from pipeline.processes import available_cpus, die_with_parent
from pipeline.sharding import revisions as rv
from pipeline.sharding.plan import plan_shards
from pipeline.sharding.remote import source_listing, source_splits
from pipeline.sharding.sources import SourceError
from pipeline.sharding.validate import VALIDATIONS
from pipeline.sharding.writer import WORK_DIR, ShardResult, WriteOptions, write_shard

HEARTBEAT_S = 10.0  # at most this often, a writer refreshes its revision claim


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
    rebuild: bool = False,
    runner: ShardRunner | None = None,
) -> dict[str, dict]:
    """Shard `source` into `<dest>/<split>/`; returns split -> manifest.

    Idempotent: a split whose manifest matches is left alone, committed shards are reused.
    max_pixels: images whose header claims more pixels are rejected before any decoder sees them.
    A split whose source grew gets a new revision holding only the new files; files changed or
    gone since are reported and their samples kept. rebuild: reshard every file into a new
    revision that replaces the shard list (earlier shard files stay for readers still on them).
    progress: None shows a bar only on a terminal.
    runner: where the shards are written (e.g. cluster.DaskShards); default a local pool of `workers`.
    """
    if validation not in VALIDATIONS:
        raise ValueError(f"validation={validation!r}: expected one of {', '.join(VALIDATIONS)}")
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side={max_side}: must be a positive number of pixels")
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels={max_pixels}: must be a positive number of pixels")
    _refuse_dest_inside_source(source, dest)
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s]
    found = source_splits(source, storage)
    splits = splits or [s for s in found if s in ("train", "val")] or found
    if not splits:
        raise SourceError(f"{source}: no splits found")
    options = {"seed": seed, "shard_size_mb": shard_size_mb, "max_side": max_side, "validation": validation}
    if max_pixels != MAX_PIXELS:  # recorded only when set: splits sharded before the option stay current
        options["max_pixels"] = max_pixels
    tables: dict[str, list[dict]] = {}  # split -> class table, of this run's and dest's other splits
    for other in found:
        if other not in splits and st.exists(st.join(dest, other, mf.MANIFEST), storage):
            other_url = st.join(dest, other)
            tables[other] = mf.check_written(mf.read_manifest(other_url, storage), st.join(other_url, mf.MANIFEST))[
                "classes"
            ]
    return {
        split: _shard_split(
            source, st.join(dest, split), split, options, max(1, workers), storage, progress, rebuild, tables, runner
        )
        for split in splits
    }


def _refuse_dest_inside_source(source: str, dest: str) -> None:
    """The shards of a dest inside the source would be listed as a split (or class) of it."""
    if st.is_local(dest) != st.is_local(source):
        return
    if st.is_local(dest):
        src, out, sep = os.path.realpath(source), os.path.realpath(dest.removeprefix("file://")), os.sep
    else:
        src, out, sep = source.rstrip("/"), dest.rstrip("/"), "/"
    if out == src or out.startswith(src.rstrip(sep) + sep):
        raise ShardingError(
            f"--dest {dest} is inside the source {source}: its shards would be read as part of the source "
            "by the next split or run; choose a --dest outside the source"
        )


def _check_class_table(split: str, classes: list[dict], tables: dict[str, list[dict]]) -> None:
    """The splits of a dest must agree on every class index they share, or a label means one
    class in train and another in val. (A split may hold classes past the end of another's
    table: a grown split appends new classes, see revisions.extend_classes.)"""
    ours = {c["index"]: c["wnid"] for c in classes}
    for other, table in tables.items():
        theirs = {c.get("index"): c.get("wnid") for c in table}
        clash = sorted(i for i in ours.keys() & theirs.keys() if ours[i] != theirs[i])
        moved = sorted(set(ours.values()) & set(theirs.values()) - {ours[i] for i in ours if theirs.get(i) == ours[i]})
        if clash or moved:
            shown = ", ".join(f"{i}: {ours[i]} here, {theirs[i]} in {other!r}" for i in clash[:5])
            raise ShardingError(
                f"split {split!r}: its class table would differ from split {other!r}'s in the same dest "
                f"(index {shown or 'of ' + ', '.join(moved[:5])}); the class indices of the splits must agree: "
                "make the class folders the same in every split (a class may be empty), "
                "or shard all splits into a new --dest"
            )


def _shard_split(
    source, split_url, split, options, workers, cfg, progress, rebuild=False, tables=None, runner=None
) -> dict:
    log = run_logger()
    listing = source_listing(source, split, cfg)
    tables = {} if tables is None else tables
    src = {"kind": listing.kind, "path": source, "fingerprint": listing.fingerprint}
    manifest_url = st.join(split_url, mf.MANIFEST)
    current = st.read_versioned(manifest_url, cfg)
    old = mf.check_written(mf.parse_manifest(current[0], manifest_url), manifest_url) if current else None
    if old is not None and not rebuild:
        if old["options"] != options:
            raise ShardingError(
                f"{split_url}: holds a split sharded with other options (manifest options {old['options']}; "
                f"asked {options}); use another --dest, or --rebuild to reshard it all with the new options"
            )
        if old["source"]["fingerprint"] == src["fingerprint"]:
            log.info(
                "%s: complete already (%d samples in %d shards, revision %d); nothing to do",
                split_url,
                old["num_samples"],
                len(old["shards"]),
                old.get("revision", 1),
            )
            tables[split] = old["classes"]
            return old
        if not old.get("revisions"):
            raise ShardingError(
                f"{split_url}: the source changed, and this manifest predates growing splits (no file "
                "lists to compare with); reshard it with --rebuild"
            )
    revision = 1 + (old.get("revision", 1) if old else 0)
    growth, classes, entries = _growth(split_url, old, listing, rebuild, cfg, log)
    _check_class_table(split, classes, tables)
    tables[split] = classes
    start = (old.get("next_shard", len(old["shards"])) if old else 0) if revision > 1 else 0
    _remove_stale_temporaries(split_url, cfg)
    # The tool version is part of each shard's plan digest: a newer writer never reuses older shards.
    plans = plan_shards(
        split,
        entries,
        classes,
        seed=options["seed"],
        shard_size_mb=options["shard_size_mb"],
        options={**options, "tool": mf.tool_version()},
        start=start,
        revision=revision,
    )
    class_of = {c["wnid"]: c["index"] for c in classes}
    missing = sorted({e.wnid for e in entries} - class_of.keys())
    if missing:
        raise SourceError(f"{source}: split {split!r} has images of classes not in the class list: {missing[:5]}")
    try:
        claim = rv.claim(split_url, revision, rv.plan_digest([p.digest for p in plans], {"start": start}), cfg)
    except rv.ClaimRefused as e:
        raise ShardingError(str(e)) from None
    opts = WriteOptions(
        options["validation"],
        options["max_side"],
        decode_threads(options["validation"], max(1, min(workers, len(plans)))),
        options.get("max_pixels", MAX_PIXELS),
    )
    log.info(
        "%s: %d images from %s (%s) -> %d shards from #%d, on %s (revision %d)",
        split_url,
        len(entries),
        source,
        listing.kind,
        len(plans),
        start,
        runner or f"{workers} local workers",
        revision,
    )
    try:
        results = _run(plans, split_url, class_of, opts, workers, cfg, log, progress, heartbeat=claim, runner=runner)
        _remove_stale_temporaries(split_url, cfg)  # of writers killed mid-shard, whose shards were rewritten
        _remove_extra_shards(split_url, split, start + len(plans), cfg, first=start)
        claim.still_ours(cfg)
    except rv.ClaimRefused as e:
        raise ShardingError(str(e)) from None
    new_rejected = [r for res in results for r in res.rejected]
    files = _revision_files(entries, new_rejected)
    st.write_bytes(rv.files_url(split_url, revision), files, cfg)
    keep_old = old is not None and not rebuild
    record = {
        "revision": revision,
        "rebuild": bool(rebuild and old is not None),
        "first_shard": start,
        "shards": len(plans),
        "samples": sum(r.samples for r in results),
        "source_fingerprint": src["fingerprint"],
        "files_sha256": hashlib.sha256(files).hexdigest(),
        "changed": len(growth.changed),
        "missing": len(growth.missing),
        # The first names; every one is in the log. Policy: their samples stay until --rebuild.
        "changed_files": growth.changed[:REPORTED],
        "missing_files": growth.missing[:REPORTED],
    }
    manifest = mf.build_manifest(
        split,
        results,
        classes,
        src,
        options,
        (old["rejected"] if keep_old else []) + listing.rejected + new_rejected,
        earlier=old["shards"] if keep_old else [],
        revisions=[*(old.get("revisions") or [] if old else []), record],
        next_shard=start + len(plans),
    )
    # The commit, written last and conditionally: a writer that read another manifest loses.
    committed = (
        st.replace_bytes_if(manifest_url, mf.dumps(manifest), current[1], cfg)
        if current
        else st.create_bytes(manifest_url, mf.dumps(manifest), cfg)
    )
    if not committed:
        raise ShardingError(f"{manifest_url}: changed by another writer while revision {revision} was written")
    _remove_work_dir(split_url, cfg, log)
    log.info(
        "%s: committed %d samples in %d shards (revision %d: %d new shards of %d samples, %d reused, "
        "%d re-encoded, %d rejected)",
        split_url,
        manifest["num_samples"],
        len(manifest["shards"]),
        revision,
        len(results),
        record["samples"],
        sum(r.reused for r in results),
        sum(r.reencoded for r in results),
        len(new_rejected),
    )
    return manifest


REPORTED = 100  # changed/missing file names kept in a revision record


def _growth(split_url, old, listing, rebuild, cfg, log):
    """(growth, class table, entries to shard) for the next revision."""
    if old is None:
        return rv.Growth(listing.entries, [], []), listing.classes, listing.entries
    classes = rv.extend_classes(old["classes"], listing.classes)
    known = rv.known_files(split_url, old, cfg) if old.get("revisions") else {}
    growth = rv.diff(known, listing.entries)
    for what, names in (("changed since sharded", growth.changed), ("gone from the source", growth.missing)):
        if names:
            policy = "resharded by this --rebuild" if rebuild else "their sharded samples are kept until --rebuild"
            log.warning("%s: %d files %s (%s): %s", split_url, len(names), what, policy, ", ".join(names[:20]))
    if rebuild:
        return growth, classes, listing.entries
    taken = {k for _, k in known.values() if k}
    return growth, classes, rv.fresh_keys(growth.new, taken)


def _revision_files(entries, rejected) -> bytes:
    bad = {r["file"] for r in rejected}
    return rv.encode_files([(e.file, e.size, "" if e.file in bad else e.key) for e in entries])


def decode_threads(validation: str, workers: int) -> int:
    """Decoding threads per worker: the CPUs this process may use, shared among the workers
    (Pillow decodes without the GIL). Structural checks are Python: one thread."""
    return max(1, available_cpus() // workers) if validation == "decode" else 1


class ShardRunner(Protocol):
    """Runs write_shard for every plan elsewhere; yields (position in plans, result) as each commits."""

    def __call__(
        self, plans: list, split_url: str, class_of: dict[str, int], opts: WriteOptions, cfg: StorageConfig | None
    ) -> Iterator[tuple[int, ShardResult]]: ...


def _run(plans, split_url, class_of, opts, workers, cfg, log, progress, heartbeat=None, runner=None):
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
    beat = [time.monotonic()]

    def done(i, r):
        results[i] = r
        if heartbeat is not None and time.monotonic() - beat[0] > HEARTBEAT_S:
            heartbeat.refresh(cfg)  # raises when another writer took the revision over
            beat[0] = time.monotonic()
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
        if runner is not None:
            for i, r in runner(plans, split_url, class_of, opts, cfg):
                done(i, r)
        elif workers == 1 or len(plans) <= 1:
            for i, p in enumerate(plans):
                done(i, write_shard(p, split_url, class_of, opts, cfg))
        else:
            # spawn, not fork: the caller may run threads (Prefect, an S3 client) that fork would copy mid-state.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                min(workers, len(plans)), mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)
            ) as pool:
                futures = {pool.submit(write_shard, p, split_url, class_of, opts, cfg): i for i, p in enumerate(plans)}
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
    finally:
        bar.close()
    return results


def _remove_stale_temporaries(split_url, cfg):
    """A killed local run leaves `<shard>.tar.tmp-XXXX` behind (S3 uploads leave nothing visible)."""
    if not st.is_local(split_url):
        return
    fs, path = st.filesystem(split_url, cfg)
    if fs.exists(path):
        for p in fs.glob(f"{path}/*.tmp-*") + fs.glob(f"{path}/{WORK_DIR}/*.tmp-*"):
            fs.rm(p)


def _remove_extra_shards(split_url, split, count, cfg, first=0):
    """Shards numbered past this plan, left by an unfinished run with other options (never
    those of earlier revisions, numbered below `first`)."""
    fs, path = st.filesystem(split_url, cfg)
    for p in st.retry(lambda: fs.glob(f"{path}/{split}-*"), what=f"list {split_url}"):
        num = p.rsplit("/", 1)[-1][len(split) + 1 :].split(".", 1)[0]
        if num.isdigit() and int(num) >= count and int(num) >= first:
            st.retry(lambda: fs.rm(p), what=f"remove {p}")


def _remove_work_dir(split_url, cfg, log):
    fs, path = st.filesystem(st.join(split_url, WORK_DIR), cfg)
    try:
        st.retry(lambda: fs.rm(path, recursive=True), what=f"remove {path}")
    except FileNotFoundError:
        pass
    except Exception as e:  # the manifest is committed; leftover sidecars are harmless
        log.warning("%s: could not remove %s: %s", split_url, WORK_DIR, e)
