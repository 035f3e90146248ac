"""The registry's modules import in one direction: `store` at the bottom of what does I/O, the
rest built on it (checked on the source, lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline" / "registry"
# each module may import only modules of earlier layers
LAYERS = [
    {"refs"},
    {"gate", "architecture", "card"},
    {"lineage"},
    {"store"},
    {"gc", "cache"},
    {"loading"},
    {"comparison"},
    {"commands"},
]


def registry_imports(path: Path) -> set[str]:
    """Modules of pipeline.registry that `path` imports anywhere (top level, functions, TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipeline.registry":
                out |= {a.name for a in node.names}
            elif node.module.startswith("pipeline.registry."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("pipeline.registry.")}
    return out


def test_every_registry_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set().union(*LAYERS)


def test_registry_imports_point_down_only():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    wrong = []
    for module, layer in layer_of.items():
        for imported in registry_imports(PACKAGE / f"{module}.py"):
            if imported in layer_of and layer_of[imported] >= layer:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_store_imports_none_of_the_modules_above_it():
    assert registry_imports(PACKAGE / "store.py") <= {"refs", "gate", "architecture", "card", "lineage"}
