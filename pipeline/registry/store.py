"""`Registry`: versions, aliases and registration on any fsspec store, safe against concurrent writers.

Version numbers are claimed with a create-if-absent write and aliases move by compare-and-swap
(`pipeline.storage`'s conditional writes); a version exists only once its manifest exists.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.registry.card import code_version, model_card
from pipeline.registry.gate import flatten_metrics, gate_decision
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

    def _ls(self, *parts: str) -> list[str]:
        fs, path = storage.filesystem(self._u(*parts), self.storage)
        try:
            entries = storage.retry(lambda: fs.ls(path, detail=False), what=f"list {self._u(*parts)}")
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    # -- reading

    def names(self) -> list[str]:
        return sorted(n for n in self._ls() if NAME_RE.fullmatch(n) and self.versions(n))

    def _claimed(self, name: str) -> list[int]:
        return sorted(int(m.group(1)) for m in map(VERSION_RE.fullmatch, self._ls(name)) if m)

    def versions(self, name: str) -> list[int]:
        """Complete versions (those with a manifest), ascending."""
        return [v for v in self._claimed(name) if storage.exists(self._u(name, f"v{v}", MANIFEST), self.storage)]

    def aliases(self, name: str, problems: list[str] | None = None) -> dict[str, int]:
        """alias -> version. An unreadable alias is left out and reported (appended to `problems`,
        else logged): one bad file must not hide the others."""
        out = {}
        for entry in self._ls(name, "aliases"):
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
        claimed = self._claimed(name)
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
        config = parse_json(files[CONFIG], storage.join(export_url, CONFIG))
        if not isinstance(config, dict) or "architecture" not in config:
            raise RegistryError(f"{storage.join(export_url, CONFIG)}: not a timm config (no 'architecture')")

        if metrics is None:
            metrics_url = metrics_url or _existing(storage.join(export_url, METRICS), self.storage)
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
        lineage = self._lineage(export_url, data_manifest_url, run_config_url, parent)

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

    def gc(self, older_than_s: float, name: str | None = None, *, dry_run: bool = False) -> list[str]:
        """Remove abandoned claims: `v<N>/` folders holding a `.claim` older than `older_than_s`
        (by its `created` time) and no manifest (a `register` killed midway). Complete versions are
        never touched.
        Returns the folders removed (or, with dry_run, that would be)."""
        if older_than_s <= 0:
            raise RegistryError(f"gc: the age must be positive, got {older_than_s} s")
        now = dt.datetime.now(dt.timezone.utc)
        removed = []
        for n in [check_name(name)] if name else [x for x in self._ls() if NAME_RE.fullmatch(x)]:
            for version in self._claimed(n):
                vurl = self.version_url(n, version)
                claim_url = storage.join(vurl, CLAIM)
                fs, claim_path = storage.filesystem(claim_url, self.storage)
                created = self._claim_time(claim_url)
                if created is None or (now - created).total_seconds() < older_than_s:
                    continue
                if storage.exists(storage.join(vurl, MANIFEST), self.storage):
                    continue
                removed.append(vurl)
                if dry_run:
                    continue
                # The claim goes last: while it stands nobody else can take version N and write here.
                for entry in self._ls(n, f"v{version}"):
                    if entry != CLAIM:
                        if storage.exists(storage.join(vurl, MANIFEST), self.storage):
                            raise RegistryError(f"{vurl}: a manifest appeared while collecting the claim; left alone")
                        fs.rm(fs._strip_protocol(storage.join(vurl, entry)), recursive=True)
                fs.rm(claim_path)
                if storage.is_local(vurl):
                    Path(fs._strip_protocol(vurl)).rmdir()
                log.info("removed abandoned claim %s", vurl)
        return removed

    def _claim_time(self, url: str) -> dt.datetime | None:
        """When a claim was taken: its `created` field, else the store's modification time; None
        if the claim is gone."""
        try:
            body = storage.read_bytes(url, self.storage)
        except FileNotFoundError:
            return None
        try:
            created = dt.datetime.fromisoformat(json.loads(body)["created"])
        except (ValueError, KeyError, TypeError):
            fs, path = storage.filesystem(url, self.storage)
            try:
                created = fs.modified(path)
            except FileNotFoundError:
                return None
        return created if created.tzinfo else created.replace(tzinfo=dt.timezone.utc)

    def _lineage(
        self, export_url: str, data_manifest_url: str | None, run_config_url: str | None, parent: str | None
    ) -> dict:
        run_url = export_url.rstrip("/").rsplit("/", 1)[0] if export_url.rstrip("/").endswith("/export") else None
        data = None
        if data_manifest_url:
            url = (
                data_manifest_url if data_manifest_url.endswith(".json") else storage.join(data_manifest_url, MANIFEST)
            )
            try:
                raw = storage.read_bytes(url, self.storage)
            except FileNotFoundError:
                raise RegistryError(f"data manifest {url} does not exist") from None
            info = parse_json(raw, url)
            data = {
                "url": url,
                "sha256": sha256_bytes(raw),
                "split": info.get("split"),
                "num_samples": info.get("num_samples"),
                "format_version": info.get("format_version"),
                "revision": info.get("revision"),  # a growing split's revision (docs/architecture.md)
            }
        if run_config_url is None and run_url:
            run_config_url = _existing(storage.join(run_url, "config.yaml"), self.storage) or _existing(
                storage.join(run_url, "config.json"), self.storage
            )
        run_config = None
        if run_config_url:
            import yaml

            raw = storage.read_bytes(run_config_url, self.storage)
            try:
                run_config = yaml.safe_load(raw)  # JSON is YAML too
            except yaml.YAMLError as e:
                raise RegistryError(f"run config {run_config_url}: not valid YAML/JSON: {e}") from None
        if parent:
            parent = str(self.resolve(parent))  # pin an alias to the version it means now
        return {
            "export_url": export_url,
            "run_url": run_url,
            "data_manifest": data,
            "run_config_url": run_config_url,
            "run_config": run_config,
            "parent": parent,
            # pretraining continued from this (pinned) model instead of a random init
            "warm_start": _warm_start(run_config),
            "code": code_version(),
        }

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

    # -- pulling

    def pull(self, ref: str | Ref, dest: str | os.PathLike) -> tuple[Ref, Path]:
        """Download a version into local folder `dest`, every file verified (see `loading.pull_version`)."""
        from pipeline.registry.loading import pull_version

        return pull_version(self, ref, dest)

    def load_model(self, ref: str | Ref, *, num_classes: int | None = None, dest: str | None = None):
        """A timm model with the version's verified weights (see `pipeline.registry.load_model`)."""
        from pipeline.registry.loading import load_version

        return load_version(self, ref, num_classes=num_classes, dest=dest)


def _existing(url: str, storage_cfg: StorageConfig | None) -> str | None:
    return url if storage.exists(url, storage_cfg) else None


def _warm_start(run_config) -> str | None:
    section = run_config.get("pretrain") if isinstance(run_config, dict) else None
    init = section.get("init") if isinstance(section, dict) else None
    return init if isinstance(init, str) else None
