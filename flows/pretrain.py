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
from pipeline.config import load_flow_config
from pipeline.training.launcher import launch


@task(name="pretrain")
def pretrain_task(preset: str, overrides: dict[str, Any] | None, hostfile: str | None, master_addr: str | None) -> dict:
    cfg = load_flow_config(preset, overrides)  # parameters are untrusted: checked, errors name them
    result = asdict(launch(cfg, hostfile=hostfile, master_addr=master_addr))
    result["storage"] = cfg.storage.model_dump()
    return result


def _speed_markdown(run_dir: str, store) -> str | None:
    """The run's speed from its metrics.jsonl: the constants row and the last logged step."""
    url = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(url, store):
        return None
    rows = [json.loads(line) for line in storage.read_bytes(url, store).decode().splitlines() if line.strip()]
    const = next((r for r in reversed(rows) if "flops_per_image" in r), None)
    last = next((r for r in reversed(rows) if r.get("tflops") is not None), None)
    if const is None or last is None:
        return None

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return "\n".join(
        [
            f"# Training speed at step {last['step']}",
            "",
            "| images/s (all ranks) | TFLOP/s per device | MFU (datasheet peak) | matmul utilization | peak memory |",
            "|---:|---:|---:|---:|---:|",
            f"| {last['images_per_s']:.1f} | {last['tflops']:.3g} | {pct(last.get('mfu'))} | "
            f"{pct(last.get('matmul_utilization'))} | {last['peak_memory_gib']:.2f} GiB ({const['memory']}) |",
            "",
            f"- device: {const['device']}",
            f"- FLOPs per image (forward + backward, torch FlopCounterMode): {const['flops_per_image'] / 1e9:.2f} G",
            f"- peak: {const['peak_tflops']:.3g} TFLOP/s ({const['peak_source']}); datasheet: "
            f"{const['datasheet_tflops'] or 'unknown'}",
        ]
    )


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
    speed = _speed_markdown(result["run_dir"], store)
    if speed:
        create_markdown_artifact(
            markdown=speed, key="mfm-pretrain-speed", description="images/s, TFLOP/s, MFU, peak memory"
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
