"""The import contract: a torch core, a Lightning layer on it, the shell on top.

Each package of ``kd_lightning`` belongs to one layer and imports only its own layer and those
below; ``bench`` sits on top and nothing imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "kd_lightning"
LAYERS = {
    "core": ["functional", "fusion", "losses", "teachers", "models", "batch", "errors"],
    "lightning": ["modules", "callbacks", "metrics", "data", "reporting"],
    "shell": ["cli"],
    "bench": ["bench"],
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}
FORBIDDEN = {
    "core": {"lightning", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "wandb"},
    "lightning": {"hydra", "omegaconf"},
    "shell": set(),
    "bench": set(),
}
LAYER_OF = {part: layer for layer, parts in LAYERS.items() for part in parts}


def imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if parts[0] == "kd_lightning" and len(parts) > 1 else None


SOURCES = [
    path
    for path in sorted(PACKAGE.rglob("*.py"))
    if path != PACKAGE / "__init__.py" and path.parent.name != "conf"
]


def test_every_file_has_a_layer():
    assert {
        layer_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in SOURCES
    } <= set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downwards(path):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    layer = layer_of(module)
    assert layer is not None, f"{module} is in no layer"
    names = imports(path)
    assert not {name.split(".")[0] for name in names} & FORBIDDEN[layer]
    upward = [name for name in names if (other := layer_of(name)) and RANK[other] > RANK[layer]]
    assert not upward, f"{module} ({layer}) imports {upward}"
    if layer != "bench":
        assert not [name for name in names if name.startswith("kd_lightning.bench")]


def test_the_package_root_holds_only_top_level_files():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "batch.py", "errors.py"]


def run_with_blocked(blocked: tuple[str, ...], code: str) -> str:
    """Run ``code`` in a fresh interpreter where ``blocked`` cannot be imported; its stdout."""
    setup = f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
    result = subprocess.run(
        [sys.executable, "-c", setup + code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_core_imports_with_lightning_hydra_and_wandb_blocked():
    blocked = ("lightning", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "wandb")
    code = (
        "import kd_lightning, kd_lightning.functional, kd_lightning.fusion, kd_lightning.losses\n"
        "import kd_lightning.teachers, kd_lightning.teachers.cache, kd_lightning.models\n"
        "loss = kd_lightning.DistillationLoss('entropy')\n"
        "print(type(loss).__name__)\n"
    )
    assert run_with_blocked(blocked, code) == "DistillationLoss"


def test_the_lightning_layer_imports_with_hydra_blocked():
    code = (
        "import kd_lightning.modules, kd_lightning.callbacks, kd_lightning.metrics, kd_lightning.data\n"
        "import kd_lightning.reporting.plots\n"
        "print(kd_lightning.DistillationModule.__name__)\n"
    )
    assert run_with_blocked(("hydra", "omegaconf"), code) == "DistillationModule"
