"""Sweeps as lightning-hydra-template users run them: Optuna's sweeper, the Submitit launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .app_helpers import run_command

pytestmark = pytest.mark.slow

QUICK = [
    "experiment=smoke",
    "data=synthetic",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def job_summaries(sweep: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(sweep.glob("*/summary.json"))]


def test_an_optuna_search_returns_the_validation_metric_and_keeps_the_best(tmp_path):
    args = [
        "-m",
        "kd_lightning.cli.train",
        "-m",
        "hparams_search=mnist1d_optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *QUICK,
    ]
    result = run_command(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = tmp_path.glob("logs/train/multiruns/*")
    jobs = job_summaries(sweep)
    assert len(jobs) == 3
    assert all(job["optimized_metric"]["name"] == "val/acc" for job in jobs)
    assert all(job["test_accuracy"]["baseline"] is None for job in jobs)  # baseline=false
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [job["optimized_metric"]["value"] for job in jobs]
    assert best["best_value"] == pytest.approx(max(values))
    assert set(best["best_params"]) == {
        "method.loss.temperature",
        "method.loss.alpha",
        "optimizer.lr",
        "fusion",
    }
    table = (sweep / "summary.md").read_text()
    assert sum(line.startswith("| ") and "fusion=" in line for line in table.splitlines()) == 3


def test_a_test_metric_is_refused_as_the_optimised_one(tmp_path):
    result = run_command(
        ["-m", "kd_lightning.cli.train", "optimized_metric=test/acc", *QUICK], tmp_path
    )
    assert result.returncode != 0
    assert "optimized_metric=test/acc" in result.stderr
    assert not list(tmp_path.glob("cache/teachers/*"))  # refused before any teacher trained


def test_a_multirun_completes_through_the_submitit_local_launcher(tmp_path):
    args = [
        "-m",
        "kd_lightning.cli.train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=20",
        "seed=0,1",
        "baseline=false",
        *QUICK,
    ]
    result = run_command(args, tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = tmp_path.glob("logs/train/multiruns/*")
    jobs = job_summaries(sweep)
    assert len(jobs) == 2
    assert list(sweep.glob(".submitit/*/*_result.pkl"))  # the jobs ran as submitit jobs
    assert (sweep / "summary.md").is_file()
