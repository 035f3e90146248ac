"""Model registry on any fsspec store: immutable numbered versions, movable aliases, verified pulls.

Layout (`<registry>` is a local folder or `s3://bucket/prefix`):
```
<registry>/<name>/v<N>/.claim            who took version N (written first, create-if-absent)
<registry>/<name>/v<N>/model.safetensors the weights (never a pickle)
<registry>/<name>/v<N>/config.json       timm config of the export
<registry>/<name>/v<N>/README.md         model card
<registry>/<name>/v<N>/metrics.json      optional evaluation results
<registry>/<name>/v<N>/manifest.json     written LAST: sha256 + size of every file, lineage
<registry>/<name>/aliases/<alias>.json   pointer {"version": N}, moved by compare-and-swap
```
A version exists only once its manifest exists. Version numbers are claimed with a
create-if-absent write, so racing registrations get distinct numbers; aliases are moved with a
compare-and-swap, so no racing move is lost (`latest` only ever moves to a larger version).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import StorageConfig

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
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
_MAX_ATTEMPTS = 1000  # version claims / alias swaps before giving up (only under absurd contention)


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message names the name/version/file."""


class IntegrityError(RegistryError):
    """A file is missing or its bytes do not match the manifest."""


class PromotionRefused(RegistryError):
    """The promotion gate kept the alias where it was."""


# ---------------------------------------------------------------------------- pure helpers


@dataclasses.dataclass(frozen=True)
class Ref:
    """`name@vN` (version set) or `name@alias` (alias set); a bare name means `name@latest`."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@v{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def check_name(value: str, what: str = "name") -> str:
    if not _NAME_RE.match(value or ""):
        raise RegistryError(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' (1-128 characters)")
    if what == "alias" and re.match(r"^v\d+$", value):
        raise RegistryError(f"invalid alias {value!r}: v<N> names a version")
    return value


def parse_ref(ref: str) -> Ref:
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return Ref(name, alias="latest")
    m = _VERSION_RE.match(selector)
    if m:
        return Ref(name, version=int(m.group(1)))
    if re.match(r"^v\d+$", selector):
        raise RegistryError(f"invalid version {selector!r} in {ref!r}: versions are v1, v2, ...")
    return Ref(name, alias=check_name(selector, "alias"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as {"a.b.c": value} (booleans and strings dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{path}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = float(value)
    return out


def gate_decision(
    candidate: dict[str, float], current: dict[str, float] | None, metric: str, higher_is_better: bool = True
) -> tuple[bool, str]:
    """(allowed, reason) for moving an alias from `current`'s metrics to `candidate`'s."""
    if metric not in candidate:
        return False, f"candidate has no metric {metric!r} (it has: {', '.join(sorted(candidate)) or 'none'})"
    if current is None:
        return True, f"no current version; {metric}={candidate[metric]:.6g}"
    if metric not in current:
        return False, f"current version has no metric {metric!r} to compare against; promote with force to override"
    new, old = candidate[metric], current[metric]
    better = new > old if higher_is_better else new < old
    word = "higher" if higher_is_better else "lower"
    if better:
        return True, f"{metric} {new:.6g} beats {old:.6g} ({word} is better)"
    return False, f"{metric} {new:.6g} does not beat the current {old:.6g} ({word} is better)"


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


def model_card(name: str, version: int, config: dict, lineage: dict, metrics: dict[str, float]) -> str:
    """The README.md stored with a version."""
    lines = [
        f"# {name} v{version}",
        "",
        f"Architecture: `{config.get('architecture')}` (timm), "
        f"model args `{json.dumps(config.get('model_args', {}))}`,",
        f"num_classes {config.get('num_classes')}, num_features {config.get('num_features')}.",
        "",
        "## Lineage",
        "",
        f"- pretraining run: `{lineage.get('run_url')}`",
        f"- export: `{lineage.get('export_url')}`",
    ]
    data = lineage.get("data_manifest")
    lines.append(
        f"- data manifest: `{data['url']}` (sha256 `{data['sha256']}`)" if data else "- data manifest: not recorded"
    )
    if lineage.get("parent"):
        lines.append(f"- parent model: `{lineage['parent']}`")
    code = lineage.get("code", {})
    lines.append(f"- code: {code.get('package')} {code.get('version')}, git commit `{code.get('git_commit')}`")
    if lineage.get("run_config") is not None:
        lines += ["", "## Recipe", "", "```json", json.dumps(lineage["run_config"], indent=2, sort_keys=True), "```"]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("none recorded")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from pipeline.registry import load_model",
        f'model = load_model("{name}@v{version}", registry="<registry URL>")',
        "```",
        f"or `mfm pull {name}@v{version} --registry <registry URL> --dest DIR`.",
        "",
    ]
    return "\n".join(lines)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise RegistryError(f"{what}: not valid JSON: {e}") from None


def code_version() -> dict:
    """Package version and, when run from a git checkout, its commit (read from .git, no subprocess)."""
    from importlib import metadata

    try:
        version = metadata.version("mfm-pipeline")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "package": "mfm-pipeline",
        "version": version,
        "git_commit": _git_commit(Path(__file__).resolve().parents[1]),
    }


def _git_commit(root: Path) -> str | None:
    try:
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None
        for base in filter(None, [git, (git / common) if common else None]):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------- store access


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
        return sorted(n for n in self._ls() if _NAME_RE.match(n) and self.versions(n))

    def _claimed(self, name: str) -> list[int]:
        return sorted(int(m.group(1)) for m in map(_VERSION_RE.match, self._ls(name)) if m)

    def versions(self, name: str) -> list[int]:
        """Complete versions (those with a manifest), ascending."""
        return [v for v in self._claimed(name) if storage.exists(self._u(name, f"v{v}", MANIFEST), self.storage)]

    def aliases(self, name: str) -> dict[str, int]:
        out = {}
        for entry in self._ls(name, "aliases"):
            if entry.endswith(".json") and not entry.startswith("."):
                alias = entry[: -len(".json")]
                version = self.alias_version(name, alias)
                if version is not None:
                    out[alias] = version
        return out

    def alias_version(self, name: str, alias: str) -> int | None:
        got = storage.read_versioned(self.alias_url(name, alias), self.storage)
        return None if got is None else self._alias_payload_version(got[0], name, alias)

    def _alias_payload_version(self, data: bytes, name: str, alias: str) -> int:
        payload = _loads(data, self.alias_url(name, alias))
        if payload.get("format_version", 0) > ALIAS_FORMAT_VERSION:
            raise RegistryError(
                f"{self.alias_url(name, alias)}: format_version {payload['format_version']} "
                f"is newer than this code reads ({ALIAS_FORMAT_VERSION})"
            )
        return int(payload["version"])

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
        ref = self.resolve(ref)
        url = self._u(ref.name, f"v{ref.version}", MANIFEST)
        manifest = _loads(storage.read_bytes(url, self.storage), url)
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise RegistryError(
                f"{url}: format_version {manifest['format_version']} is newer than this code "
                f"reads ({FORMAT_VERSION}); upgrade mfm-pipeline"
            )
        return manifest

    def metrics(self, ref: str | Ref) -> dict[str, float]:
        return dict(self.manifest(ref).get("metrics") or {})

    # -- writing

    def _claim(self, name: str, owner: str) -> int:
        """Take the next free version number: create-if-absent on v<N>/.claim, N+1 on conflict."""
        claimed = self._claimed(name)
        version = (claimed[-1] if claimed else 0) + 1
        for _ in range(_MAX_ATTEMPTS):
            url = self._u(name, f"v{version}", CLAIM)
            body = _dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "created": _now()})
            if storage.create_bytes(url, body, self.storage):
                return version
            # A retried write whose first attempt landed reads as a conflict: check the owner.
            existing = _loads(storage.read_bytes(url, self.storage), url)
            if existing.get("owner") == owner:
                return version
            version += 1
        raise RegistryError(f"{name}: could not claim a version after {_MAX_ATTEMPTS} attempts")

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
        config = _loads(files[CONFIG], storage.join(export_url, CONFIG))
        if not isinstance(config, dict) or "architecture" not in config:
            raise RegistryError(f"{storage.join(export_url, CONFIG)}: not a timm config (no 'architecture')")

        if metrics is None:
            metrics_url = metrics_url or _existing(storage.join(export_url, METRICS), self.storage)
            if metrics_url:
                metrics = _loads(storage.read_bytes(metrics_url, self.storage), metrics_url)
        if metrics is not None:
            files[METRICS] = _dumps(metrics)
        flat = flatten_metrics(metrics or {})
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
            "created": _now(),
            "files": {f: {"sha256": sha256_bytes(d), "size": len(d)} for f, d in sorted(files.items())},
            "model": {
                "architecture": config["architecture"],
                "num_classes": config.get("num_classes"),
                "num_features": config.get("num_features"),
            },
            "lineage": lineage,
            "metrics": flat,
        }
        if not storage.create_bytes(storage.join(vurl, MANIFEST), _dumps(manifest), self.storage):
            raise RegistryError(f"{vurl}/{MANIFEST} appeared while registering v{version} (claim {owner} was ours)")
        for alias in aliases:
            if alias == "latest":
                self._move_alias(name, alias, lambda cur: version if cur is None or version > cur else None)
            else:
                self.set_alias(name, alias, version)
        return Ref(name, version=version)

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
            info = _loads(raw, url)
            data = {
                "url": url,
                "sha256": sha256_bytes(raw),
                "split": info.get("split"),
                "num_samples": info.get("num_samples"),
                "format_version": info.get("format_version"),
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
            "code": code_version(),
        }

    def _move_alias(self, name: str, alias: str, decide: Callable[[int | None], int | None]) -> int | None:
        """Compare-and-swap loop: decide(current) -> new version (None: leave it); returns the
        version the alias holds afterwards. decide may raise to refuse."""
        url = self.alias_url(name, alias)
        for _ in range(_MAX_ATTEMPTS):
            got = storage.read_versioned(url, self.storage)
            current = None if got is None else self._alias_payload_version(got[0], name, alias)
            new = decide(current)
            if new is None or new == current:
                return current
            body = _dumps(
                {
                    "format_version": ALIAS_FORMAT_VERSION,
                    "name": name,
                    "alias": alias,
                    "version": new,
                    "previous": current,
                    "updated": _now(),
                }
            )
            if storage.replace_bytes_if(url, body, None if got is None else got[1], self.storage):
                return new
        raise RegistryError(f"{name}@{alias}: could not move the alias after {_MAX_ATTEMPTS} attempts")

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
        """Download a version into local folder `dest`, verifying every file's size and sha256.

        Files are verified before they take their final names; on any mismatch nothing of the
        failed file is left behind and IntegrityError names it."""
        target = self.resolve(ref)
        manifest = self.manifest(target)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        vurl = self.version_url(target.name, target.version)
        for fname, expected in sorted(manifest["files"].items()):
            if fname in ("", ".", "..") or "/" in fname or "\\" in fname:
                raise IntegrityError(f"{target}: manifest lists an unsafe file name {fname!r}; refusing to pull")
            self._fetch_verified(storage.join(vurl, fname), dest / fname, expected, f"{target}: {fname}")
        (dest / MANIFEST).write_bytes(_dumps(manifest))
        return target, dest

    def _fetch_verified(self, url: str, out: Path, expected: dict, what: str) -> None:
        fs, path = storage.filesystem(url, self.storage)
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

    def load_model(self, ref: str | Ref, *, num_classes: int | None = None, dest: str | None = None):
        """A timm model with the version's verified weights (see module `load_model`)."""
        with tempfile.TemporaryDirectory(prefix="mfm-pull-") as tmp:
            _, folder = self.pull(ref, dest or tmp)
            return model_from_folder(folder, num_classes=num_classes)


def _existing(url: str, storage_cfg: StorageConfig | None) -> str | None:
    return url if storage.exists(url, storage_cfg) else None


# ---------------------------------------------------------------------------- models


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
    config = _loads((folder / CONFIG).read_bytes(), str(folder / CONFIG))
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
    config = _loads(data[CONFIG], storage.join(export_url, CONFIG))
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


# ---------------------------------------------------------------------------- CLI


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=None, help=f"registry URL (default: $MFM_REGISTRY or {DEFAULT_REGISTRY})")


def _run(fn: Callable[[], int], prog: str) -> int:
    try:
        return fn()
    except (RegistryError, storage.ConditionalWriteUnsupported) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm registry", description="the model registry")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("list", help="names, or the versions and aliases of NAME")
    a.add_argument("name", nargs="?")
    _registry_arg(a)
    a = sub.add_parser("show", help="the manifest of NAME@vN|NAME@ALIAS")
    a.add_argument("ref")
    _registry_arg(a)
    a = sub.add_parser("register", help="register a run's export folder as a new version")
    a.add_argument("name")
    a.add_argument("--export", required=True, help="export folder URL (model.safetensors + config.json)")
    a.add_argument("--metrics", help="metrics.json URL (default: EXPORT/metrics.json when present)")
    a.add_argument("--data-manifest", help="the training split's folder or manifest.json URL")
    a.add_argument("--run-config", help="the run's config (default: RUN/config.yaml or config.json when present)")
    a.add_argument("--parent", help="registry ref this model was fine-tuned from")
    a.add_argument("--alias", action="append", default=[], help="also point these aliases at it (ungated)")
    _registry_arg(a)
    a = sub.add_parser("promote", help="move an alias to a version if it beats the current one")
    a.add_argument("ref", help="NAME@vN or NAME@ALIAS")
    a.add_argument("--alias", default="production")
    a.add_argument("--gate-metric", default="top1", help="metric that must improve (dotted key; default top1)")
    a.add_argument("--lower-is-better", action="store_true")
    a.add_argument("--no-gate", action="store_true", help="move without comparing")
    a.add_argument("--force", action="store_true", help="move even if the gate refuses")
    _registry_arg(a)
    args = p.parse_args(argv)
    reg = Registry(args.registry or default_registry())

    def go() -> int:
        if args.action == "list":
            if not args.name:
                for name in reg.names():
                    print(name)
                return 0
            by_version: dict[int, list[str]] = {}
            for alias, v in reg.aliases(args.name).items():
                by_version.setdefault(v, []).append(alias)
            for v in reg.versions(args.name):
                m = reg.manifest(Ref(args.name, version=v))
                top = {k: m["metrics"][k] for k in ("top1", "top5") if k in m.get("metrics", {})}
                print(
                    f"v{v}\t{m['created']}\t{m['model']['architecture']}\t"
                    f"{' '.join(f'{k}={x:.4g}' for k, x in top.items()) or '-'}\t"
                    f"{','.join(sorted(by_version.get(v, [])))}"
                )
            return 0
        if args.action == "show":
            target = reg.resolve(args.ref)
            out = dict(
                reg.manifest(target), aliases={a: v for a, v in reg.aliases(target.name).items() if v == target.version}
            )
            print(json.dumps(out, indent=2, sort_keys=True))
            return 0
        if args.action == "register":
            ref = reg.register(
                args.name,
                args.export,
                metrics_url=args.metrics,
                data_manifest_url=args.data_manifest,
                run_config_url=args.run_config,
                parent=args.parent,
                aliases=("latest", *[x for x in args.alias if x != "latest"]),
            )
            print(f"registered {ref} in {reg.url}")
            return 0
        why = reg.promote(
            args.ref,
            args.alias,
            gate_metric=None if args.no_gate else args.gate_metric,
            higher_is_better=not args.lower_is_better,
            force=args.force,
        )
        print(f"{reg.resolve(args.ref)} is {parse_ref(args.ref).name}@{args.alias}: {why}")
        return 0

    return _run(go, "mfm registry")


def pull_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm pull", description="download a registered model and verify its checksums")
    p.add_argument("ref", help="NAME@ALIAS or NAME@vN")
    p.add_argument("--dest", required=True, help="local folder")
    _registry_arg(p)
    args = p.parse_args(argv)

    def go() -> int:
        ref, dest = pull(args.ref, args.dest, args.registry)
        print(f"pulled {ref} into {dest} (all checksums verified)")
        return 0

    return _run(go, "mfm pull")
