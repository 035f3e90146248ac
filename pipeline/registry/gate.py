"""The promotion gate: compare flattened metrics (pure)."""

from __future__ import annotations


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
