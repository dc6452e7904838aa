"""`kd-bench --lm-cache`: the sparse cache of experiment=lm at k = 8, 32, 128, its cost and KD gap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kd_lightning.bench.cache_gap import QUICK_OVERRIDES, TOP_KS, lm_config, run_cache_gap
from kd_lightning.bench.run import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path / "cache"))


def test_top_ks_beyond_the_vocabulary_are_refused_naming_it(tmp_path):
    with pytest.raises(
        ValueError, match=r"top_ks \[512\] exceed the vocabulary \(data\.vocab_size=300\)"
    ):
        run_cache_gap(QUICK_OVERRIDES, top_ks=(8, 512), progress=False)
    assert not (tmp_path / "cache" / "teachers").exists()  # refused before any teacher trains


def test_overrides_without_lm_cache_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--lm", "data.max_bytes=1000"])
    assert "overrides, --out and --train-blocks go with --lm-cache" in capsys.readouterr().err


def test_more_training_blocks_than_the_split_holds_are_refused():
    with pytest.raises(ValueError, match=r"train_blocks=100000: the training split has \d+ blocks"):
        run_cache_gap(QUICK_OVERRIDES, train_blocks=100_000, progress=False)


def test_the_config_is_experiment_lm_with_the_overrides():
    cfg = lm_config(["data.block_size=64"], output_dir="/tmp/unused")
    assert cfg.data.block_size == 64 and cfg.data.vocab_size == 2048
    assert list(cfg.teachers) == ["lm_wide", "lm_deep", "lm_gru"]
    assert cfg.method.loss.temperature == 1.0 and cfg.paths.output_dir == "/tmp/unused"


@pytest.mark.slow
def test_kd_bench_lm_cache_quick_reports_cost_and_a_gap_that_shrinks_with_k(tmp_path, capsys):
    main(["--lm-cache", "--quick", "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "kd_gap.json").read_text())
    markdown = (tmp_path / "out" / "kd_gap.md").read_text()
    assert markdown in capsys.readouterr().out

    settings = report["settings"]
    assert settings["teachers"] == ["lm_wide", "lm_deep", "lm_gru"]
    assert (settings["vocab_size"], settings["block_size"], settings["value_bits"]) == (300, 32, 8)
    assert settings["fusion"] == "MeanProbabilities" and settings["temperatures"] == [1.0, 2.0]
    assert settings["val_tokens"] == settings["val_blocks"] * 32 > 0
    assert report["commit"] and report["machine"]["device"] == "cpu"
    assert [entry["top_k"] for entry in report["caches"]] == list(TOP_KS)

    cases = [(student, t) for student in ("untrained", "trained") for t in ("T=1", "T=2")]
    for entry in report["caches"]:
        assert entry["cached_blocks"] == settings["train_blocks"]  # the whole split
        assert entry["build_s"] == entry["split_build_s"] > 0
        assert entry["tokens_per_s"] == pytest.approx(
            settings["train_blocks"] * 32 / entry["build_s"]
        )
        # The chunk files and the manifest of the training split: about its tokens × 3 teachers
        # × bytes per token per teacher.
        stored = settings["train_blocks"] * 32 * 3 * entry["bytes_per_token"]
        assert stored < entry["disk_bytes"] == entry["split_disk_bytes"] < stored + 10_000
        for student, t in cases:
            live = report["live_kd"][student][t]
            assert entry["kd_gap"][student][t] == pytest.approx(
                (entry["kd"][student][t] - live) / live
            )
    by_k = {entry["top_k"]: entry for entry in report["caches"]}
    assert by_k[8]["bytes_per_token"] < by_k[32]["bytes_per_token"] < by_k[128]["bytes_per_token"]
    for student, t in cases:
        assert report["live_kd"][student][t] > 0
        assert abs(by_k[128]["kd_gap"][student][t]) < abs(by_k[8]["kd_gap"][student][t])
    assert "| 128 |" in markdown and f"Commit `{report['commit']}`" in markdown
    assert not list((tmp_path / "cache").glob("outputs/*"))  # the caches were temporary


def test_a_stopped_run_removes_its_working_directory(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "WANDB_MODE": "disabled"}
    (tmp_path / "tmp").mkdir()
    command = [sys.executable, "-m", "kd_lightning.bench.run", "--lm-cache", "--quick"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "tmp").glob("kd-gap-*")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        time.sleep(0.1)
    assert list((tmp_path / "tmp").glob("kd-gap-*")), "the run never made its working directory"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list((tmp_path / "tmp").glob("kd-gap-*"))
