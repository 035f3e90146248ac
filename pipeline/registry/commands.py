"""`mfm registry {list,show,register,promote,gc}`, `mfm pull` and `mfm cache {list,prune}`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Callable

from pipeline import storage
from pipeline.registry import cache
from pipeline.registry.gc import collect_abandoned_claims
from pipeline.registry.loading import pull
from pipeline.registry.refs import DEFAULT_REGISTRY, Ref, RegistryError, parse_ref
from pipeline.registry.store import Registry, default_registry


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None, help=f"registry URL (default: $MFM_REGISTRY or {DEFAULT_REGISTRY})")


def _run(fn: Callable[[], int], prog: str) -> int:
    try:
        return fn()
    except (RegistryError, storage.ConditionalWriteUnsupported) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number and a unit, e.g. 30m, 24h, 7d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _list(reg: Registry, name: str | None) -> int:
    """Names, or the versions of `name`. A broken alias or manifest is reported on stderr and the
    rest is still listed; the exit code is then 1."""
    problems: list[str] = []
    if not name:
        for n in reg.names():
            print(n)
        return 0
    by_version: dict[int, list[str]] = {}
    for alias, v in reg.aliases(name, problems).items():
        by_version.setdefault(v, []).append(alias)
    for v in reg.versions(name):
        try:
            m = reg.manifest(Ref(name, version=v))
        except RegistryError as e:
            problems.append(str(e))
            continue
        metrics = m.get("metrics") or {}
        top = {k: metrics[k] for k in ("top1", "top5") if k in metrics}
        print(
            f"v{v}\t{m.get('created', '-')}\t{(m.get('model') or {}).get('architecture', '-')}\t"
            f"{' '.join(f'{k}={x:.4g}' for k, x in top.items()) or '-'}\t"
            f"{','.join(sorted(by_version.get(v, [])))}"
        )
    for problem in problems:
        print(f"mfm registry list: skipped: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm registry", description="the model registry")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("list", help="names, or the versions and aliases of NAME")
    a.add_argument("name", nargs="?")
    _registry_arg(a)
    a = sub.add_parser("show", help="the manifest of NAME@vN|NAME@ALIAS")
    a.add_argument("ref")
    _registry_arg(a)
    a = sub.add_parser("register", help="register a run's export folder as a new version")
    a.add_argument("name")
    a.add_argument("--export", required=True, help="export folder URL (model.safetensors + config.json)")
    a.add_argument("--metrics", help="metrics.json URL (default: EXPORT/metrics.json when present)")
    a.add_argument("--data-manifest", help="the training split's folder or manifest.json URL")
    a.add_argument("--run-config", help="the run's config (default: RUN/config.yaml or config.json when present)")
    a.add_argument("--parent", help="registry ref this model was fine-tuned from")
    a.add_argument("--alias", action="append", default=[], help="also point these aliases at it (ungated)")
    _registry_arg(a)
    a = sub.add_parser("promote", help="move an alias to a version if it beats the current one")
    a.add_argument("ref", help="NAME@vN or NAME@ALIAS")
    a.add_argument("--alias", default="production")
    a.add_argument("--gate-metric", default="top1", help="metric that must improve (dotted key; default top1)")
    a.add_argument("--lower-is-better", action="store_true")
    a.add_argument("--no-gate", action="store_true", help="move without comparing")
    a.add_argument("--force", action="store_true", help="move even if the gate refuses")
    _registry_arg(a)
    a = sub.add_parser("gc", help="remove abandoned claims (v<N>/.claim without a manifest) older than --older-than")
    a.add_argument("name", nargs="?", help="only this name (default: every name)")
    a.add_argument("--older-than", required=True, type=_duration, help="age, e.g. 30m, 24h, 7d")
    a.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    _registry_arg(a)
    args = p.parse_args(argv)
    reg = Registry(args.registry or default_registry())

    def go() -> int:
        if args.action == "list":
            return _list(reg, args.name)
        if args.action == "gc":
            for url in collect_abandoned_claims(reg, args.older_than, args.name, dry_run=args.dry_run):
                print(f"{'would remove' if args.dry_run else 'removed'} {url}")
            return 0
        if args.action == "show":
            target = reg.resolve(args.ref)
            out = dict(
                reg.manifest(target), aliases={a: v for a, v in reg.aliases(target.name).items() if v == target.version}
            )
            print(json.dumps(out, indent=2, sort_keys=True))
            return 0
        if args.action == "register":
            ref = reg.register(
                args.name,
                args.export,
                metrics_url=args.metrics,
                data_manifest_url=args.data_manifest,
                run_config_url=args.run_config,
                parent=args.parent,
                aliases=("latest", *[x for x in args.alias if x != "latest"]),
            )
            print(f"registered {ref} in {reg.url}")
            return 0
        why = reg.promote(
            args.ref,
            args.alias,
            gate_metric=None if args.no_gate else args.gate_metric,
            higher_is_better=not args.lower_is_better,
            force=args.force,
        )
        print(f"{reg.resolve(args.ref)} is {parse_ref(args.ref).name}@{args.alias}: {why}")
        return 0

    return _run(go, "mfm registry")


def pull_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm pull", description="download a registered model and verify its checksums")
    p.add_argument("ref", help="NAME@ALIAS or NAME@vN")
    p.add_argument("--dest", required=True, help="local folder")
    _registry_arg(p)
    args = p.parse_args(argv)

    def go() -> int:
        ref, dest = pull(args.ref, args.dest, args.registry)
        print(f"pulled {ref} into {dest} (all checksums verified)")
        return 0

    return _run(go, "mfm pull")


def cache_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm cache", description=f"the local cache of verified versions ($MFM_CACHE, now {cache.cache_root()})"
    )
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="cached versions: registry, NAME@vN, manifest sha256, size, last used")
    a = sub.add_parser("prune", help="keep the N most recently used versions of each name, remove the rest")
    a.add_argument("--keep", type=int, required=True)
    args = p.parse_args(argv)

    def go() -> int:
        if args.action == "list":
            for e in cache.entries():
                used = dt.datetime.fromtimestamp(e.last_used, dt.timezone.utc).isoformat(timespec="seconds")
                print(f"{e.registry}\t{e.name}@v{e.version}\t{e.manifest_sha256[:12]}\t{e.size / 1e6:.1f} MB\t{used}")
            return 0
        removed = cache.prune(args.keep)
        for e in removed:
            print(f"removed {e.name}@v{e.version} ({e.registry}, {e.size / 1e6:.1f} MB)")
        print(f"{len(removed)} removed, {sum(e.size for e in removed) / 1e6:.1f} MB freed")
        return 0

    return _run(go, "mfm cache")
