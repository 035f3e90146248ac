"""A version beside the one in production: each evaluation figure, production's, the difference,
and what the promotion gate would decide (the question a reviewer asks at promotion)."""

from __future__ import annotations

import dataclasses

from pipeline.registry.gate import gate_decision
from pipeline.registry.refs import Ref, RegistryError
from pipeline.registry.store import Registry

# (flattened metric, label, higher is better); the OOD sets follow as they appear
HEADLINE = (
    ("top1", "clean top-1", True),
    ("top5", "clean top-5", True),
    ("knn.top1", "k-NN top-1", True),
    ("linear_probe.top1", "linear probe top-1", True),
    ("robustness.mCE", "ImageNet-C mCE", False),
    ("robustness.relative_mCE", "ImageNet-C relative mCE", False),
    ("robustness.mean_top1", "mean top-1 under corruption (not mCE)", True),
)


@dataclasses.dataclass(frozen=True)
class Row:
    metric: str
    label: str
    value: float | None
    production: float | None
    higher_is_better: bool

    @property
    def difference(self) -> float | None:
        return None if self.value is None or self.production is None else self.value - self.production

    @property
    def better(self) -> bool | None:
        d = self.difference
        return None if not d else (d > 0) == self.higher_is_better


@dataclasses.dataclass(frozen=True)
class Comparison:
    ref: str
    alias: str
    production: str | None  # name@vN the alias points at, None when unset
    rows: tuple[Row, ...]
    gate_allowed: bool | None
    gate_reason: str

    @property
    def summary(self) -> str:
        if self.production is None:
            return f"no {self.alias} version: nothing to compare with"
        if self.production == self.ref:
            return f"{self.ref} is the {self.alias} version"
        return f"beside {self.production} ({self.alias})"


def headline_rows(candidate: dict[str, float], production: dict[str, float] | None) -> tuple[Row, ...]:
    """Rows for the headline metrics either side has, then each OOD set's top-1 (pure)."""
    production = production or {}
    both = {**production, **candidate}
    rows = [
        Row(key, label, candidate.get(key), production.get(key), higher)
        for key, label, higher in HEADLINE
        if key in both
    ]
    ood = sorted(k for k in both if k.startswith("ood.") and k.endswith(".top1"))
    rows += [Row(k, f"{k[4:-5]} top-1", candidate.get(k), production.get(k), True) for k in ood]
    return tuple(rows)


def compare_with_production(
    reg: Registry,
    ref: str | Ref,
    alias: str = "production",
    *,
    gate_metric: str = "top1",
    higher_is_better: bool = True,
) -> Comparison:
    """`ref` beside the version `alias` points at now, with the gate's decision for moving it."""
    target = reg.resolve(ref)
    candidate = reg.metrics(target)
    current = reg.alias_version(target.name, alias)
    if current is None:
        allowed, reason = gate_decision(candidate, None, gate_metric, higher_is_better)
        return Comparison(str(target), alias, None, headline_rows(candidate, None), allowed, reason)
    prod_ref = Ref(target.name, version=current)
    try:
        production = reg.metrics(prod_ref)
    except RegistryError as e:
        return Comparison(str(target), alias, str(prod_ref), headline_rows(candidate, None), None, str(e))
    if current == target.version:
        allowed, reason = None, f"{target} is already {target.name}@{alias}"
    else:
        allowed, reason = gate_decision(candidate, production, gate_metric, higher_is_better)
    return Comparison(str(target), alias, str(prod_ref), headline_rows(candidate, production), allowed, reason)
