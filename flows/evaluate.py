"""Prefect flow `mfm-evaluate`: evaluate a model (thin: the work is in pipeline.evaluation)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from pipeline.config import load_flow_config
from pipeline.evaluation import metrics_table, run, summary


@flow(name="mfm-evaluate", log_prints=True)
def evaluate_flow(
    model: str,
    data: str,
    train_data: str | None = None,
    corruptions: str = "all",
    severities: str = "1,2,3,4,5",
    out: str | None = None,
    registry: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    max_batches: int | None = None,
    knn_k: int = 20,
    probe_epochs: int = 20,
    seed: int = 0,
    ood: dict[str, str] | None = None,
) -> dict:
    """`mfm evaluate` as a flow; publishes the metrics table and returns the headline numbers.
    `ood`: {"imagenet-r": URL, ...}, out-of-distribution folders scored beside the clean data and
    recorded in metrics.json (which registering the export copies into the registry entry)."""
    if preset is not None:  # parameters are untrusted: a shipped preset, never a file of the worker
        load_flow_config(preset, None)
    metrics, url = run(
        model,
        data,
        train_data=train_data,
        corruptions=corruptions,
        severities=severities,
        out=out,
        registry=registry,
        batch_size=batch_size,
        device=device,
        preset=preset,
        overrides=overrides or [],
        max_batches=max_batches,
        knn_k=knn_k,
        probe_epochs=probe_epochs,
        seed=seed,
        ood=ood,
    )
    create_table_artifact(
        key="mfm-evaluate-metrics",
        table=metrics_table(metrics),
        description=f"metrics of {metrics['model']} on {data} ({url})",
    )
    print(f"metrics of {metrics['model']}: top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} -> {url}")
    # The full report lives in metrics.json; the flow result stays small.
    return {"metrics_url": url, **summary(metrics)}


if __name__ == "__main__":
    import sys

    print(evaluate_flow(sys.argv[1], sys.argv[2]))
