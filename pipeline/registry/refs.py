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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
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
    if not NAME_RE.match(value or ""):
        raise RegistryError(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' (1-128 characters)")
    if what == "alias" and re.match(r"^v\d+$", value):
        raise RegistryError(f"invalid alias {value!r}: v<N> names a version")
    return value


def parse_ref(ref: str) -> Ref:
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return Ref(name, alias="latest")
    m = VERSION_RE.match(selector)
    if m:
        return Ref(name, version=int(m.group(1)))
    if re.match(r"^v\d+$", selector):
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
