"""`kd-bench --lm`: LM workloads timed side by side, and `python -m kd_lightning.bench.gpu`."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from kd_lightning.bench.lm import LM_TARGETS, LM_WORKLOADS, QUICK, run_lm_benchmark
from kd_lightning.bench.run import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path / "cache"))


def test_kd_bench_lm_quick_reports_every_workload_and_the_paired_ratios(tmp_path, capsys):
    main(["--lm", "--quick", "--epochs", "3", "--warmup", "0", "--json", str(tmp_path / "lm.json")])
    report = json.loads((tmp_path / "lm.json").read_text())
    assert list(report["workloads"]) == list(LM_WORKLOADS)
    assert (report["settings"]["epochs"], report["settings"]["warmup"]) == (3, 0)
    for entry in report["workloads"].values():
        assert entry["tokens_per_s"] > 0 and len(entry["s_epochs"]) == 3
    assert list(report["ratios"]) == list(LM_TARGETS)
    for pair, entry in report["ratios"].items():
        a, b = pair.split("/")
        rounds = [
            x / y
            for x, y in zip(
                report["workloads"][a]["s_epochs"], report["workloads"][b]["s_epochs"], strict=True
            )
        ]
        assert entry["rounds"] == pytest.approx(rounds)
        assert entry["median"] == pytest.approx(statistics.median(rounds))
        assert entry["quartiles"][0] <= entry["median"] <= entry["quartiles"][1]
        assert entry["target"] == f"<= {LM_TARGETS[pair]:.2f}"
    printed = capsys.readouterr().out
    assert all(name in printed for name in LM_WORKLOADS)
    assert "lm_cached_k32/lm_plain:" in printed and "target <= 1.10" in printed


def test_unknown_lm_workloads_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown LM workloads \\['lm_nope'\\]"):
        run_lm_benchmark(QUICK, workloads=["lm_plain", "lm_nope"])


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the [bench] extra")
def test_trl_gkd_is_paired_with_the_library_one_teacher_path():
    report = run_lm_benchmark(QUICK, epochs=2, warmup=0, workloads=["lm_plain"], trl=True)
    assert list(report["workloads"]) == ["lm_plain", "lm_trl", "lm_one_teacher"]
    entry = report["ratios"]["lm_trl/lm_one_teacher"]
    assert entry["target"] == ">= 1.00" and entry["median"] > 0


@pytest.mark.slow
def test_bench_gpu_runs_its_plumbing_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "KD_LIGHTNING_CACHE": str(tmp_path / "cache")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_lightning.bench.gpu",
            "--device",
            "cpu",
            "--quick",
            "--json",
            str(out),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    report = json.loads(out.read_text())
    assert report["machine"]["device"] == "cpu" and report["quick"] is True
    assert report["fast_paths_ms_per_forward"]
    assert list(report["lm"]["workloads"]) == list(LM_WORKLOADS)
    on_device, offload = report["offload"]["on_device"], report["offload"]["offload"]
    assert offload["teacher_bytes_at_peak"] < on_device["teacher_bytes_at_peak"]
    assert on_device["ms_per_forward"] > 0 and offload["peak_memory_bytes"] is None
