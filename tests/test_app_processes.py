"""`kd-train` as users run it: real subprocesses for multirun, DDP over gloo and W&B offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .app_helpers import run_command
from .test_wandb import history_rows, read_wandb_records

pytestmark = pytest.mark.slow

QUICK = [
    "experiment=smoke",
    "data=synthetic",
    "trainer.enable_progress_bar=false",
    "baseline=false",
]


def only_summary(root: Path) -> dict:
    (path,) = root.glob("logs/train/runs/*/summary.json")
    return json.loads(path.read_text())


def test_multirun_writes_a_comparison_table(tmp_path):
    args = [
        "-m",
        "kd_lightning.cli.train",
        "-m",
        "fusion=mean_probs,entropy",
        "logger=none",
        *QUICK,
    ]
    result = run_command(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = tmp_path.glob("logs/train/multiruns/*/summary.md")
    rows = [
        line
        for line in table.read_text().splitlines()
        if line.startswith("| 0") or line.startswith("| 1")
    ]
    assert len(rows) == 2 and "fusion=mean_probs" in rows[0] and "fusion=entropy" in rows[1]
    assert "student acc" in result.stdout


def test_ddp_cpu_gives_the_single_process_teacher_metrics(tmp_path):
    (tmp_path / "one").mkdir()
    single = run_command(["-m", "kd_lightning.cli.train", "logger=none", *QUICK], tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "cache").rename(tmp_path / "two" / "cache")  # the same cached teachers
    ddp = run_command(
        ["-m", "kd_lightning.cli.train", "logger=none", "accelerator=ddp_cpu", *QUICK],
        tmp_path / "two",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = only_summary(tmp_path / "one"), only_summary(tmp_path / "two")
    assert two["test_accuracy"]["teachers"] == one["test_accuracy"]["teachers"]
    assert two["test_accuracy"]["ensemble"] == one["test_accuracy"]["ensemble"]
    assert two["agreement"]["teachers"] == one["agreement"]["teachers"]


def test_ddp_inside_a_multirun_is_refused(tmp_path):
    result = run_command(
        ["-m", "kd_lightning.cli.train", "-m", "accelerator=ddp_cpu", "logger=none", *QUICK],
        tmp_path,
    )
    assert result.returncode != 0
    assert "cannot run inside a local multirun" in result.stderr


def test_wandb_offline_run_holds_the_config_every_csv_metric_the_heatmap_and_the_summary(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir")}
    result = run_command(
        ["-m", "kd_lightning.cli.train", "logger=[csv,wandb]", *QUICK], tmp_path, env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = tmp_path.rglob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    rows = history_rows(run_file)
    logged = {key for row in rows for key in row}
    (csv_file,) = tmp_path.rglob("csv/version_0/metrics.csv")
    csv_keys = set(csv_file.read_text().splitlines()[0].split(",")) - {"epoch", "step"}
    assert csv_keys and csv_keys <= logged, sorted(csv_keys - logged)
    heatmap = {key: row[key] for row in rows for key in row if "agreement_heatmap" in key}
    assert heatmap.get("test/agreement_heatmap/_type") == "images/separated", heatmap
    assert heatmap["test/agreement_heatmap/format"] == "png"
    config_keys = {
        item.key
        for record in records
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }
    assert {"fusion", "teachers", "method", "trainer"} <= config_keys
    run_summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
    }
    summary = only_summary(tmp_path)
    assert run_summary["summary/test_accuracy/student"] == summary["test_accuracy"]["student"]
    assert run_summary["summary/method"] == "ensemble"
