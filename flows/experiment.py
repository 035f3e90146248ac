"""Prefect flow `pretext-comparison`: `mfm experiment pretext-comparison` as a flow run (thin:
the work, and the skipping of finished runs, is in pipeline.experiment)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from pipeline.experiment import Settings, run_experiment


@flow(name="pretext-comparison", log_prints=True)
def pretext_comparison_flow(
    out: str = Settings.out,
    pretexts: list[str] | None = None,
    seeds: list[int] | None = None,
    fractions: list[float] | None = None,
    pretrain_steps: int = Settings.pretrain_steps,
    finetune_steps: int = Settings.finetune_steps,
    per_class: int = Settings.per_class,
    per_class_test: int = Settings.per_class_test,
    pretrain_batch: int = Settings.pretrain_batch,
    finetune_batch: int = Settings.finetune_batch,
    probe_epochs: int = Settings.probe_epochs,
    pretrain_set: list[str] | None = None,
    finetune_set: list[str] | None = None,
) -> dict:
    """Run (or continue) the comparison; publishes the table as an artifact, returns the means."""
    d = Settings()
    s = Settings(
        out=out,
        pretexts=pretexts or d.pretexts,
        seeds=seeds or d.seeds,
        fractions=fractions or d.fractions,
        pretrain_steps=pretrain_steps,
        finetune_steps=finetune_steps,
        per_class=per_class,
        per_class_test=per_class_test,
        pretrain_batch=pretrain_batch,
        finetune_batch=finetune_batch,
        probe_epochs=probe_epochs,
        pretrain_set=pretrain_set or [],
        finetune_set=finetune_set or [],
    )
    summary = run_experiment(s)
    from pathlib import Path

    table = (Path(s.out) / "pretext-comparison.md").read_text()
    create_markdown_artifact(key="pretext-comparison", markdown=table, description=f"results in {s.out}")
    print(table)
    return {arm: {k: round(v["mean"], 2) for k, v in row.items()} for arm, row in summary.items()}
