"""The one-way layering of STYLE.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A module in the left layer may not import from any module prefix on the right.
FORBIDDEN = {
    "pipeline": ("jobs",),
    "pipeline.io": (
        "pipeline.models",
        "pipeline.stages",
        "pipeline.distribute",
        "pipeline.eval",
        "pipeline.train",
        "torch",
        "ray",
    ),
    "pipeline.models": ("pipeline.stages", "pipeline.distribute", "pipeline.train", "ray"),
    "pipeline.stages": ("pipeline.distribute", "pipeline.train", "ray"),
    # pipeline.train hands a run with workers to pipeline.distribute.train (a call, imported on use); never ray itself
    "pipeline.train": ("ray",),
    "pipeline.retrain": ("pipeline.distribute", "ray"),
    "pipeline.review": ("pipeline.distribute", "ray"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_lower_layers_never_import_higher_ones():
    offences = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for layer, banned in FORBIDDEN.items():
            if module == layer or module.startswith(layer + "."):
                for name in _imports(path):
                    if any(name == b or name.startswith(b + ".") for b in banned):
                        offences.append(f"{module} imports {name}")
    assert not offences, "layering broken:\n" + "\n".join(offences)
