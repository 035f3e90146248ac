"""Verified loading: pull a version with every file checked against its manifest, and build the
timm model from safetensors + config.json (never a pickle)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.registry.architecture import check_buildable, check_model_config, pretrained_cfg_overlay
from pipeline.registry.cache import open_version
from pipeline.registry.refs import (
    CONFIG,
    MANIFEST,
    WEIGHTS,
    IntegrityError,
    Ref,
    RegistryError,
    check_safetensors,
    parse_json,
)
from pipeline.registry.store import Registry, default_registry


def pull_version(reg: Registry, ref: str | Ref, dest: str | os.PathLike) -> tuple[Ref, Path]:
    """A verified copy of a version in local folder `dest`, through the cache.

    The files are assembled in a temporary folder beside `dest` and moved into place only once all
    of them verified: `dest` then holds the whole version, or nothing new if anything failed."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise RegistryError(f"{dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
    try:
        with open_version(reg, ref) as (target, entry):
            manifest = parse_json((entry / MANIFEST).read_bytes(), str(entry / MANIFEST))
            names = [*sorted(manifest["files"]), MANIFEST]  # the manifest last: it marks a whole version
            tmp.mkdir()
            for fname in names:
                shutil.copyfile(entry / fname, tmp / fname)
        if not dest.exists() or not any(dest.iterdir()):
            os.replace(tmp, dest)  # a rename onto an empty folder
        else:
            for fname in names:
                os.replace(tmp / fname, dest / fname)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, dest


def load_version(reg: Registry, ref: str | Ref, *, num_classes: int | None = None, dest: str | None = None):
    if dest is not None:
        _, folder = pull_version(reg, ref, dest)
        return model_from_folder(folder, num_classes=num_classes)
    with open_version(reg, ref) as (_, entry):
        config, state = read_folder(entry)  # safetensors maps the file: nothing may replace it meanwhile
    return model_from_export(config, state, num_classes=num_classes, what=f"{ref} {CONFIG}")


def model_from_export(config: dict, state: dict, *, num_classes: int | None = None, what: str = CONFIG):
    """timm.create_model from a timm config.json dict, then the state dict loaded strictly.

    The config is untrusted (see `architecture`): only a registered model name and its
    constructor's arguments reach timm. With `num_classes` different from the export's
    (fine-tuning a pretrained encoder), only the new classifier's weights may be missing."""
    import timm
    import torch

    config = check_model_config(config, what)
    model_args = check_buildable(config, what)
    exported = int(config.get("num_classes") or 0)
    classes = exported if num_classes is None else num_classes
    model_args.pop("num_classes", None)  # the exports of timm's save_for_hf also list it here

    def create():
        return timm.create_model(
            config["architecture"],
            pretrained=False,
            num_classes=classes,
            pretrained_cfg_overlay=dict(pretrained_cfg_overlay(config), num_classes=classes),
            **model_args,
        )

    model = None
    if classes == exported:
        # Every tensor comes from `state`: build on the meta device and adopt the loaded tensors,
        # skipping timm's random init (most of a warm load: 15 s of 16 for a ViT-B on a busy CPU).
        try:
            with torch.device("meta"):
                model = create()
            result = model.load_state_dict(state, strict=False, assign=True)
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built the usual way
            model = None
        else:
            tensors = [*model.parameters(), *model.buffers()]
            if any(t.is_meta for t in tensors) or result.missing_keys:
                model = None  # a non-persistent buffer or a missing weight: it needs the real init
    if model is None:
        try:
            model = create()
        except (TypeError, ValueError, RuntimeError, AssertionError, AttributeError) as e:
            raise RegistryError(f"{what}: timm cannot build {config['architecture']} {model_args}: {e}") from None
        result = model.load_state_dict(state, strict=False)
    head = model.pretrained_cfg.get("classifier") or "head"
    heads = (head,) if isinstance(head, str) else tuple(head)
    missing = [k for k in result.missing_keys if not (classes != exported and k.startswith(heads))]
    unexpected = [k for k in result.unexpected_keys if not (classes != exported and k.startswith(heads))]
    if missing or unexpected:
        raise RegistryError(
            f"weights do not fit {config['architecture']} {config.get('model_args')}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model.eval()


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(config, state dict) of a local folder holding model.safetensors + config.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for fname in (WEIGHTS, CONFIG):
        if not (folder / fname).exists():
            raise IntegrityError(f"{folder / fname}: file is missing")
    config = check_model_config(parse_json((folder / CONFIG).read_bytes(), str(folder / CONFIG)), str(folder / CONFIG))
    return config, load_file(str(folder / WEIGHTS))


def model_from_folder(folder: str | os.PathLike, *, num_classes: int | None = None):
    """Load a local folder holding model.safetensors + config.json (a pull or an export)."""
    config, state = read_folder(folder)
    return model_from_export(config, state, num_classes=num_classes, what=str(Path(folder) / CONFIG))


def load_export(export_url: str, *, num_classes: int | None = None, storage_cfg: StorageConfig | None = None):
    """(model, config) from an export folder on any store (no manifest: nothing to verify against)."""
    from safetensors.torch import load as load_safetensors

    data = {}
    for fname in (WEIGHTS, CONFIG):
        url = storage.join(export_url, fname)
        try:
            data[fname] = storage.read_bytes(url, storage_cfg)
        except FileNotFoundError:
            raise RegistryError(f"export {export_url} has no {fname} ({url})") from None
    check_safetensors(data[WEIGHTS], storage.join(export_url, WEIGHTS))
    what = storage.join(export_url, CONFIG)
    config = parse_json(data[CONFIG], what)
    return model_from_export(config, load_safetensors(data[WEIGHTS]), num_classes=num_classes, what=what), config


def is_registry_ref(init: str) -> bool:
    """NAME@ALIAS / NAME@vN; anything with a slash (or a scheme) is an export folder URL."""
    return "@" in init and "/" not in init


def read_init_weights(init: str, reg: Registry, storage_cfg: StorageConfig | None = None) -> dict:
    """The weights of an init (a registry ref, verified against its manifest; or an export folder
    URL, checked as safetensors), never a pickle."""
    import tempfile

    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file

    if is_registry_ref(init):
        with tempfile.TemporaryDirectory(prefix="mfm-init-") as tmp:
            _, folder = pull_version(reg, init, tmp)
            return load_file(str(Path(folder) / WEIGHTS))
    url = storage.join(init, WEIGHTS)
    data = storage.read_bytes(url, storage_cfg)
    check_safetensors(data, url)
    return load_safetensors(data)


def _registry(registry: str | Registry | None, storage_cfg: StorageConfig | None) -> Registry:
    return registry if isinstance(registry, Registry) else Registry(registry or default_registry(), storage_cfg)


def load_model(
    ref: str | Ref,
    registry: str | Registry | None = None,
    *,
    num_classes: int | None = None,
    storage_cfg: StorageConfig | None = None,
    dest: str | None = None,
):
    """`load_model("name@production")`: a timm model (eval mode) with verified weights; with `dest`
    the verified files are also kept there.

    Raises IntegrityError naming the file if any file is missing or its checksum is wrong."""
    return load_version(_registry(registry, storage_cfg), ref, num_classes=num_classes, dest=dest)


def pull(
    ref: str | Ref,
    dest: str | os.PathLike,
    registry: str | Registry | None = None,
    storage_cfg: StorageConfig | None = None,
) -> tuple[Ref, Path]:
    """Download a version into local folder `dest`, every file verified (see `pull_version`)."""
    return pull_version(_registry(registry, storage_cfg), ref, dest)
