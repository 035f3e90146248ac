"""Prefect flow `mfm-finetune`: `mfm finetune` as a flow run, with the validation metrics as a
table artifact. Thin on purpose: everything is in pipeline.finetune."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from pipeline.config import load_flow_config
from pipeline.finetune import launch


@task(name="finetune")
def finetune_task(preset: str, overrides: dict[str, Any] | None, hostfile: str | None, master_addr: str | None) -> dict:
    cfg = load_flow_config(preset, overrides)  # parameters are untrusted: checked, errors name them
    return asdict(launch(cfg, hostfile=hostfile, master_addr=master_addr))


@flow(name="mfm-finetune")
def finetune_flow(
    preset: str = "finetune_tiny_cpu",
    overrides: dict[str, Any] | None = None,
    hostfile: str | None = None,
    master_addr: str | None = None,
) -> dict:
    """Fine-tune (or resume) the run the config describes; returns run_dir, checkpoint, export,
    metrics_url and metrics (top1, top5, ...)."""
    result = finetune_task(preset, overrides, hostfile, master_addr)
    m = result["metrics"]
    create_table_artifact(
        table=[{"metric": k, "value": m[k]} for k in ("top1", "top5", "num_samples")],
        key="mfm-finetune-metrics",
        description=f"{m['model']} on {m['data']} (init {m['init']})",
    )
    if result["export"]:
        create_link_artifact(
            link=result["export"],
            link_text="fine-tuned classifier (safetensors + config.json)",
            key="mfm-finetune-export",
        )
    get_run_logger().info("top1 %.4f top5 %.4f; export %s", m["top1"], m["top5"], result["export"])
    return result


if __name__ == "__main__":
    print(json.dumps(finetune_flow(), indent=1))
