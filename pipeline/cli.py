"""The `mfm` command. Each subcommand lives with its stage and is imported only when used,
so `mfm --help` stays fast and a stage's heavy dependencies load only for that stage."""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Each function takes argv (list[str]) -> exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("pipeline.cli:config_cli", "show a resolved config: mfm config show PRESET [--set k=v]"),
    "demo": ("flows.demo:cli", "run the main job (mfm-retrain, tiny CPU preset) on the embedded defaults"),
    "sample-data": ("pipeline.sample_data:cli", "build a small ImageNet-format dataset from offline photos"),
    "shard": ("pipeline.sharding.cli:cli", "shard a dataset into WebDataset tars; `mfm shard verify URL`"),
    "pretrain": ("pipeline.training.launcher:cli", "MFM pretraining with DeepSpeed"),
    "finetune": (
        "pipeline.finetune:cli",
        "fine-tune a pretrained encoder into a classifier (DeepSpeed) -> export, metrics.json",
    ),
    "bench": ("pipeline.benchmarks:cli", "benchmarks: mfm bench {kernels,data,shard,train}"),
    "registry": ("pipeline.registry.commands:cli", "model registry: mfm registry {list,show,register,promote,gc}"),
    "pull": (
        "pipeline.registry.commands:pull_cli",
        "download a registered model, verified: mfm pull NAME@ALIAS --dest DIR",
    ),
    "cache": ("pipeline.registry.commands:cache_cli", "the local cache of pulled versions: mfm cache {list,prune}"),
    "evaluate": ("pipeline.evaluation:cli", "top-1/5, corruption robustness, k-NN, linear probe -> metrics.json"),
    "experiment": (
        "pipeline.experiment:cli",
        "mfm experiment pretext-comparison: pretexts vs random init on Fashion-MNIST -> table, plot",
    ),
    # A string, resolved only when run: pipeline does not import flows/.
    "deploy": ("flows.deploy:cli", "Prefect deployments on a work pool: mfm deploy [--pool NAME] [--kubernetes]"),
}


def config_cli(argv: list[str]) -> int:
    import argparse

    from pipeline.config import dump_config, list_presets, load_config

    p = argparse.ArgumentParser(prog="mfm config")
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config")
    show.add_argument("preset", nargs="?", help=f"preset name or YAML file ({', '.join(list_presets())})")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("list", help="list the presets")
    args = p.parse_args(argv)
    if args.action == "list":
        print("\n".join(list_presets()))
    else:
        print(dump_config(load_config(args.preset, args.overrides)), end="")
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: mfm COMMAND [ARGS]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mfm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr, end="")
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        return getattr(importlib.import_module(module), func)(rest) or 0
    except ConfigError as e:
        print(f"mfm {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
