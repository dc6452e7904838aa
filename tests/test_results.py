"""``kd-results``: the protocol, the table's statistics, and a real smoke run."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kd_lightning.cli.results import (
    HEADLINE,
    SCRATCH,
    Entry,
    entry_teachers,
    epoch_series,
    lm_protocol,
    markdown,
    protocol,
    protocol_teachers,
    read_summaries,
    run_dir,
    step_series,
    table_rows,
    teacher_scores,
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


TEACHERS = {
    "cnn": {"file": "cnn.safetensors", "sha256": "c" * 64, "test_acc": 0.88},
    "gru": {"file": "gru.safetensors", "sha256": "9" * 64, "test_acc": 0.87},
}


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


def _write_run(out, entry, seed, summary, teachers=None, commit="abc1234"):
    path = run_dir(out, entry, seed)
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    fingerprints = {name: TEACHERS[name]["sha256"] for name in ("cnn", "gru")}
    provenance = {"commit": commit, "teachers": fingerprints if teachers is None else teachers}
    (path / "provenance.json").write_text(json.dumps(provenance))


def test_rows_give_mean_std_over_seeds_and_gains_paired_by_seed(tmp_path):
    entries = [Entry("ensemble", HEADLINE, (HEADLINE,)), Entry("fusion rule", "fusion=vote", ())]
    students, baselines = [0.66, 0.70, 0.65], [0.61, 0.63, 0.62]
    votes = {0: 0.64, 2: 0.68}  # seed 1 has not finished
    for seed, (student, baseline) in enumerate(zip(students, baselines, strict=True)):
        _write_run(tmp_path, entries[0], seed, _summary(student, baseline))
    for seed, student in votes.items():
        _write_run(tmp_path, entries[1], seed, _summary(student, None, wall=20.0), commit="def5678")

    summaries = read_summaries(tmp_path, entries, seeds=3, teachers=TEACHERS)
    rows = table_rows(entries, summaries)
    assert [row["label"] for row in rows] == [SCRATCH, HEADLINE, "fusion=vote"]
    scratch, headline, vote = rows
    assert scratch["mean"] == pytest.approx(np.mean(baselines))
    assert scratch["std"] == pytest.approx(np.std(baselines, ddof=1))
    assert headline["n"] == 3 and headline["mean"] == pytest.approx(np.mean(students))
    paired = np.subtract(students, baselines)
    assert headline["gain"] == pytest.approx(paired.mean())
    assert headline["gain_std"] == pytest.approx(np.std(paired, ddof=1))
    vote_gains = [0.64 - 0.61, 0.68 - 0.62]  # each seed against its own scratch student
    assert vote["n"] == 2 and vote["gain"] == pytest.approx(np.mean(vote_gains))
    assert vote["gain_std"] == pytest.approx(np.std(vote_gains, ddof=1))
    assert vote["wall_s"] == 20.0 and vote["commit"] == "def5678"

    table = markdown(
        rows, teacher_scores(TEACHERS, summaries, "test_accuracy"), TEACHERS, "# header"
    )
    gain = f"{100 * np.mean(vote_gains):+.1f} ± {100 * np.std(vote_gains, ddof=1):.1f}"
    assert (
        f"| fusion rule | fusion=vote | 2 | {100 * np.mean(list(votes.values())):.1f} ± " in table
    )
    assert f"| {gain} | 20 | def5678 |" in table
    assert "- cnn: 88.0 % (`cccccccccccc`)" in table
    assert "- ensemble (mean p): 90.0 %" in table


def test_a_run_from_other_teachers_is_refused_not_averaged(tmp_path):
    entry = Entry("ensemble", HEADLINE, (HEADLINE,))
    _write_run(tmp_path, entry, 0, _summary(0.7, 0.6))
    _write_run(tmp_path, entry, 1, _summary(0.7, 0.6), teachers={"cnn": "d" * 64})
    with pytest.raises(
        SystemExit, match=r"seed1: the run distilled from teacher cnn with weights dddddddddddd"
    ):
        read_summaries(tmp_path, [entry], seeds=2, teachers=TEACHERS)
    (run_dir(tmp_path, entry, 1) / "provenance.json").write_text(json.dumps({"commit": "old"}))
    with pytest.raises(SystemExit, match="records no teacher fingerprints"):
        read_summaries(tmp_path, [entry], seeds=2, teachers=TEACHERS)


def test_entries_name_their_teachers_from_threads_at_once():
    entries = [Entry("single teacher", "teachers=[gru]", ("teachers=[gru]",)), protocol()[0]] * 4
    with ThreadPoolExecutor(4) as pool:
        names = list(pool.map(lambda entry: entry_teachers(entry, []), entries))
    assert names == [["gru"], ["cnn", "gru", "mlp"]] * 4


def test_the_protocol_teachers_are_checked_against_their_fingerprints(tmp_path):
    directory = tmp_path / "teachers"
    directory.mkdir()
    (directory / "cnn.safetensors").write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    manifest = {
        "overrides": ["a=1"],
        "teachers": {"cnn": {"file": "cnn.safetensors"} | {"sha256": digest, "test_acc": 0.9}},
    }
    (directory / "teachers.json").write_text(json.dumps(manifest))
    assert protocol_teachers(tmp_path, ["a=1"]) == manifest["teachers"]
    with pytest.raises(
        SystemExit, match=r"trained with the overrides \['a=1'\], this protocol has \['a=2'\]"
    ):
        protocol_teachers(tmp_path, ["a=2"])
    (directory / "cnn.safetensors").write_bytes(b"other weights")
    with pytest.raises(
        SystemExit, match=r"cnn\.safetensors: teacher cnn's weights are missing or differ"
    ):
        protocol_teachers(tmp_path, ["a=1"])


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


def test_a_resumed_runs_logs_replace_what_was_trained_again(tmp_path):
    # Killed after step 69, resumed from a checkpoint before step 59: version_1 logs from there.
    for version, rows in {
        0: "0,9,0.5,0.9\n0,34,,0.8\n1,69,,0.7\n",
        1: "1,59,,0.6\n2,94,,0.5\n",
    }.items():
        (tmp_path / "csv" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "csv" / f"version_{version}" / "metrics.csv").write_text(
            "epoch,step,train/loss_step,val/ce\n" + rows
        )
    assert step_series(tmp_path / "csv", "val/ce") == (
        [9.0, 34.0, 59.0, 94.0],
        [0.9, 0.8, 0.6, 0.5],
    )
    assert epoch_series(tmp_path, "val/") == {"ce": [0.9, 0.8, 0.6, 0.5]}


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
    assert set(ledger["scores"]) == {"cnn", "mlp", "ensemble (mean p)"}
    for teacher in ledger["teachers"].values():
        weights = tmp_path / "results" / "teachers" / teacher["file"]
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == teacher["sha256"]
        assert f"(`{teacher['sha256'][:12]}`)" in table
    provenance = json.loads(
        (tmp_path / "results" / "runs" / "fusion-entropy" / "seed1" / "provenance.json").read_text()
    )
    assert provenance["teachers"] == {name: t["sha256"] for name, t in ledger["teachers"].items()}
    for name in ("accuracy", "fusion_weights", "student_agreement", "teacher_agreement"):
        assert (tmp_path / "results" / f"{name}.png").stat().st_size > 10_000


def test_teacher_scores_are_the_teachers_then_their_ensemble_once_measured():
    assert teacher_scores(TEACHERS, {}, "test_accuracy") == {"cnn": 0.88, "gru": 0.87}
    summaries = {HEADLINE: [_summary(0.7, 0.6)]}
    assert teacher_scores(TEACHERS, summaries, "test_accuracy") == {
        "cnn": 0.88,
        "gru": 0.87,
        "ensemble (mean p)": 0.9,
    }


def test_the_lm_table_averages_perplexities_and_pairs_relative_changes(tmp_path):
    entries = lm_protocol(["lm_wide", "lm_gru"])
    assert [entry.label for entry in entries] == [
        HEADLINE,
        "teachers=[lm_wide]",
        "teachers=[lm_gru]",
        "fusion=entropy",
        "fusion=confidence",
        "fusion=aekd",
        "fusion=routed",
        "cached k=32",
        "cached k=32 tail=student",
        "method=dml",
        "method=codistillation",
    ]
    assert entries[-5].overrides == ("fusion=routed", "data.route_ids=3")
    assert entries[-4].overrides == (HEADLINE, "cache=true", "cache_top_k=32")
    assert entries[-3].overrides == (*entries[-4].overrides, "method.loss.topk_tail=student")
    assert entries[-1].overrides == ("method=codistillation",)
    students, scratch = [50.0, 54.0], [64.0, 60.0]
    for seed in range(2):
        summary = {
            "test_perplexity": {"student": students[seed], "baseline": scratch[seed]}
            | {"ensemble": 34.5},
            "wall_time_s": 200.0,
        }
        _write_run(tmp_path, entries[0], seed, summary, teachers={})
    rows = table_rows(
        entries, read_summaries(tmp_path, entries, 2, TEACHERS), metric="test_perplexity"
    )
    changes = np.divide(students, scratch) - 1
    assert rows[0]["mean"] == pytest.approx(62.0)
    assert rows[1]["gain"] == pytest.approx(changes.mean())
    assert rows[1]["gain_std"] == pytest.approx(np.std(changes, ddof=1))
    lm_teachers = {"lm_wide": {"sha256": "a" * 64, "test_acc": 0.27, "test_loss": np.log(42.4)}}
    scores = teacher_scores(
        lm_teachers, {HEADLINE: [{"test_perplexity": {"ensemble": 34.5}}]}, "test_perplexity"
    )
    assert scores == pytest.approx({"lm_wide": 42.4, "ensemble (mean p)": 34.5})
    table = markdown(rows, scores, lm_teachers, "#", per_token=True)
    assert "| test perplexity | change over scratch, paired by seed (%) |" in table
    change = f"{100 * changes.mean():+.1f} ± {100 * np.std(changes, ddof=1):.1f}"
    assert f"| ensemble | {HEADLINE} | 2 | 52.0 ± 2.8 | {change} | 200 |" in table
    assert "- lm_wide: 42.4 (`aaaaaaaaaaaa`)" in table


@pytest.mark.slow
def test_lm_results_write_perplexities_and_the_validation_curves(tmp_path):
    tiny = [
        "data.max_bytes=20000",
        "data.vocab_size=300",
        "data.block_size=32",
        "data.batch_size=8",
        "teachers.lm_wide.model.d_model=32",
        "teachers.lm_deep.model.d_model=32",
        "teachers.lm_deep.model.n_layers=2",
        "student.d_model=16",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        "trainer.val_check_interval=3",
    ]
    only = f"{HEADLINE},fusion=routed,cached k=32,method=dml"
    args = ["-m", "kd_lightning.cli.results", "--preset", "lm", "--seeds", "1", "--only", only]
    done = run_command([*args, "--out", str(tmp_path / "lm"), *tiny], cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "lm" / "stdlib_lm.md").read_text()
    assert "| test perplexity | change over scratch, paired by seed (%) |" in table
    for label in ("scratch (CE only)", HEADLINE, "fusion=routed", "cached k=32", "method=dml"):
        assert f"| {label} | 1 |" in table
    ledger = json.loads((tmp_path / "lm" / "stdlib_lm.json").read_text())
    assert set(ledger["scores"]) == {"lm_wide", "lm_deep", "lm_gru", "ensemble (mean p)"}
    assert (tmp_path / "lm" / "val_loss.png").stat().st_size > 10_000
    curve = tmp_path / "lm" / "runs" / "fusion-mean_probs" / "seed0" / "csv_baseline"
    assert (curve / "version_0" / "metrics.csv").read_text().count("\n") > 2
