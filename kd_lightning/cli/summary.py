"""What a run reports: ``summary.json`` and a table, per run and across a multirun sweep."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def build_summary(
    names: Sequence[str],
    test_metrics: Mapping[str, float],
    baseline_metrics: Mapping[str, float] | None,
    choices: Mapping[str, str],
    wall_time_s: float,
    val_metrics: Mapping[str, float] | None = None,
    per_token: bool = False,
    skipped_steps: int = 0,
) -> dict[str, Any]:
    """Collect a run's results from the metrics logged by ``trainer.test`` (and by the last
    validation of training, ``val_metrics``).

    ``baseline_metrics`` are the scratch model's (``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc``; ``None`` without a baseline). Accuracy and cross-entropy on the labels (``ce``)
    are reported for the distilled student (its ``ce`` term), the scratch model, each teacher and
    the ensemble; a value nobody logged is ``None``. With ``per_token`` (a language model: every
    value is per real token) each cross-entropy also gives a perplexity, ``exp(ce)``, and
    ``perplexity_change`` compares the student's test perplexity with the scratch model's.
    ``skipped_steps`` counts the student's training steps skipped for a non-finite loss.

    Examples:
        >>> metrics = {"test/acc": 0.7, "test/teacher_acc/cnn": 0.9, "test/agreement/student_vs_cnn": 0.75,
        ...            "test/ensemble/accuracy": 0.9}
        >>> summary = build_summary(["cnn"], metrics, {"test/acc": 0.6}, {"method": "ensemble"}, 12.0)
        >>> summary["gain"], summary["test_ce"]["student"]
        (0.1, None)
        >>> lm = build_summary(["cnn"], {**metrics, "test/ce": 2.0}, {"test/acc": 0.6, "test/loss": 2.5},
        ...                    {"method": "ensemble"}, 12.0, per_token=True)
        >>> round(lm["test_perplexity"]["student"], 2), lm["perplexity_change"]
        (7.39, -0.393469)
    """
    val_metrics = val_metrics or {}
    student = float(test_metrics["test/acc"])
    baseline_accuracy = _value(baseline_metrics, "test/acc")
    pairs = {
        f"{a}_vs_{b}": float(test_metrics[f"test/agreement/{a}_vs_{b}"])
        for index, a in enumerate(names)
        for b in names[index + 1 :]
    }
    summary: dict[str, Any] = {
        "method": choices.get("method"),
        "fusion": choices.get("fusion"),
        "student": choices.get("student"),
        "teachers": list(names),
        "per_token": per_token,
        "test_accuracy": {
            "student": student,
            "baseline": baseline_accuracy,
            "ensemble": float(test_metrics["test/ensemble/accuracy"]),
            "teachers": {name: float(test_metrics[f"test/teacher_acc/{name}"]) for name in names},
        },
        "gain": None if baseline_accuracy is None else round(student - baseline_accuracy, 6),
    }
    summary["test_ce"] = _models(names, test_metrics, baseline_metrics, "test", "ce")
    summary["val_accuracy"] = _models(names, val_metrics, baseline_metrics, "val", "acc")
    summary["val_ce"] = _models(names, val_metrics, baseline_metrics, "val", "ce")
    if per_token:
        for stage in ("test", "val"):
            summary[f"{stage}_perplexity"] = _perplexities(summary[f"{stage}_ce"])
        perplexity = summary["test_perplexity"]
        known = perplexity["student"] is not None and perplexity["baseline"] is not None
        change = perplexity["student"] / perplexity["baseline"] - 1 if known else None
        summary["perplexity_change"] = None if change is None else round(change, 6)
    summary["agreement"] = {
        "student_vs": {
            name: float(test_metrics[f"test/agreement/student_vs_{name}"]) for name in names
        },
        "teachers": pairs,
    }
    summary["skipped_steps"] = skipped_steps
    summary["wall_time_s"] = round(wall_time_s, 1)
    return summary


def per_token(datamodule: object) -> bool:
    """Whether ``datamodule`` gives token ids (it has a ``vocab_size``), so that its metrics are
    per token and a cross-entropy is the log of a perplexity.

    Examples:
        >>> from kd_lightning.data import MNIST1DDataModule, TextDataModule
        >>> per_token(TextDataModule()), per_token(MNIST1DDataModule())
        (True, False)
    """
    return getattr(datamodule, "vocab_size", None) is not None


def _value(metrics: Mapping[str, float] | None, key: str) -> float | None:
    return None if metrics is None or key not in metrics else float(metrics[key])


# Where each statistic is logged: (student, scratch model, teacher group, ensemble) keys. The
# distilled student's cross-entropy on the labels is its loss's ``ce`` term; the scratch model's
# whole loss is one.
STATISTIC_KEYS = {
    "acc": ("acc", "acc", "teacher_acc", "ensemble/accuracy"),
    "ce": ("ce", "loss", "teacher_ce", "ensemble/ce"),
}


def _models(
    names: Sequence[str],
    metrics: Mapping[str, float],
    baseline: Mapping[str, float] | None,
    stage: str,
    statistic: str,
) -> dict[str, Any]:
    """One statistic (``acc`` or ``ce``) of every model in one stage."""
    student, scratch, teachers, ensemble = STATISTIC_KEYS[statistic]
    return {
        "student": _value(metrics, f"{stage}/{student}"),
        "baseline": _value(baseline, f"{stage}/{scratch}"),
        "ensemble": _value(metrics, f"{stage}/{ensemble}"),
        "teachers": {name: _value(metrics, f"{stage}/{teachers}/{name}") for name in names},
    }


def _perplexities(ce: Mapping[str, Any]) -> dict[str, Any]:
    """``exp`` of every cross-entropy of :func:`_models`' shape."""

    def exp(value: float | None) -> float | None:
        return None if value is None else math.exp(value)

    return {
        "student": exp(ce["student"]),
        "baseline": exp(ce["baseline"]),
        "ensemble": exp(ce["ensemble"]),
        "teachers": {name: exp(value) for name, value in ce["teachers"].items()},
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as an aligned text table: accuracy and agreement for a classifier; for a
    language model (``per_token``) also perplexities, and how the student's compares with the
    scratch model's."""
    if summary.get("per_token"):
        return _format_language_model(summary)
    accuracy = summary["test_accuracy"]
    agreement = summary["agreement"]["student_vs"]
    rows = [("student (distilled)", accuracy["student"], None)]
    if accuracy["baseline"] is not None:
        rows.append(("student (from scratch)", accuracy["baseline"], None))
    rows += [
        (f"teacher {name}", value, agreement[name]) for name, value in accuracy["teachers"].items()
    ]
    rows.append(("teacher ensemble (mean p)", accuracy["ensemble"], None))
    width = max(len(row[0]) for row in rows)
    lines = [_header(summary), f"{'model':<{width}}  test acc  agrees with student"]
    lines.append("-" * (width + 31))
    for label, value, agree in rows:
        agree_text = "" if agree is None else f"{100 * agree:17.1f} %"
        lines.append(f"{label:<{width}}  {100 * value:6.1f} %{agree_text}")
    if summary["gain"] is not None:
        lines.append(f"distillation gain over scratch: {100 * summary['gain']:+.1f} points")
    return "\n".join(lines + _skipped(summary))


def _skipped(summary: Mapping[str, Any]) -> list[str]:
    skipped = summary.get("skipped_steps")
    return [f"training steps skipped for a non-finite loss: {skipped}"] if skipped else []


def _header(summary: Mapping[str, Any]) -> str:
    fusion = "" if summary["fusion"] is None else f"  fusion={summary['fusion']}"
    return (
        f"method={summary['method']}{fusion}  student={summary['student']}  "
        f"wall time {summary['wall_time_s']:.0f} s"
    )


def _format_language_model(summary: Mapping[str, Any]) -> str:
    """The language-model table: validation and test perplexity, next-token accuracy and
    agreement per model, then the student's perplexity against the scratch model's."""
    columns = [
        ("val ppl", "val_perplexity", "{:.2f}"),
        ("val acc", "val_accuracy", "{:.1%}"),
        ("test ppl", "test_perplexity", "{:.2f}"),
        ("test CE", "test_ce", "{:.3f}"),
        ("test acc", "test_accuracy", "{:.1%}"),
    ]  # accuracies as in the classification table: "41.2 %"
    agreement = summary["agreement"]["student_vs"]
    rows: list[tuple[str, str, str | None]] = [("student (distilled)", "student", None)]
    if summary["test_accuracy"]["baseline"] is not None:
        rows.append(("student (from scratch)", "baseline", None))
    rows += [(f"teacher {name}", "teachers", name) for name in summary["teachers"]]
    rows.append(("teacher ensemble (mean p)", "ensemble", None))
    width = max(len(label) for label, _, _ in rows)
    titles = "  ".join(title for title, _, _ in columns)
    lines = [_header(summary), f"{'model':<{width}}  {titles}  agrees with student"]
    lines.append("-" * len(lines[-1]))
    for label, role, name in rows:
        cells = []
        for title, key, form in columns:
            value = summary[key][role] if name is None else summary[key][role][name]
            text = "—" if value is None else form.format(value).replace("%", " %")
            cells.append(text.rjust(len(title)))
        agree_text = "" if name is None else f"{agreement[name]:.1%}".replace("%", " %").rjust(21)
        lines.append(f"{label:<{width}}  {'  '.join(cells)}{agree_text}")
    if summary["perplexity_change"] is not None:
        perplexity = summary["test_perplexity"]
        lines.append(
            f"perplexity vs scratch: {perplexity['student']:.2f} vs {perplexity['baseline']:.2f} "
            f"({100 * summary['perplexity_change']:+.1f} %)"
        )
    return "\n".join(lines + _skipped(summary))


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, compare its jobs in ``summary.md`` at the sweep's root."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        jobs = []
        for path in sorted(
            root.glob("*/summary.json"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        ):
            overrides_file = path.parent / ".hydra" / "overrides.yaml"
            overrides = (
                overrides_file.read_text().strip().replace("\n", " ")
                if overrides_file.is_file()
                else ""
            )
            jobs.append(
                {"job": path.parent.name, "overrides": overrides, **json.loads(path.read_text())}
            )
        if not jobs:
            log.warning("no job of the sweep in %s wrote a summary.json", root)
            return
        write_json(root / "summary.json", jobs)
        table = format_sweep(jobs)
        (root / "summary.md").write_text(table + "\n")
        print(f"\n{table}\n\nwritten to {root / 'summary.md'}")


def format_sweep(jobs: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table with one row per job of a sweep; perplexities too when a job is a
    language model.

    Examples:
        >>> job = {"job": "0", "overrides": "- seed=1", "gain": 0.02, "wall_time_s": 30.0,
        ...        "test_accuracy": {"student": 0.42, "baseline": 0.40, "ensemble": 0.5}}
        >>> print(format_sweep([job]).splitlines()[-1])
        | 0 | seed=1 | 42.0 | 40.0 | +2.0 | 50.0 | 30 |
    """

    def percent(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    per_token = any(job.get("per_token") for job in jobs)
    extra = " student ppl | scratch ppl | ppl vs scratch | ensemble ppl |" if per_token else ""
    lines = [
        f"| job | overrides | student acc | scratch acc | gain | ensemble acc |{extra} "
        "wall time (s) |",
        "|---|---|---|---|---|---|" + "---|" * (5 if per_token else 1),
    ]
    for job in jobs:
        accuracy = job["test_accuracy"]
        gain = "—" if job["gain"] is None else f"{100 * job['gain']:+.1f}"
        overrides = job["overrides"].replace("- ", "").strip() or "(defaults)"
        cells = [
            job["job"],
            overrides,
            percent(accuracy["student"]),
            percent(accuracy["baseline"]),
            gain,
            percent(accuracy["ensemble"]),
        ]
        if per_token:
            perplexity = job.get("test_perplexity") or {}
            change = job.get("perplexity_change")
            cells += [
                number(perplexity.get("student")),
                number(perplexity.get("baseline")),
                "—" if change is None else f"{change:+.1%}",
                number(perplexity.get("ensemble")),
            ]
        cells.append(f"{job['wall_time_s']:.0f}")
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)
