"""The manifest of a sharded split: its schema lives below the stages that write and read it, and
every field that decides what a grow writes or deletes is checked before it is used."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_data_layer_imports_no_stage():
    """pipeline/data reads what pipeline/sharding writes through pipeline/split_manifest.py."""
    stages = ("pipeline.sharding", "pipeline.training", "pipeline.registry", "pipeline.finetune", "pipeline.evaluation")
    found = []
    for path in sorted((ROOT / "pipeline" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith(stages)]
    assert found == []
