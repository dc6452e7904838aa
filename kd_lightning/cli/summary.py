"""What a run reports: ``summary.json`` and a table, per run and across a multirun sweep."""

from __future__ import annotations

import json
import logging
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
    baseline_accuracy: float | None,
    choices: Mapping[str, str],
    wall_time_s: float,
) -> dict[str, Any]:
    """Collect a run's test results from the metrics logged by ``trainer.test``.

    Example:
        >>> metrics = {"test/acc": 0.7, "test/teacher_acc/cnn": 0.9, "test/agreement/student_vs_cnn": 0.75,
        ...            "test/ensemble/accuracy": 0.9}
        >>> build_summary(["cnn"], metrics, 0.6, {"method": "ensemble", "fusion": "mean_probs"}, 12.0)["gain"]
        0.1
    """
    student = float(test_metrics["test/acc"])
    pairs = {
        f"{a}_vs_{b}": float(test_metrics[f"test/agreement/{a}_vs_{b}"])
        for index, a in enumerate(names)
        for b in names[index + 1 :]
    }
    return {
        "method": choices.get("method"),
        "fusion": choices.get("fusion"),
        "student": choices.get("student"),
        "teachers": list(names),
        "test_accuracy": {
            "student": student,
            "baseline": baseline_accuracy,
            "ensemble": float(test_metrics["test/ensemble/accuracy"]),
            "teachers": {name: float(test_metrics[f"test/teacher_acc/{name}"]) for name in names},
        },
        "gain": None if baseline_accuracy is None else round(student - baseline_accuracy, 6),
        "agreement": {
            "student_vs": {
                name: float(test_metrics[f"test/agreement/student_vs_{name}"]) for name in names
            },
            "teachers": pairs,
        },
        "wall_time_s": round(wall_time_s, 1),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as an aligned text table."""
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
    fusion = "" if summary["fusion"] is None else f"  fusion={summary['fusion']}"
    header = (
        f"method={summary['method']}{fusion}  student={summary['student']}  "
        f"wall time {summary['wall_time_s']:.0f} s"
    )
    lines = [header, f"{'model':<{width}}  test acc  agrees with student", "-" * (width + 31)]
    for label, value, agree in rows:
        agree_text = "" if agree is None else f"{100 * agree:17.1f} %"
        lines.append(f"{label:<{width}}  {100 * value:6.1f} %{agree_text}")
    if summary["gain"] is not None:
        lines.append(f"distillation gain over scratch: {100 * summary['gain']:+.1f} points")
    return "\n".join(lines)


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
    """A markdown table with one row per job of a sweep."""

    def percent(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    lines = [
        "| job | overrides | student acc | scratch acc | gain | ensemble acc | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in jobs:
        accuracy = job["test_accuracy"]
        gain = "—" if job["gain"] is None else f"{100 * job['gain']:+.1f}"
        overrides = job["overrides"].replace("- ", "").strip() or "(defaults)"
        lines.append(
            f"| {job['job']} | {overrides} | {percent(accuracy['student'])} | {percent(accuracy['baseline'])} "
            f"| {gain} | {percent(accuracy['ensemble'])} | {job['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)
