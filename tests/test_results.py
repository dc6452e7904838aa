"""``kd-results``: the protocol, the table's statistics, and a real smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_lightning.cli.results import (
    HEADLINE,
    SCRATCH,
    Entry,
    epoch_series,
    markdown,
    protocol,
    read_summaries,
    run_dir,
    table_rows,
    teacher_accuracies,
)

from .app_helpers import run_command


def test_protocol_covers_single_teachers_every_fusion_rule_and_method():
    entries = protocol()
    labels = [entry.label for entry in entries]
    assert labels[0] == HEADLINE
    assert {"teachers=[cnn]", "teachers=[gru]", "teachers=[mlp]"} <= set(labels)
    assert {"fusion=entropy", "fusion=aekd", "fusion=learned_gate", "method=ensemble_hints"} <= set(
        labels
    )
    assert "method=ensemble" not in labels and len(labels) == len(set(labels))
    aekd = next(entry for entry in entries if entry.label == "fusion=aekd")
    assert "method.loss.aggregation=loss" in aekd.overrides
    vote = next(entry for entry in entries if entry.label == "fusion=vote")
    assert vote.overrides == ("fusion=vote", "method.loss.temperature=1")
    shift = next(entry for entry in entries if entry.label == "probability_shift")
    assert shift.overrides == (HEADLINE, "method.loss.probability_shift=true")
    assert "fusion=routed" not in labels  # MNIST-1D batches carry no teacher id


def _summary(student: float, baseline: float | None, wall: float = 10.0) -> dict:
    return {
        "teachers": ["cnn", "gru"],
        "test_accuracy": {
            "student": student,
            "baseline": baseline,
            "ensemble": 0.9,
            "teachers": {"cnn": 0.88, "gru": 0.87},
        },
        "agreement": {"teachers": {"cnn_vs_gru": 0.8}},
        "wall_time_s": wall,
    }


def test_rows_give_mean_std_over_seeds_and_the_gain_over_scratch(tmp_path):
    entries = [Entry("ensemble", HEADLINE, (HEADLINE,)), Entry("fusion rule", "fusion=vote", ())]
    students, baselines, votes = [0.66, 0.70, 0.65], [0.61, 0.63, 0.62], [0.64, 0.68]
    for seed, (student, baseline) in enumerate(zip(students, baselines, strict=True)):
        path = run_dir(tmp_path, entries[0], seed)
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps(_summary(student, baseline)))
    for seed, student in enumerate(votes):
        path = run_dir(tmp_path, entries[1], seed)
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps(_summary(student, None, wall=20.0)))

    rows = table_rows(entries, read_summaries(tmp_path, entries, seeds=3))
    assert [row["label"] for row in rows] == ["scratch (CE only)", HEADLINE, "fusion=vote"]
    scratch, headline, vote = rows
    assert scratch["mean"] == pytest.approx(np.mean(baselines))
    assert scratch["std"] == pytest.approx(np.std(baselines, ddof=1))
    assert headline["n"] == 3 and headline["mean"] == pytest.approx(np.mean(students))
    assert headline["gain"] == pytest.approx(np.mean(students) - np.mean(baselines))
    assert vote["n"] == 2 and vote["std"] == pytest.approx(np.std(votes, ddof=1))
    assert vote["wall_s"] == 20.0
    table = markdown(rows, {"cnn": 0.88}, "# header")
    assert f"| fusion rule | fusion=vote | 2 | {100 * np.mean(votes):.1f} ± " in table
    assert "- cnn: 88.0 %" in table


def test_rows_without_runs_are_kept_from_the_previous_table_and_gains_follow_scratch(tmp_path):
    entries = [
        Entry("ensemble", HEADLINE, (HEADLINE,)),
        Entry("fusion rule", "fusion=vote", ()),
        Entry("method", "method=dml", ()),
    ]
    for seed, student in enumerate([0.64, 0.68]):
        path = run_dir(tmp_path, entries[1], seed)
        path.mkdir(parents=True)
        (path / "summary.json").write_text(json.dumps(_summary(student, None)))
        (path / "provenance.json").write_text(json.dumps({"commit": f"abc{seed}"}))
    previous = [
        {"group": "baseline", "label": SCRATCH, "n": 5, "mean": 0.60, "std": 0.01}
        | {"gain": None, "wall_s": None, "commit": "old"},
        {"group": "fusion rule", "label": "fusion=vote", "n": 5, "mean": 0.5, "std": 0.1}
        | {"gain": -0.1, "wall_s": 5.0, "commit": "old"},
        {"group": "method", "label": "method=dml", "n": 4, "mean": 0.7, "std": 0.02}
        | {"gain": 0.1, "wall_s": 9.0, "commit": "old"},
    ]

    rows = table_rows(entries, read_summaries(tmp_path, entries, seeds=2), previous)
    assert [row["label"] for row in rows] == [SCRATCH, "fusion=vote", "method=dml"]
    scratch, vote, dml = rows
    assert scratch == previous[0]
    assert vote["n"] == 2 and vote["mean"] == pytest.approx(0.66)
    assert vote["commit"] == "abc0, abc1" and vote["gain"] == pytest.approx(0.06)
    assert dml == previous[2] | {"gain": pytest.approx(0.1)}
    assert "| method | method=dml | 4 | 70.0 ± 2.0 | +10.0 | 9 | old |" in markdown(rows, {}, "#")


def test_epoch_series_reads_the_csv_logger_per_epoch(tmp_path):
    path = tmp_path / "csv" / "version_0"
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text(
        "epoch,step,train/loss_step,val/fusion_weight/cnn,val/fusion_weight/gru\n"
        "0,9,0.5,,\n"
        "0,34,,0.4,0.6\n"
        "1,69,,0.3,0.7\n"
    )
    assert epoch_series(tmp_path, "val/fusion_weight/") == {"cnn": [0.4, 0.3], "gru": [0.6, 0.7]}


@pytest.mark.slow
def test_smoke_results_write_the_table_and_plots(tmp_path):
    done = run_command(
        [
            "-m",
            "kd_lightning.cli.results",
            "--preset",
            "smoke",
            "--only",
            f"{HEADLINE},fusion=entropy",
            "--out",
            str(tmp_path / "results"),
            "teachers=[cnn,mlp]",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "results" / "mnist1d.md").read_text()
    assert "| baseline | scratch (CE only) | 2 |" in table
    assert "| fusion rule | fusion=entropy | 2 |" in table
    ledger = json.loads((tmp_path / "results" / "mnist1d.json").read_text())
    assert [row["label"] for row in ledger["rows"]] == [SCRATCH, HEADLINE, "fusion=entropy"]
    assert set(ledger["teachers"]) == {"cnn", "mlp", "ensemble (mean p)"}
    for name in ("accuracy", "fusion_weights", "student_agreement", "teacher_agreement"):
        assert (tmp_path / "results" / f"{name}.png").stat().st_size > 10_000


def test_teacher_accuracies_come_from_a_run_that_distilled_from_the_teachers():
    entries = [Entry("fusion rule", "fusion=vote", ()), Entry("method", "method=dml", ())]
    peers = _summary(0.7, None) | {
        "test_accuracy": {"student": 0.7, "ensemble": 0.6, "teachers": {"peer1": 0.6}}
    }
    summaries = {"method=dml": [peers], "fusion=vote": [_summary(0.64, None)]}
    assert teacher_accuracies(entries, summaries) == {
        "cnn": 0.88,
        "gru": 0.87,
        "ensemble (mean p)": 0.9,
    }
    assert teacher_accuracies(entries, {"method=dml": [peers]}) == {}
