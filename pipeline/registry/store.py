"""`Registry`: versions, aliases and registration on any fsspec store, safe against concurrent writers.

Version numbers are claimed with a create-if-absent write and aliases move by compare-and-swap
(`pipeline.storage`'s conditional writes); a version exists only once its manifest exists.
The bottom of the registry's stack: it builds on the pure modules (refs, gate, card, lineage,
architecture) only; gc, cache, loading and commands build on it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Callable

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.registry.architecture import check_model_config
from pipeline.registry.card import model_card
from pipeline.registry.gate import flatten_metrics, gate_decision
from pipeline.registry.lineage import existing, version_lineage
from pipeline.registry.refs import (
    ALIAS_FORMAT_VERSION,
    CARD,
    CLAIM,
    CONFIG,
    DEFAULT_REGISTRY,
    FORMAT_VERSION,
    MANIFEST,
    MAX_ATTEMPTS,
    METRICS,
    NAME_RE,
    VERSION_RE,
    WEIGHTS,
    PromotionRefused,
    Ref,
    RegistryError,
    check_alias,
    check_manifest,
    check_name,
    check_safetensors,
    json_bytes,
    parse_json,
    parse_ref,
    sha256_bytes,
    utc_now,
)

log = logging.getLogger(__name__)


def default_registry() -> str:
    return os.environ.get("MFM_REGISTRY") or DEFAULT_REGISTRY


@dataclasses.dataclass
class Registry:
    """A registry at `url`; every method is safe against concurrent writers."""

    url: str = dataclasses.field(default_factory=default_registry)
    storage: StorageConfig | None = None

    def _u(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def version_url(self, name: str, version: int) -> str:
        return self._u(name, f"v{version}")

    def alias_url(self, name: str, alias: str) -> str:
        return self._u(name, "aliases", f"{alias}.json")

    def ls(self, *parts: str) -> list[str]:
        """Entry names under a folder of the registry (none if it does not exist)."""
        fs, path = storage.filesystem(self._u(*parts), self.storage)
        try:
            entries = storage.retry(lambda: fs.ls(path, detail=False), what=f"list {self._u(*parts)}")
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    # -- reading

    def names(self) -> list[str]:
        return sorted(n for n in self.ls() if NAME_RE.fullmatch(n) and self.versions(n))

    def claimed(self, name: str) -> list[int]:
        """Version numbers taken (with or without a manifest), ascending."""
        return sorted(int(m.group(1)) for m in map(VERSION_RE.fullmatch, self.ls(name)) if m)

    def versions(self, name: str) -> list[int]:
        """Complete versions (those with a manifest), ascending."""
        return [v for v in self.claimed(name) if storage.exists(self._u(name, f"v{v}", MANIFEST), self.storage)]

    def aliases(self, name: str, problems: list[str] | None = None) -> dict[str, int]:
        """alias -> version. An unreadable alias is left out and reported (appended to `problems`,
        else logged): one bad file must not hide the others."""
        out = {}
        for entry in self.ls(name, "aliases"):
            if entry.endswith(".json") and not entry.startswith("."):
                alias = entry[: -len(".json")]
                try:
                    version = self.alias_version(name, check_name(alias, "alias"))
                except RegistryError as e:
                    if problems is None:
                        log.warning("skipping alias: %s", e)
                    else:
                        problems.append(str(e))
                    continue
                if version is not None:
                    out[alias] = version
        return out

    def alias_version(self, name: str, alias: str) -> int | None:
        got = storage.read_versioned(self.alias_url(name, alias), self.storage)
        return None if got is None else self._alias_payload_version(got[0], name, alias)

    def _alias_payload_version(self, data: bytes, name: str, alias: str) -> int:
        url = self.alias_url(name, alias)
        return check_alias(parse_json(data, url), url)

    def resolve(self, ref: str | Ref) -> Ref:
        """The `name@vN` a ref points at now."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.version is not None:
            version = ref.version
        else:
            version = self.alias_version(ref.name, ref.alias)
            if version is None:
                known = ", ".join(sorted(self.aliases(ref.name))) or "none"
                raise RegistryError(f"{ref}: no alias {ref.alias!r} for {ref.name!r} in {self.url} (aliases: {known})")
        if not storage.exists(self._u(ref.name, f"v{version}", MANIFEST), self.storage):
            known = ", ".join(f"v{v}" for v in self.versions(ref.name)) or "none"
            raise RegistryError(
                f"{ref.name}@v{version}: no such version in {self.url} ({MANIFEST} missing; versions: {known})"
            )
        return Ref(ref.name, version=version)

    def manifest(self, ref: str | Ref) -> dict:
        return self.read_manifest(ref)[1]

    def read_manifest(self, ref: str | Ref) -> tuple[Ref, dict, bytes]:
        """(name@vN, checked manifest, its bytes as stored) for a ref resolved now."""
        target = self.resolve(ref)
        url = self._u(target.name, f"v{target.version}", MANIFEST)
        raw = storage.read_bytes(url, self.storage)
        return target, check_manifest(parse_json(raw, url), url), raw

    def metrics(self, ref: str | Ref) -> dict[str, float]:
        return dict(self.manifest(ref).get("metrics") or {})

    # -- writing

    def _claim(self, name: str, owner: str) -> int:
        """Take the next free version number: create-if-absent on v<N>/.claim, N+1 on conflict."""
        claimed = self.claimed(name)
        version = (claimed[-1] if claimed else 0) + 1
        for _ in range(MAX_ATTEMPTS):
            url = self._u(name, f"v{version}", CLAIM)
            body = json_bytes({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "created": utc_now()})
            if storage.create_bytes(url, body, self.storage):
                return version
            # A retried write whose first attempt landed reads as a conflict: check the owner.
            existing = parse_json(storage.read_bytes(url, self.storage), url)
            if existing.get("owner") == owner:
                return version
            version += 1
        raise RegistryError(f"{name}: could not claim a version after {MAX_ATTEMPTS} attempts")

    def register(
        self,
        name: str,
        export_url: str,
        *,
        metrics: dict | None = None,
        metrics_url: str | None = None,
        data_manifest_url: str | None = None,
        run_config_url: str | None = None,
        parent: str | None = None,
        aliases: tuple[str, ...] = ("latest",),
    ) -> Ref:
        """Copy an export folder (model.safetensors + config.json) into a new version of `name`."""
        check_name(name)
        for alias in aliases:
            check_name(alias, "alias")
        files: dict[str, bytes] = {}
        for fname in (WEIGHTS, CONFIG):
            url = storage.join(export_url, fname)
            try:
                files[fname] = storage.read_bytes(url, self.storage)
            except FileNotFoundError:
                raise RegistryError(f"export {export_url} has no {fname} ({url})") from None
        check_safetensors(files[WEIGHTS], storage.join(export_url, WEIGHTS))
        config_url = storage.join(export_url, CONFIG)
        config = check_model_config(parse_json(files[CONFIG], config_url), config_url)

        if metrics is None:
            metrics_url = metrics_url or existing(storage.join(export_url, METRICS), self.storage)
            if metrics_url:
                metrics = parse_json(storage.read_bytes(metrics_url, self.storage), metrics_url)
        if metrics is not None:
            files[METRICS] = json_bytes(metrics)
        flat = flatten_metrics(metrics or {})
        digests = {f: sha256_bytes(d) for f, d in files.items()}
        same = self._find_registered(name, digests)
        if same is not None:
            # A retried registration (e.g. a flow that failed before promoting): same bytes, same version.
            log.info("%s: %s holds the same files; not registering them again", export_url, same)
            self._point_aliases(name, same.version, aliases)
            return same
        parent = str(self.resolve(parent)) if parent else None  # pin an alias to the version it means now
        lineage = version_lineage(export_url, data_manifest_url, run_config_url, parent, self.storage)

        owner = uuid.uuid4().hex
        version = self._claim(name, owner)
        files[CARD] = model_card(name, version, config, lineage, flat).encode()
        vurl = self.version_url(name, version)
        for fname, data in files.items():
            storage.write_bytes(storage.join(vurl, fname), data, self.storage)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created": utc_now(),
            "files": {f: {"sha256": sha256_bytes(d), "size": len(d)} for f, d in sorted(files.items())},
            "model": {
                "architecture": config["architecture"],
                "num_classes": config.get("num_classes"),
                "num_features": config.get("num_features"),
            },
            "lineage": lineage,
            "metrics": flat,
        }
        if not storage.create_bytes(storage.join(vurl, MANIFEST), json_bytes(manifest), self.storage):
            raise RegistryError(f"{vurl}/{MANIFEST} appeared while registering v{version} (claim {owner} was ours)")
        self._point_aliases(name, version, aliases)
        return Ref(name, version=version)

    def _point_aliases(self, name: str, version: int, aliases: tuple[str, ...]) -> None:
        for alias in aliases:
            if alias == "latest":
                self._move_alias(name, alias, lambda cur: version if cur is None or version > cur else None)
            else:
                self.set_alias(name, alias, version)

    def _find_registered(self, name: str, digests: dict[str, str]) -> Ref | None:
        """The newest version whose export files (weights, config, metrics) have exactly these sha256s."""
        for version in reversed(self.versions(name)):
            try:
                files = self.manifest(Ref(name, version=version))["files"]
            except RegistryError:
                continue  # a broken version is never "the same"
            if {f: files[f]["sha256"] for f in files if f != CARD} == digests:
                return Ref(name, version=version)
        return None

    def _move_alias(self, name: str, alias: str, decide: Callable[[int | None], int | None]) -> int | None:
        """Compare-and-swap loop: decide(current) -> new version (None: leave it); returns the
        version the alias holds afterwards. decide may raise to refuse."""
        url = self.alias_url(name, alias)
        for _ in range(MAX_ATTEMPTS):
            got = storage.read_versioned(url, self.storage)
            current = None if got is None else self._alias_payload_version(got[0], name, alias)
            new = decide(current)
            if new is None or new == current:
                return current
            body = json_bytes(
                {
                    "format_version": ALIAS_FORMAT_VERSION,
                    "name": name,
                    "alias": alias,
                    "version": new,
                    "previous": current,
                    "updated": utc_now(),
                }
            )
            if storage.replace_bytes_if(url, body, None if got is None else got[1], self.storage):
                return new
        raise RegistryError(f"{name}@{alias}: could not move the alias after {MAX_ATTEMPTS} attempts")

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at a version, ungated."""
        check_name(alias, "alias")
        self.resolve(Ref(name, version=version))
        self._move_alias(name, alias, lambda cur: version)

    def promote(
        self,
        ref: str | Ref,
        alias: str = "production",
        *,
        gate_metric: str | None = "top1",
        higher_is_better: bool = True,
        force: bool = False,
    ) -> str:
        """Move `alias` to the version `ref` resolves to, if its `gate_metric` beats the version the
        alias holds now (re-checked against whatever a racing promotion wrote). Returns the reason;
        raises PromotionRefused otherwise."""
        check_name(alias, "alias")
        target = self.resolve(ref)
        candidate = self.metrics(target)
        reasons: list[str] = []

        def decide(current: int | None) -> int | None:
            if current == target.version:
                reasons.append(f"{target.name}@{alias} is already v{target.version}")
                return None
            if force or not gate_metric:
                reasons.append("ungated" if not gate_metric else "forced")
                return target.version
            now = None if current is None else self.metrics(Ref(target.name, version=current))
            ok, why = gate_decision(candidate, now, gate_metric, higher_is_better)
            if not ok:
                raise PromotionRefused(
                    f"refused to move {target.name}@{alias} "
                    f"{'(unset)' if current is None else f'from v{current}'} to v{target.version}: {why}"
                )
            reasons.append(why)
            return target.version

        self._move_alias(target.name, alias, decide)
        return reasons[-1]
