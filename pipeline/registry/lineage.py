"""What a version records about where it came from: run, export, data manifest, recipe, parent,
warm start and code version."""

from __future__ import annotations

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.registry.card import code_version
from pipeline.registry.refs import MANIFEST, RegistryError, parse_json, sha256_bytes


def version_lineage(
    export_url: str,
    data_manifest_url: str | None,
    run_config_url: str | None,
    parent: str | None,
    storage_cfg: StorageConfig | None = None,
) -> dict:
    """The manifest's `lineage`: read from the export's run folder and the URLs given; `parent`
    is a pinned ref (name@vN)."""
    run_url = export_url.rstrip("/").rsplit("/", 1)[0] if export_url.rstrip("/").endswith("/export") else None
    data = None
    if data_manifest_url:
        url = data_manifest_url if data_manifest_url.endswith(".json") else storage.join(data_manifest_url, MANIFEST)
        try:
            raw = storage.read_bytes(url, storage_cfg)
        except FileNotFoundError:
            raise RegistryError(f"data manifest {url} does not exist") from None
        info = parse_json(raw, url)
        if not isinstance(info, dict):
            raise RegistryError(f"data manifest {url}: a JSON object expected, got {type(info).__name__}")
        data = {
            "url": url,
            "sha256": sha256_bytes(raw),
            "split": info.get("split"),
            "num_samples": info.get("num_samples"),
            "format_version": info.get("format_version"),
            "revision": info.get("revision"),  # a growing split's revision (docs/architecture.md)
        }
    if run_config_url is None and run_url:
        run_config_url = existing(storage.join(run_url, "config.yaml"), storage_cfg) or existing(
            storage.join(run_url, "config.json"), storage_cfg
        )
    run_config = None
    if run_config_url:
        import yaml

        raw = storage.read_bytes(run_config_url, storage_cfg)
        try:
            run_config = yaml.safe_load(raw)  # JSON is YAML too
        except yaml.YAMLError as e:
            raise RegistryError(f"run config {run_config_url}: not valid YAML/JSON: {e}") from None
    return {
        "export_url": export_url,
        "run_url": run_url,
        "data_manifest": data,
        "run_config_url": run_config_url,
        "run_config": run_config,
        "parent": parent,
        # pretraining continued from this (pinned) model instead of a random init
        "warm_start": warm_start(run_config),
        "code": code_version(),
    }


def existing(url: str, storage_cfg: StorageConfig | None) -> str | None:
    return url if storage.exists(url, storage_cfg) else None


def warm_start(run_config) -> str | None:
    section = run_config.get("pretrain") if isinstance(run_config, dict) else None
    init = section.get("init") if isinstance(section, dict) else None
    return init if isinstance(init, str) else None
