"""kd-bench: the report's structure on tiny settings (no timing assertions: machines are noisy)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from kd_lightning.bench import run as bench
from kd_lightning.bench import workloads
from kd_lightning.bench.run import format_report, main, run_benchmark
from kd_lightning.bench.workloads import ALPHA, TEMPERATURE, WORKLOADS, handwritten_kd
from kd_lightning.losses.distillation import DistillationLoss

TINY = {"num_samples": 200, "limit_batches": 2, "batch_size": 32}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path / "cache"))


def check_structure(report: dict, epochs: int) -> None:
    assert set(report["workloads"]) == set(WORKLOADS)
    plain = report["workloads"]["plain"]["ms_per_epoch"]
    for entry in report["workloads"].values():
        assert len(entry["ms_epochs"]) == epochs
        assert all(ms > 0 for ms in entry["ms_epochs"])
        assert entry["ms_per_epoch"] > 0
        assert entry["x_plain"] == entry["ms_per_epoch"] / plain
    workloads = report["workloads"]
    for pair, value in report["ratios"].items():
        a, b = pair.split("/")
        times = zip(workloads[a]["ms_epochs"], workloads[b]["ms_epochs"], strict=True)
        paired = [x / y for x, y in times]
        assert value == pytest.approx(statistics.median(paired))
        spread = report["ratio_spread"][pair]
        if epochs > 1:
            assert min(paired) <= spread[0] <= value <= spread[1] <= max(paired)
        else:
            assert spread is None
    assert set(report["ratios"]) >= {
        "live/lightning_handwritten",
        "cached/cached_lightning_handwritten",
    }
    machine = report["machine"]
    assert machine["threads"] >= 1 and machine["torch"]
    assert "randomly initialised" in report["note"]
    assert report["memory"]["kind"]


def test_run_benchmark_reports_every_workload():
    report = run_benchmark(epochs=3, warmup=0, threads=1, **TINY)
    check_structure(report, epochs=3)
    assert report["machine"]["threads"] == 1
    table = format_report(report)
    for name in WORKLOADS:
        assert name in table
    assert "live/lightning_handwritten" in table and "quartiles" in table


def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    main(
        [
            "--epochs",
            "1",
            "--warmup",
            "0",
            "--json",
            str(path),
            "--num-samples",
            "200",
            "--limit-batches",
            "1",
            "--batch-size",
            "32",
            "--teachers",
            "cnn,mlp",
        ]
    )
    report = json.loads(path.read_text())
    check_structure(report, epochs=1)
    assert report["settings"]["teachers"] == ["cnn", "mlp"]
    assert "x plain" in capsys.readouterr().out


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="plain"):
        run_benchmark(epochs=1, warmup=0, workloads=("live",), **TINY)
    with pytest.raises(ValueError, match="epochs"):
        run_benchmark(epochs=0, **TINY)


def test_unknown_teacher_fails_cleanly():
    with pytest.raises(ValueError, match="unknown teachers"):
        run_benchmark(epochs=1, warmup=0, teachers=("nope",), **TINY)


def test_a_failing_workload_stops_the_benchmark(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("broken loop")

    monkeypatch.setattr(workloads, "_handwritten_loop", broken)
    with pytest.raises(RuntimeError, match="failed") as info:
        run_benchmark(epochs=2, warmup=0, **TINY)
    assert isinstance(info.value.__cause__, OSError)


def test_fast_paths_prints_and_writes_one_time_per_ensemble_and_option(
    tmp_path, capsys, monkeypatch
):
    from functools import partial

    from kd_lightning.bench.fast_paths import time_fast_paths

    small = partial(time_fast_paths, calls=2, repeats=1, sizes=(2,), kinds=("mlp", "cnn"))
    monkeypatch.setattr(bench, "time_fast_paths", small)
    main(["--fast-paths", "--threads", "1", "--json", str(tmp_path / "fast.json")])
    printed = capsys.readouterr().out
    assert "| teachers | loop | inference mode | stacked | bf16 autocast |" in printed
    report = json.loads((tmp_path / "fast.json").read_text())
    times = report["ms_per_forward"]
    assert list(times) == ["2 × mlp", "2 × cnn"]
    assert all(ms > 0 for row in times.values() for ms in row.values())
    assert report["machine"]["threads"] == 1


def test_handwritten_objective_equals_distillation_loss():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(6, 10), torch.randn(3, 6, 10)
    labels = torch.randint(0, 10, (6,))
    loss, hard, soft = handwritten_kd(logits, teacher_logits, labels)
    reference = DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
    out = reference(logits, teacher_logits, labels)
    torch.testing.assert_close(
        torch.stack([loss, hard, soft]), torch.stack([out.loss, out.hard, out.soft])
    )


def test_sync_costs_prints_and_writes_each_check_against_a_step(tmp_path, capsys, monkeypatch):
    from functools import partial

    from kd_lightning.bench.sync_costs import time_sync_costs

    small = partial(time_sync_costs, steps=2, rounds=2)
    monkeypatch.setattr(bench, "time_sync_costs", small)
    path = tmp_path / "sync.json"
    main(["--sync-costs", "--threads", "1", "--batch-size", "8", "--teachers", "mlp,cnn"])
    main(["--sync-costs", "--batch-size", "8", "--teachers", "mlp", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "teachers mlp+cnn" in printed and "| teacher logits finite |" in printed
    assert "| label range |" in printed and "| under 1 % |" in printed
    table = json.loads(path.read_text())["table"]
    assert list(table["ms"]) == [
        "step",
        "step, check_finite='first_step'",
        "teacher logits finite",
        "label range",
    ]
    assert all(ms > 0 for ms in table["ms"].values())
    shares = table["share_of_step"]
    assert shares == {check: table["ms"][check] / table["ms"]["step"] for check in shares}
    with pytest.raises(ValueError, match="unknown teachers"):
        main(["--sync-costs", "--teachers", "nope"])


def test_profile_names_the_library_ranges_and_lightning_hooks(capsys):
    main(["--profile", "live", "--teachers", "mlp", "--batch-size", "16"])
    table = capsys.readouterr().out
    for name in ("kd/student_forward", "kd/teachers", "kd/loss", "kd/fusion", "training_step"):
        assert name in table
    with pytest.raises(ValueError, match="--profile takes one of"):
        main(["--profile", "handwritten"])
