"""The model card (README.md) stored with each version, and the code version it records."""

from __future__ import annotations

import json
import re
from pathlib import Path


def model_card(name: str, version: int, config: dict, lineage: dict, metrics: dict[str, float]) -> str:
    """The README.md stored with a version."""
    lines = [
        f"# {name} v{version}",  # a checked registry name: nothing to escape
        "",
        f"Architecture: {code(config.get('architecture'))} (timm), "
        f"model args {code(json.dumps(config.get('model_args', {})))},",
        f"num_classes {config.get('num_classes')}, num_features {config.get('num_features')}.",
        "",
        "## Lineage",
        "",
        f"- pretraining run: {code(lineage.get('run_url'))}",
        f"- export: {code(lineage.get('export_url'))}",
    ]
    if lineage.get("run_url"):  # pipeline.report's default place for a run's page
        lines.append(
            f"- report: {code(lineage['run_url'].rstrip('/') + '/report.html')} "
            f"(curves, reconstructions, evaluation; `mfm report {name}@v{version}` writes it)"
        )
    data = lineage.get("data_manifest")
    if data:
        lines.append(f"- data manifest: {code(data['url'])} (sha256 {code(data['sha256'])})")
    else:
        lines.append("- data manifest: not recorded")
    if lineage.get("parent"):
        lines.append(f"- parent model: {code(lineage['parent'])}")
    if lineage.get("warm_start"):
        lines.append(f"- pretraining warm-started from: {code(lineage['warm_start'])} (pretrain.init)")
    if data and data.get("revision"):
        lines.append(f"- data revision: {data['revision']}")
    source = lineage.get("code") or {}
    lines.append(
        f"- code: {source.get('package')} {source.get('version')}, git commit {code(source.get('git_commit'))}"
    )
    if lineage.get("run_config") is not None:
        recipe = json.dumps(lineage["run_config"], indent=2, sort_keys=True)
        fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", recipe)), default=0) + 1)
        lines += ["", "## Recipe", "", f"{fence}json", recipe, fence]
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
        f"or `mfm pull {name}@v{version} --registry <registry URL> --dest DIR`; the light install "
        "`pip install mfm-pipeline` is enough for both.",
        "",
    ]
    return "\n".join(lines)


def code(value) -> str:
    """`value` as one Markdown code span on one line, whatever backticks, markup or newlines it holds."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


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
        "git_commit": _git_commit(Path(__file__).resolve().parents[2]),
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
