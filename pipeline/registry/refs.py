"""Refs, names, file names and errors: the registry's data model, pure code (no I/O)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from typing import Any

FORMAT_VERSION = 1
ALIAS_FORMAT_VERSION = 1
DEFAULT_REGISTRY = "demo-out/registry"
WEIGHTS, CONFIG, CARD, METRICS, MANIFEST, CLAIM = (
    "model.safetensors",
    "config.json",
    "README.md",
    "metrics.json",
    "manifest.json",
    ".claim",
)
# Always applied with fullmatch: `$` would also match before a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RE = re.compile(r"v([1-9][0-9]*)")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_ATTEMPTS = 1000  # version claims / alias swaps before giving up (only under absurd contention)


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message names the name/version/file."""


class IntegrityError(RegistryError):
    """A file is missing or its bytes do not match the manifest."""


class PromotionRefused(RegistryError):
    """The promotion gate kept the alias where it was."""


# ---------------------------------------------------------------------------- refs


@dataclasses.dataclass(frozen=True)
class Ref:
    """`name@vN` (version set) or `name@alias` (alias set); a bare name means `name@latest`."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@v{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise RegistryError(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' (1-128 characters)")
    if what == "alias" and re.fullmatch(r"v\d+", value):
        raise RegistryError(f"invalid alias {value!r}: v<N> names a version")
    return value


def parse_ref(ref: str) -> Ref:
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return Ref(name, alias="latest")
    m = VERSION_RE.fullmatch(selector)
    if m:
        return Ref(name, version=int(m.group(1)))
    if re.fullmatch(r"v\d+", selector):
        raise RegistryError(f"invalid version {selector!r} in {ref!r}: versions are v1, v2, ...")
    return Ref(name, alias=check_name(selector, "alias"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_safetensors(data: bytes, what: str) -> dict:
    """The safetensors header of `data`; refuses anything else (a pickle, a truncated file)."""
    if len(data) < 8:
        raise RegistryError(f"{what}: not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise RegistryError(f"{what}: not a safetensors file (header length {n} for {len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise RegistryError(f"{what}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise RegistryError(f"{what}: not a safetensors file (header is not a mapping)")
    return header


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise RegistryError(f"{what}: not valid JSON: {e}") from None


# ---------------------------------------------------------------------------- shapes of stored JSON
# Aliases and manifests are read from shared storage: check their shape before using any field,
# so a wrong one is reported with the file's URL instead of a KeyError/AttributeError.


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _format_version(obj: dict, newest: int, what: str) -> None:
    fv = obj.get("format_version", 0)
    if not _is_int(fv):
        raise RegistryError(f"{what}: 'format_version' must be an integer, got {fv!r}")
    if fv > newest:
        raise RegistryError(
            f"{what}: format_version {fv} is newer than this code reads ({newest}); upgrade mfm-pipeline"
        )


def check_file_name(fname: Any, what: str) -> str:
    """A manifest's file name: a plain name inside the version folder, nothing else."""
    if (
        not isinstance(fname, str)
        or fname in ("", ".", "..", MANIFEST, CLAIM)
        or any(c in fname for c in "/\\\0\n")
        or "://" in fname
    ):
        raise RegistryError(f"{what}: unsafe or reserved file name {fname!r} in the manifest")
    return fname


def check_alias(payload: Any, what: str) -> int:
    """The version an alias payload points at; RegistryError naming `what` if it has the wrong shape."""
    if not isinstance(payload, dict):
        raise RegistryError(f"{what}: an alias is a JSON object with a 'version', got {type(payload).__name__}")
    _format_version(payload, ALIAS_FORMAT_VERSION, what)
    version = payload.get("version")
    if not _is_int(version) or version < 1:
        raise RegistryError(f"{what}: 'version' must be a version number (1, 2, ...), got {version!r}")
    return version


def check_manifest(manifest: Any, what: str) -> dict:
    """`manifest` if it has the shape this code reads; RegistryError naming `what` and the key otherwise."""
    if not isinstance(manifest, dict):
        raise RegistryError(f"{what}: a manifest is a JSON object, got {type(manifest).__name__}")
    _format_version(manifest, FORMAT_VERSION, what)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise RegistryError(f"{what}: 'files' must map file names to {{sha256, size}}, got {type(files).__name__}")
    for fname, entry in files.items():
        check_file_name(fname, what)
        if not isinstance(entry, dict):
            raise RegistryError(f"{what}: files[{fname!r}] must be {{sha256, size}}, got {entry!r}")
        sha, size = entry.get("sha256"), entry.get("size")
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise RegistryError(f"{what}: files[{fname!r}].sha256 is not a sha256 hex digest: {sha!r}")
        if not _is_int(size) or size < 0:
            raise RegistryError(f"{what}: files[{fname!r}].size must be a byte count, got {size!r}")
    missing = [f for f in (WEIGHTS, CONFIG) if f not in files]
    if missing:
        raise RegistryError(f"{what}: the manifest does not list {' and '.join(missing)}; not a loadable version")
    for key in ("metrics", "model", "lineage"):
        if not isinstance(manifest.get(key, {}), dict):
            raise RegistryError(f"{what}: {key!r} must be a JSON object, got {type(manifest[key]).__name__}")
    metrics = manifest.get("metrics") or {}
    bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    if bad:
        raise RegistryError(f"{what}: 'metrics' values must be numbers, got {bad!r}")
    return manifest
