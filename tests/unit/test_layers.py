"""The library's layers import downwards only: a model or inference module never reaches into
training or the jobs, and training never into inference (what both need sits below them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "opensora_core"

FORBIDDEN = {
    "models": ("training", "inference", "jobs", "evaluation", "distributed"),
    "diffusion": ("training", "inference", "jobs"),
    "data": ("training", "inference", "jobs", "models"),
    "inference": ("training", "jobs"),
    "evaluation": ("training", "jobs"),
    "training": ("inference", "jobs"),
}
"""Per subpackage of opensora_core, the subpackages it must not import (at any depth of the code)."""


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for layer, banned in FORBIDDEN.items():
        for path in sorted((package / layer).rglob("*.py")):
            for line, module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "opensora_core" and len(parts) > 1 and parts[1] in banned:
                    out.append(f"{path.relative_to(package.parent)}:{line} imports {module}")
    return out


def test_no_import_runs_up_the_layers() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    package = tmp_path / "opensora_core"
    for layer in FORBIDDEN:
        (package / layer).mkdir(parents=True)
    (package / "training" / "bad.py").write_text(
        "def f():\n    from opensora_core.inference import T2VPipeline\n    return T2VPipeline\n"
    )
    (package / "inference" / "fine.py").write_text("from opensora_core.models.final import FINAL_EMA\n")
    assert violations(package) == ["opensora_core/training/bad.py:2 imports opensora_core.inference"]
