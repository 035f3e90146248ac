"""What a config.json (from an export or a registry version: untrusted) may ask timm to build.

timm.create_model takes more than a shape: an `hf-hub:`/`local-dir:` name makes it fetch or read
a config, and `checkpoint_path` or a `pretrained_cfg` with a `file`/`url` makes it load one.
Only a plain registered model name, the constructor arguments of its class and the pretrained_cfg
fields that describe preprocessing pass.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

from pipeline.registry.refs import RegistryError

# create_model/build_model_with_cfg arguments that load or fetch something, never taken from a file
FORBIDDEN_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "pretrained_model_args",
        "checkpoint_path",
        "cache_dir",
        "feature_cfg",
        "features_only",
        "scriptable",
        "exportable",
        "no_jit",
        "device",
        "dtype",
    }
)
# pretrained_cfg fields that only describe the weights and their preprocessing
PRETRAINED_CFG_KEYS = frozenset(
    {
        "tag",
        "custom_load",
        "input_size",
        "test_input_size",
        "min_input_size",
        "fixed_input_size",
        "interpolation",
        "crop_pct",
        "test_crop_pct",
        "crop_mode",
        "mean",
        "std",
        "num_classes",
        "pool_size",
        "first_conv",
        "classifier",
        "label_offset",
        "license",
    }
)
ARCH_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,127}")
JSON_SCALARS = (str, int, float, bool, type(None))


def check_model_config(config: Any, what: str) -> dict:
    """`config` if it is a timm config.json this code builds from; RegistryError naming `what` and
    the key otherwise. The shape is checked without timm; see `check_buildable` for the rest."""
    if not isinstance(config, dict):
        raise RegistryError(f"{what}: a timm config is a JSON object, got {type(config).__name__}")
    arch = config.get("architecture")
    if not isinstance(arch, str) or not ARCH_RE.fullmatch(arch):
        raise RegistryError(
            f"{what}: 'architecture' must be a plain timm model name (lower-case letters, digits, '_'; "
            f"no 'hf-hub:'/'local-dir:' source, no tag), got {arch!r}"
        )
    for key in ("num_classes", "num_features"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise RegistryError(f"{what}: {key!r} must be a non-negative integer, got {value!r}")
    args = config.get("model_args")
    if args is not None:
        if not isinstance(args, dict):
            raise RegistryError(f"{what}: 'model_args' must be a JSON object, got {type(args).__name__}")
        for key, value in args.items():
            if not isinstance(key, str) or not key.isidentifier() or key in FORBIDDEN_ARGS:
                raise RegistryError(f"{what}: model_args[{key!r}] is not an argument a config may set")
            if not _plain(value):
                raise RegistryError(f"{what}: model_args[{key!r}] must be a number, string, bool or list: {value!r}")
    pcfg = config.get("pretrained_cfg")
    if pcfg is not None:
        if not isinstance(pcfg, dict):
            raise RegistryError(f"{what}: 'pretrained_cfg' must be a JSON object, got {type(pcfg).__name__}")
        for key, value in pcfg.items():
            if key in PRETRAINED_CFG_KEYS and not _plain(value):
                raise RegistryError(f"{what}: pretrained_cfg[{key!r}] must be a number, string or list, got {value!r}")
    return config


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, list):
        return depth < 2 and len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    return isinstance(value, JSON_SCALARS)


def pretrained_cfg_overlay(config: dict) -> dict:
    """The descriptive pretrained_cfg fields of a checked config (no file, url or hub id)."""
    return {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in PRETRAINED_CFG_KEYS}


def check_buildable(config: dict, what: str) -> dict:
    """The model_args of a checked config, once its architecture is a registered timm model and
    every argument is one its class's constructor takes."""
    import timm

    arch = config["architecture"]
    if arch not in _model_names():
        raise RegistryError(f"{what}: architecture {arch!r} is not a timm model (timm {timm.__version__})")
    args = dict(config.get("model_args") or {})
    accepted = _constructor_args(arch)
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise RegistryError(f"{what}: model_args {unknown} are not arguments of {arch}'s constructor")
    return args


@functools.lru_cache(maxsize=1)
def _model_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.lru_cache(maxsize=64)
def _constructor_args(arch: str) -> frozenset[str]:
    """Keyword arguments of the class the entrypoint builds (found by building it on the meta
    device: no memory, no init), less the ones that load anything."""
    import timm
    import torch

    with torch.device("meta"):
        cls = type(timm.create_model(arch, pretrained=False))
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break  # this class names every argument it takes
    return frozenset(names - {"self"} - FORBIDDEN_ARGS)
