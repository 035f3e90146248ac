"""Verified loading: pull a version with every file checked against its manifest, and build the
timm model from safetensors + config.json (never a pickle)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.registry.refs import (
    CONFIG,
    MANIFEST,
    WEIGHTS,
    IntegrityError,
    Ref,
    RegistryError,
    check_safetensors,
    json_bytes,
    parse_json,
)
from pipeline.registry.store import Registry, default_registry


def pull_version(reg: Registry, ref: str | Ref, dest: str | os.PathLike) -> tuple[Ref, Path]:
    """Download a version into local folder `dest`, verifying every file's size and sha256.

    Files are verified before they take their final names; on any mismatch nothing of the
    failed file is left behind and IntegrityError names it."""
    target = reg.resolve(ref)
    manifest = reg.manifest(target)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vurl = reg.version_url(target.name, target.version)
    for fname, expected in sorted(manifest["files"].items()):
        if fname in ("", ".", "..") or "/" in fname or "\\" in fname:
            raise IntegrityError(f"{target}: manifest lists an unsafe file name {fname!r}; refusing to pull")
        fetch_verified(storage.join(vurl, fname), dest / fname, expected, f"{target}: {fname}", reg.storage)
    (dest / MANIFEST).write_bytes(json_bytes(manifest))
    return target, dest


def fetch_verified(url: str, out: Path, expected: dict, what: str, storage_cfg: StorageConfig | None = None) -> None:
    """Stream `url` to `out` through a temporary name, renamed only once size and sha256 match."""
    fs, path = storage.filesystem(url, storage_cfg)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")

    def fetch():
        digest, size = hashlib.sha256(), 0
        with fs.open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return digest.hexdigest(), size

    try:
        try:
            sha, size = storage.retry(fetch, what=f"download {url}")
        except FileNotFoundError:
            raise IntegrityError(f"{what}: file is missing from the registry ({url})") from None
        if size != expected["size"] or sha != expected["sha256"]:
            raise IntegrityError(
                f"{what}: checksum mismatch ({url}): expected sha256 {expected['sha256']} "
                f"size {expected['size']}, got sha256 {sha} size {size}; refusing to use it"
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_version(reg: Registry, ref: str | Ref, *, num_classes: int | None = None, dest: str | None = None):
    with tempfile.TemporaryDirectory(prefix="mfm-pull-") as tmp:
        _, folder = pull_version(reg, ref, dest or tmp)
        return model_from_folder(folder, num_classes=num_classes)


def model_from_export(config: dict, state: dict, *, num_classes: int | None = None):
    """timm.create_model from a timm config.json dict, then the state dict loaded strictly.

    With `num_classes` different from the export's (fine-tuning a pretrained encoder), only the
    new classifier's weights may be missing."""
    import timm

    exported = int(config.get("num_classes") or 0)
    classes = exported if num_classes is None else num_classes
    model = timm.create_model(
        config["architecture"],
        pretrained=False,
        num_classes=classes,
        pretrained_cfg_overlay=dict(config.get("pretrained_cfg") or {}, num_classes=classes),
        **(config.get("model_args") or {}),
    )
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


def model_from_folder(folder: str | os.PathLike, *, num_classes: int | None = None):
    """Load a local folder holding model.safetensors + config.json (a pull or an export)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for fname in (WEIGHTS, CONFIG):
        if not (folder / fname).exists():
            raise IntegrityError(f"{folder / fname}: file is missing")
    config = parse_json((folder / CONFIG).read_bytes(), str(folder / CONFIG))
    return model_from_export(config, load_file(str(folder / WEIGHTS)), num_classes=num_classes)


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
    config = parse_json(data[CONFIG], storage.join(export_url, CONFIG))
    return model_from_export(config, load_safetensors(data[WEIGHTS]), num_classes=num_classes), config


def load_model(
    ref: str, registry: str | None = None, *, num_classes: int | None = None, storage_cfg: StorageConfig | None = None
):
    """`load_model("name@production")`: a timm model (eval mode) with verified weights.

    Raises IntegrityError naming the file if any file is missing or its checksum is wrong."""
    return Registry(registry or default_registry(), storage_cfg).load_model(ref, num_classes=num_classes)


def pull(
    ref: str, dest: str | os.PathLike, registry: str | None = None, storage_cfg: StorageConfig | None = None
) -> tuple[Ref, Path]:
    return Registry(registry or default_registry(), storage_cfg).pull(ref, dest)
