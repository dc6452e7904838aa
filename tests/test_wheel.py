"""The wheel as a user installs it: a fresh venv next to the pinned CPU torch, no checkout around."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        args,
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_runs_kd_train_from_an_empty_directory(tmp_path):
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip"]
    run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        tmp_path,
    )
    (wheel,) = dist.glob("kd_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"kd_lightning/conf/train.yaml", "kd_lightning/conf/teachers/gru.yaml"} <= names

    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]  # the pinned CPU build this suite runs on
    run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}"], tmp_path)
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path)
    installed = run([str(python), "-c", "import torch; print(torch.__version__)"], empty)
    assert installed.stdout.strip() == torch.__version__  # the wheel left the pinned torch alone

    kd_train = str(venv / "bin" / "kd-train")
    groups = run([kd_train, "--help"], empty).stdout
    for group in ("fusion:", "method:", "teachers:", "accelerator:", "hparams_search:"):
        assert group in groups
    env = {
        "KD_LIGHTNING_CACHE": str(tmp_path / "cache"),
        "KD_LIGHTNING_LOGS": str(tmp_path / "logs"),
        "WANDB_MODE": "disabled",
    }
    result = run(
        [kd_train, "experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"],
        empty,
        **env,
    )
    assert "distillation gain over scratch" in result.stdout
    (summary,) = (tmp_path / "logs").glob("train/runs/*/summary.json")
    assert set(json.loads(summary.read_text())["test_accuracy"]["teachers"]) == {
        "cnn",
        "gru",
        "mlp",
    }
    assert not list(empty.iterdir())  # nothing written where it was launched
