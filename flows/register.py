"""Prefect flow `mfm-register`: register an export, optionally promote it (thin: pipeline.registry)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from pipeline.registry import PromotionRefused, Registry, default_registry


@flow(name="mfm-register", log_prints=True)
def register_flow(
    name: str,
    export: str,
    metrics: str | None = None,
    data_manifest: str | None = None,
    run_config: str | None = None,
    parent: str | None = None,
    aliases: list[str] | None = None,
    registry: str | None = None,
    promote_to: str | None = None,
    gate_metric: str = "top1",
    higher_is_better: bool = True,
) -> dict:
    """`mfm registry register` (and, with promote_to, `mfm registry promote`) as a flow.

    A refused promotion does not fail the flow: the version stays registered, and the result
    says why the alias did not move."""
    reg = Registry(registry or default_registry())
    ref = reg.register(
        name,
        export,
        metrics_url=metrics,
        data_manifest_url=data_manifest,
        run_config_url=run_config,
        parent=parent,
        aliases=("latest", *[a for a in aliases or [] if a != "latest"]),
    )
    print(f"registered {ref} in {reg.url}")
    result = {"ref": str(ref), "registry": reg.url, "promoted": None}
    if promote_to:
        try:
            result["promoted"] = reg.promote(
                ref, promote_to, gate_metric=gate_metric, higher_is_better=higher_is_better
            )
            print(f"{ref} is now {name}@{promote_to}: {result['promoted']}")
        except PromotionRefused as e:
            result["refused"] = str(e)
            print(str(e))
    table = [
        {"metric": k, "value": round(v, 6)}
        for k, v in sorted(reg.metrics(ref).items())
        if not k.startswith("robustness.corruptions.")
    ]
    create_table_artifact(
        key="mfm-register-metrics",
        table=table or [{"metric": "none", "value": None}],
        description=f"metrics recorded with {ref}",
    )
    return result


if __name__ == "__main__":
    import sys

    print(register_flow(sys.argv[1], sys.argv[2]))
