"""Prefect flow `mfm-pretrain`: the `mfm pretrain` launcher as a flow run, with the run's
pictures and export attached as artifacts. Thin on purpose: everything is in
pipeline.training."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from pipeline import storage
from pipeline.config import load_config, override_strings
from pipeline.training.launcher import launch


@task(name="pretrain")
def pretrain_task(preset: str, overrides: dict[str, Any] | None, hostfile: str | None, master_addr: str | None) -> dict:
    cfg = load_config(preset, override_strings(overrides))
    result = asdict(launch(cfg, hostfile=hostfile, master_addr=master_addr))
    result["storage"] = cfg.storage.model_dump()
    return result


def _attach_artifacts(result: dict) -> None:
    from pipeline.config import StorageConfig

    store = StorageConfig(**result.pop("storage"))
    pictures = result["pictures"]
    lines = [
        f"# MFM pretraining: `{result['run_dir']}`",
        "",
        f"- latest checkpoint: `{result['latest']}`",
        f"- export: `{result['export']}`",
        "",
    ]
    if pictures:
        # create_image_artifact wants a URL the UI can fetch; a local or private file is inlined.
        png = storage.read_bytes(pictures[-1], store)
        lines += [
            f"## {pictures[-1].rsplit('/', 1)[-1]}",
            "",
            f"![latest picture](data:image/png;base64,{base64.b64encode(png).decode()})",
            "",
            "All pictures:",
            *[f"- `{p}`" for p in pictures],
        ]
    create_markdown_artifact(
        markdown="\n".join(lines),
        key="mfm-pretrain-pictures",
        description="input / corrupted / prediction and their spectra",
    )
    if result["export"]:
        create_link_artifact(
            link=result["export"], link_text="exported encoder (safetensors + config.json)", key="mfm-pretrain-export"
        )


@flow(name="mfm-pretrain")
def pretrain_flow(
    preset: str = "tiny_cpu",
    overrides: dict[str, Any] | None = None,
    hostfile: str | None = None,
    master_addr: str | None = None,
) -> dict:
    """Train (or resume) the run the config describes; returns run_dir, checkpoints, latest,
    export and pictures (URLs)."""
    result = pretrain_task(preset, overrides, hostfile, master_addr)
    _attach_artifacts(result)
    get_run_logger().info("checkpoints: %s; export: %s", result["checkpoints"], result["export"])
    return result


if __name__ == "__main__":
    print(json.dumps(pretrain_flow(), indent=1))
