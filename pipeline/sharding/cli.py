"""`mfm shard --source PATH --dest URL ...` and `mfm shard verify URL`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import storage as st


def _shard_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mfm shard", description="Shard ILSVRC2012 archives or an ImageFolder tree into WebDataset tars."
    )
    p.add_argument(
        "--source",
        required=True,
        help="folder with ILSVRC2012_img_{train,val}.tar (+ labels) or <split>/<class>/<image>",
    )
    p.add_argument("--dest", required=True, help="output URL: a path or s3://bucket/prefix")
    p.add_argument("--splits", default=None, help="comma-separated (default: train,val where present)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the CPUs available; a split of one shard runs in this process)",
    )
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        default=None,
        help="write the shards on the Dask cluster whose scheduler is at ADDRESS (tcp://scheduler:8786) "
        "instead of local processes; listing, planning and the manifest commit stay here",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-mb", type=float, default=256)
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose longer side exceeds PX")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="reject images whose header claims more pixels, before decoding (default: 89478485, Pillow's limit)",
    )
    p.add_argument("--validation", choices=["structural", "decode"], default="structural")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="reshard every source file into a new revision (drops changed/deleted files' old samples)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def cli(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if argv[:1] == ["verify"]:
        return verify_cli(argv[1:])
    parser = _shard_parser()
    args = parser.parse_args(argv)
    if args.dask is not None and args.workers is not None:
        parser.error("--workers sizes the local process pool; with --dask the cluster's workers write the shards")
    from pipeline.processes import available_cpus
    from pipeline.sharding import ShardingError, SourceError, shard_dataset

    try:
        runner = None
        if args.dask is not None:
            from pipeline.sharding.cluster import DaskShards

            runner = DaskShards(args.dask)
        manifests = shard_dataset(
            args.source,
            args.dest,
            splits=args.splits,
            workers=args.workers or available_cpus(),
            seed=args.seed,
            shard_size_mb=args.shard_size_mb,
            max_side=args.max_side,
            **({"max_pixels": args.max_pixels} if args.max_pixels is not None else {}),
            validation=args.validation,
            progress=False if args.no_progress else None,
            rebuild=args.rebuild,
            runner=runner,
        )
    except (SourceError, ShardingError, ValueError) as e:
        print(f"mfm shard: {e}", file=sys.stderr)
        return 2
    for split, m in manifests.items():
        print(
            f"{st.join(args.dest, split)}: {m['num_samples']} samples, {len(m['shards'])} shards, "
            f"{len(m['rejected'])} rejected (revision {m.get('revision', 1)})"
        )
    return 0


def verify_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm shard verify", description="Re-read every shard and check it against manifest.json."
    )
    p.add_argument("url", help="a split (folder holding manifest.json) or a dest holding <split>/manifest.json")
    args = p.parse_args(argv)
    from pipeline.sharding.verify import verify_split
    from pipeline.split_manifest import MANIFEST

    fs, path = st.filesystem(args.url)
    if st.exists(st.join(args.url, MANIFEST)):
        split_urls = [args.url]
    else:
        children = [c for c in fs.ls(path, detail=False) if fs.exists(f"{c}/{MANIFEST}")] if fs.exists(path) else []
        split_urls = [st.join(args.url, c.rstrip("/").rsplit("/", 1)[-1]) for c in sorted(children)]
    if not split_urls:
        print(f"mfm shard verify: {args.url}: no manifest.json there or in its subfolders", file=sys.stderr)
        return 1
    bad = 0
    for url in split_urls:
        try:
            problems = verify_split(url)
        except ValueError as e:  # a manifest of the wrong shape, or names leaving the split
            print(f"BAD {e}", file=sys.stderr)
            print(f"{url}: bad manifest")
            bad += 1
            continue
        for problem in problems:
            print(f"MISMATCH {problem}", file=sys.stderr)
        bad += len(problems)
        print(f"{url}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if bad else 0
