"""The `mfm` command. Each subcommand lives with its stage and is imported only when used,
so `mfm --help` stays fast and a stage's heavy dependencies load only for that stage."""

from __future__ import annotations

import importlib
import importlib.util
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
    "bench": (
        "pipeline.benchmarks:cli",
        "benchmarks: mfm bench {kernels,data,shard,train,plan,registry,checkpoint,stream}",
    ),
    "registry": ("pipeline.registry.commands:cli", "model registry: mfm registry {list,show,register,promote,gc}"),
    "pull": (
        "pipeline.registry.commands:pull_cli",
        "download a registered model, verified: mfm pull NAME@ALIAS --dest DIR",
    ),
    "cache": ("pipeline.registry.commands:cache_cli", "the local cache of pulled versions: mfm cache {list,prune}"),
    "evaluate": ("pipeline.evaluation:cli", "top-1/5, corruption robustness, k-NN, linear probe -> metrics.json"),
    "report": ("pipeline.report:cli", "one self-contained HTML page about a run or model: mfm report RUN_DIR_OR_REF"),
    "experiment": (
        "pipeline.experiment:cli",
        "mfm experiment pretext-comparison: pretexts vs random init on Fashion-MNIST -> table, plot",
    ),
    # A string, resolved only when run: pipeline does not import flows/.
    "deploy": ("flows.deploy:cli", "Prefect deployments on a work pool: mfm deploy [--pool NAME] [--kubernetes]"),
}

# The extras of pyproject.toml and the top-level modules each brings (tests/test_registry_light.py
# checks this against the installed distributions). The bare install has none of them.
EXTRAS: dict[str, set[str]] = {
    "train": {"deepspeed", "tensorboard", "tqdm", "matplotlib", "skimage", "webdataset"},
    "flows": {"prefect"},
    "eval": {"imagecorruptions", "skimage", "matplotlib"},
    "dali": {"nvidia.dali"},
    "dask": {"distributed", "prefect_dask"},
    "bench": {"streaming", "litdata"},  # not in [all] (pyproject.toml says why)
}
# The extras a command needs, checked before it starts; the others need the bare install only.
NEEDS: dict[str, tuple[str, ...]] = {
    "demo": ("train", "flows", "eval"),
    "sample-data": ("train",),
    "shard": ("train",),
    "pretrain": ("train",),
    "finetune": ("train",),
    "bench": ("train",),
    "evaluate": ("eval",),
    "report": ("eval",),  # matplotlib draws the curves
    "experiment": ("train",),
    "deploy": ("flows",),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def missing_module(command: str) -> str | None:
    """The first module of `command`'s extras that is not installed (found without importing it)."""
    for extra in NEEDS.get(command, ()):
        for module in sorted(EXTRAS[extra]):
            if not _importable(module):
                return module
    return None


def _extra_message(command: str, module: str) -> str | None:
    top = module.split(".")[0]
    extras = [e for e in NEEDS.get(command, ()) if any(m.split(".")[0] == top for m in EXTRAS[e])]
    extras = extras or [e for e, mods in EXTRAS.items() if any(m.split(".")[0] == top for m in mods)][:1]
    if not extras:
        return None
    needs = ",".join(NEEDS.get(command, ())) if set(extras) <= set(NEEDS.get(command, ())) else extras[0]
    return (
        f"mfm {command}: needs the [{needs}] extra{'s' if ',' in needs else ''} "
        f"(module {module!r} is not installed): pip install 'mfm-pipeline[{needs}]'"
    )


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
        cfg = load_config(args.preset, args.overrides)
        print(dump_config(cfg), end="")
        print(step_budget_note(cfg))
    return 0


def step_budget_note(cfg) -> str:
    """A YAML comment saying what sets the run's length (the step count needs data.train's size)."""
    if cfg.train.max_steps:
        return (
            f"# steps: {cfg.train.max_steps}, set by train.max_steps (wins over optim.epochs={cfg.optim.epochs}; "
            "when longer than the epochs, the lr schedule is stretched to it)"
        )
    from pipeline import storage

    try:  # a local split only: showing a config never waits on the network
        if not isinstance(cfg.data.train, str) or not storage.is_local(cfg.data.train):
            raise FileNotFoundError(cfg.data.train)
        from pipeline.sharding import read_manifest

        samples = read_manifest(cfg.data.train, cfg.storage)["num_samples"]
    except (OSError, ValueError, KeyError):  # not sharded yet, or a mix: known once it runs
        return f"# steps: optim.epochs={cfg.optim.epochs} x steps per epoch of data.train (train.max_steps unset)"
    per_epoch = samples // cfg.data.batch_size
    return (
        f"# steps: {cfg.optim.epochs * per_epoch}, set by optim.epochs={cfg.optim.epochs} x {per_epoch} "
        f"steps per epoch ({samples} samples in data.train / batch {cfg.data.batch_size}; train.max_steps unset)"
    )


def _usage() -> str:
    width = max(map(len, COMMANDS))
    needs = {name: f" [{','.join(extras)}]" for name, extras in NEEDS.items()}
    rows = "\n".join(f"  {name:<{width}}  {help_}{needs.get(name, '')}" for name, (_, help_) in COMMANDS.items())
    return (
        "usage: mfm [-v] COMMAND [ARGS]\n\n  -v, --verbose  also show third-party output (DeepSpeed's build probes,\n"
        "                 Prefect's server), which otherwise goes to log files only\n\n"
        f"commands:\n{rows}\n\n"
        "[extra]: a command of the pipeline, installed with pip install 'mfm-pipeline[extra]'\n"
    )


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-v", "--verbose"):  # third-party output on the terminal too (pipeline.logs)
        import os

        from pipeline.logs import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mfm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr, end="")
        return 2
    missing = missing_module(name)
    if missing:
        print(_extra_message(name, missing), file=sys.stderr)
        return 1
    module, func = COMMANDS[name][0].split(":")
    try:
        return getattr(importlib.import_module(module), func)(rest) or 0
    except ConfigError as e:
        print(f"mfm {name}: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        message = _extra_message(name, e.name or "")
        if message is None:
            raise  # not an optional dependency: a real bug, keep its traceback
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
