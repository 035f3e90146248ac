"""Warm starts: pretraining that begins from a registered model's weights (`pretrain.init`).

The init is pinned before any rank starts: an alias (`NAME@production`) becomes the version it
points at now (`NAME@v3`), written to the run's config.yaml, so every rank, a resumed run and
the registry lineage of what comes out all name the same weights. Registry versions are pulled
with their sha256 checked against the version manifest, and read as safetensors, never a pickle.
Weights only: the optimiser state and the schedule start fresh (pipeline/config.py, PretrainConfig).
"""

from __future__ import annotations

import json
import logging
import re

import torch
from torch import nn

from pipeline import storage
from pipeline.config import Config, ConfigError
from pipeline.registry import is_registry_ref

log = logging.getLogger(__name__)
# A fine-tuned classifier may be the init: its head and the norm that replaced the encoder's
# final one are dropped, and the encoder's final norm then starts fresh.
CLASSIFIER_ONLY = ("head", "fc_norm")
REPLACED_BY_FC_NORM = ("norm",)


def _registry(cfg: Config):
    from pipeline.registry import Registry, default_registry

    return Registry(cfg.pretrain.registry or default_registry(), cfg.storage)


def started_from(cfg: Config) -> str | None:
    """pretrain.init recorded by a run that already has a complete checkpoint in train.run_dir."""
    import yaml

    fs, path = storage.filesystem(cfg.train.run_dir, cfg.storage)
    config_url = storage.join(cfg.train.run_dir, "config.yaml")
    if not fs.glob(f"{path}/step-*/COMPLETE") or not storage.exists(config_url, cfg.storage):
        return None
    return ((yaml.safe_load(storage.read_bytes(config_url, cfg.storage)) or {}).get("pretrain") or {}).get("init")


def pin(cfg: Config) -> Config:
    """cfg with pretrain.init pinned to a version; ConfigError naming the key if it cannot be used."""
    from pipeline.registry import CONFIG, RegistryError

    init = cfg.pretrain.init
    if not init:
        return cfg
    before = started_from(cfg)
    if before and before != init:
        log.warning(
            "%s continues from pretrain.init=%s (recorded at its start), not %s", cfg.train.run_dir, before, init
        )
        init = before
    try:
        if is_registry_ref(init):
            reg = _registry(cfg)
            ref = reg.resolve(init)
            init = str(ref)
            config_url = storage.join(reg.version_url(ref.name, ref.version), CONFIG)
        else:
            config_url = storage.join(init, CONFIG)
        try:
            export = json.loads(storage.read_bytes(config_url, cfg.storage))
        except FileNotFoundError:
            raise ConfigError(
                f"pretrain.init={init!r}: no {CONFIG} at {config_url} (expected a registry ref NAME@ALIAS / "
                "NAME@vN or an export folder)"
            ) from None
    except RegistryError as e:
        raise ConfigError(f"pretrain.init={cfg.pretrain.init!r}: {e}") from None
    if export.get("architecture") != cfg.model.name:
        raise ConfigError(
            f"pretrain.init={init!r} is a {export.get('architecture')!r}, but model.name={cfg.model.name!r}"
        )
    if init != cfg.pretrain.init:
        log.info("pretrain.init=%s pinned to %s", cfg.pretrain.init, init)
    return cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"init": init})})


def read_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The weights of the pinned init, verified (registry) or at least checked as safetensors."""
    from pipeline.registry import read_init_weights

    return read_init_weights(cfg.pretrain.init, _registry(cfg), cfg.storage)


def load_encoder(encoder: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, list[str]]:
    """Load an encoder's (or a classifier's) weights into the pretraining encoder. Only a
    classifier's head/fc_norm may be extra and, with fc_norm there, the final norm missing."""
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ (another width, patch size, image size)
        raise ValueError(f"{what}: weights do not fit {type(encoder).__name__}: {e}") from None
    has_fc_norm = any(k.startswith("fc_norm.") for k in state)
    unexpected = [k for k in result.unexpected_keys if k.split(".")[0] not in CLASSIFIER_ONLY]
    missing = [k for k in result.missing_keys if not (has_fc_norm and k.split(".")[0] in REPLACED_BY_FC_NORM)]
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not fit the encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {"fresh": list(result.missing_keys), "dropped": list(result.unexpected_keys)}


def warm_start(model, cfg: Config) -> None:
    """Load pretrain.init into model.encoder (the decoder keeps its fresh init)."""
    init = cfg.pretrain.init
    if is_registry_ref(init) and not re.fullmatch(r".+@v\d+", init):
        # each rank resolving an alias for itself could load different versions
        raise ConfigError(f"pretrain.init={init!r}: not pinned to a version; pin it first (warm_start.pin)")
    keys = load_encoder(model.encoder, read_state(cfg), f"pretrain.init={cfg.pretrain.init}")
    log.info(
        "pretrain.init=%s: encoder loaded; fresh %s; dropped %s",
        cfg.pretrain.init,
        sorted({k.rsplit(".", 1)[0] for k in keys["fresh"]}) or "none",
        sorted({k.rsplit(".", 1)[0] for k in keys["dropped"]}) or "none",
    )
