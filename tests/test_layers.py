"""The three layers import only downwards: core → Lightning → Hydra shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "kd_lightning"
CORE = [
    "functional",
    "fusion",
    "teachers",
    "loss.py",
    "schedules.py",
    "hints.py",
    "features.py",
    "batch.py",
    "optim.py",
    "errors.py",
]
LIGHTNING = ["modules", "metrics", "callbacks", "data", "models", "loggers.py", "plots.py"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def files(parts: list[str]) -> list[Path]:
    found = []
    for part in parts:
        path = PACKAGE / part
        found.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return found


@pytest.mark.parametrize("path", files(CORE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_neither_lightning_nor_hydra(path):
    assert not imported_roots(path) & {"lightning", "pytorch_lightning", "hydra", "omegaconf"}


@pytest.mark.parametrize("path", files(LIGHTNING), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lightning_layer_does_not_know_about_configs(path):
    assert not imported_roots(path) & {"hydra", "omegaconf"}
