"""``kd-results``: the MNIST-1D results table, over seeds, with its plots.

Every entry of the protocol — the scratch baseline, KD from each single teacher, every fusion
rule and every method — runs as a real ``kd-train`` process per seed, in
``<out>/runs/<entry>/seed<k>``. A finished run (its ``summary.json`` exists) is never run again
and an interrupted one resumes from its ``last.ckpt``, so rerunning the command continues where
it stopped. Then ``<out>/mnist1d.md`` gets the table (mean ± std test accuracy over seeds, gain
over scratch, wall time, the commit and the machine) and ``<out>/*.png`` the plots:

* ``accuracy.png`` — mean accuracy per entry with ±1 std error bars;
* ``fusion_weights.png`` — each fusion rule's per-teacher weight over the epochs (seed 0);
* ``student_agreement.png`` — the student's top-1 agreement with each teacher over the epochs;
* ``teacher_agreement.png`` — the pairwise teacher agreement on the test set.

The table's rows are also kept in ``<out>/mnist1d.json``. An entry whose runs are not on this
machine keeps its row from there (with the commit it was measured at), so a table grows across
machines and sessions; rows of another preset are never mixed in.

Presets: ``full`` (the reference recipe: augmentation, students 300 epochs, teachers 150,
5 seeds), ``quick`` (the ``kd-train`` defaults, 5 seeds) and ``smoke`` (seconds per run, for CI).
Example: ``kd-results --preset full --jobs 2``; ``--only fusion=mean_probs`` runs one entry
(the scratch baseline always comes with ``fusion=mean_probs``); ``--report-only`` writes the table
of the runs finished so far.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kd_lightning.cli.config import CONFIG_DIR
from kd_lightning.cli.summary import write_json
from kd_lightning.reporting.plots import accuracy_bars, agreement_heatmap, metric_curves

PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "seeds": 5,
        "overrides": ["data.augment=true", "trainer.max_epochs=300", "teacher_epochs=150"],
    },
    "quick": {"seeds": 5, "overrides": []},
    "smoke": {
        "seeds": 2,
        "overrides": [
            "teacher_epochs=1",
            "trainer.max_epochs=2",
            "++trainer.limit_train_batches=3",
            "++trainer.limit_val_batches=2",
        ],
    },
}
# Entries that need more than their own override to run as their papers do: AE-KD weighs the
# teachers' losses; the vote's one-hot label is learnt at T = 1, as a hard label is, where at the
# protocol's T = 4 the KD term would ask softmax(s / 4) to be one-hot.
EXTRA_OVERRIDES = {
    "fusion=aekd": ["method.loss.aggregation=loss"],
    "fusion=vote": ["method.loss.temperature=1"],
}
# Rules that need what MNIST-1D lacks: routing reads a teacher id from each batch.
NOT_ON_MNIST1D = {"fusion=routed"}
# Corrections of the teachers' targets, each on top of the headline's mean of probabilities.
TARGET_TRANSFORMS = {"probability_shift": ("method.loss.probability_shift=true",)}
HEADLINE = "fusion=mean_probs"  # the default distillation; its runs also train the scratch baseline
SCRATCH = "scratch (CE only)"


@dataclass(frozen=True)
class Entry:
    """One row of the table: a group, a label and the ``kd-train`` overrides that make it."""

    group: str
    label: str
    overrides: tuple[str, ...]


def protocol(teachers: Sequence[str] = ("cnn", "gru", "mlp")) -> list[Entry]:
    """Every entry: single-teacher KD, each fusion rule (mean of probabilities first), each
    target transform, each method.

    Examples:
        >>> [entry.label for entry in protocol()][:4]
        ['fusion=mean_probs', 'teachers=[cnn]', 'teachers=[gru]', 'teachers=[mlp]']
    """
    conf = Path(CONFIG_DIR)
    fusions = sorted(path.stem for path in (conf / "fusion").glob("*.yaml"))
    methods = sorted(path.stem for path in (conf / "method").glob("*.yaml"))
    entries = [Entry("ensemble", HEADLINE, (HEADLINE,))]
    entries += [Entry("single teacher", f"teachers=[{t}]", (f"teachers=[{t}]",)) for t in teachers]
    for fusion in fusions:
        label = f"fusion={fusion}"
        if label != HEADLINE and label not in NOT_ON_MNIST1D:
            entries.append(Entry("fusion rule", label, (label, *EXTRA_OVERRIDES.get(label, []))))
    entries += [
        Entry("target transform", name, (HEADLINE, *overrides))
        for name, overrides in TARGET_TRANSFORMS.items()
    ]
    entries += [
        Entry("method", f"method={m}", (f"method={m}",)) for m in methods if m != "ensemble"
    ]
    return entries


def run_dir(out: Path, entry: Entry, seed: int) -> Path:
    """Where one run of ``entry`` lives."""
    safe = entry.label.replace("=", "-").replace("[", "").replace("]", "").replace(",", "+")
    return out / "runs" / safe / f"seed{seed}"


def run_one(entry: Entry, seed: int, out: Path, overrides: Sequence[str], threads: int) -> Path:
    """Run ``kd-train`` for ``entry`` and ``seed`` unless it already finished; its log goes to
    ``kd-train.log`` beside its ``summary.json``."""
    directory = run_dir(out, entry, seed)
    if (directory / "summary.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "provenance.json", {"commit": git_commit()})
    command = [
        sys.executable,
        "-m",
        "kd_lightning.cli.train",
        *overrides,
        *entry.overrides,
        f"seed={seed}",
        f"baseline={str(entry.label == HEADLINE).lower()}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={directory}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    with open(directory / "kd-train.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"{entry.label} seed {seed} failed (exit {done.returncode}): see {directory / 'kd-train.log'}"
        )
    return directory


def read_summaries(out: Path, entries: Sequence[Entry], seeds: int) -> dict[str, list[dict]]:
    """The ``summary.json`` of every finished run, per entry label."""
    found: dict[str, list[dict]] = {}
    for entry in entries:
        for seed in range(seeds):
            directory = run_dir(out, entry, seed)
            if (directory / "summary.json").is_file():
                summary = json.loads((directory / "summary.json").read_text())
                provenance = directory / "provenance.json"
                if provenance.is_file():
                    summary["commit"] = json.loads(provenance.read_text())["commit"]
                found.setdefault(entry.label, []).append(summary)
    return found


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    Examples:
        >>> mean_std([0.5, 0.7])
        (0.6, 0.14142135623730948)
    """
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def commits(runs: Sequence[dict]) -> str:
    """The commits that ``runs`` ran at, e.g. ``"3ab573d"``; ``"?"`` where none was recorded."""
    return ", ".join(sorted({run.get("commit", "?") for run in runs}))


def table_rows(
    entries: Sequence[Entry],
    summaries: dict[str, list[dict]],
    previous: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """One row per entry: the scratch baseline first, then the entries in order.

    An entry with runs gets the mean and std over them; one without keeps its row from
    ``previous`` (an earlier table's rows), if it has one there. Gains are over the scratch row.
    """
    kept = {row["label"]: row for row in previous}
    rows: list[dict[str, Any]] = []
    headline = summaries.get(HEADLINE, [])
    if headline:
        mean, std = mean_std([s["test_accuracy"]["baseline"] for s in headline])
        rows.append(
            {"group": "baseline", "label": SCRATCH, "n": len(headline), "mean": mean, "std": std}
            | {"wall_s": None, "commit": commits(headline)}
        )
    elif SCRATCH in kept:
        rows.append(dict(kept[SCRATCH]))
    for entry in entries:
        runs = summaries.get(entry.label)
        if runs:
            mean, std = mean_std([s["test_accuracy"]["student"] for s in runs])
            wall = statistics.fmean(s["wall_time_s"] for s in runs)
            rows.append(
                {"group": entry.group, "label": entry.label, "n": len(runs), "mean": mean}
                | {"std": std, "wall_s": wall, "commit": commits(runs)}
            )
        elif entry.label in kept:
            rows.append(dict(kept[entry.label]))
    scratch = rows[0]["mean"] if rows and rows[0]["label"] == SCRATCH else None
    for row in rows:
        row["gain"] = None if scratch is None or row["label"] == SCRATCH else row["mean"] - scratch
    return rows


def teacher_accuracies(
    entries: Sequence[Entry], summaries: dict[str, list[dict]]
) -> dict[str, float]:
    """The teachers' and their ensemble's test accuracies, from the first run that distilled from
    all of them (the ensemble's or a fusion rule's); ``{}`` when there is none."""
    for entry in entries:
        if entry.group in ("ensemble", "fusion rule") and summaries.get(entry.label):
            accuracy = summaries[entry.label][0]["test_accuracy"]
            return accuracy["teachers"] | {"ensemble (mean p)": accuracy["ensemble"]}
    return {}


def git_commit() -> str:
    """The checkout's short commit (``-dirty`` when it has changes), or why there is none."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def machine() -> str:
    """Commit, CPU and library versions, for the table's header."""
    return (
        f"commit `{git_commit()}`, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, Python {platform.python_version()}, torch {torch.__version__}"
    )


def markdown(rows: Sequence[dict[str, Any]], teachers: dict[str, Any], header: str) -> str:
    """The results table as markdown."""
    lines = [
        header,
        "",
        "| group | run | seeds | test acc (%) | gain over scratch | wall time / run (s) | commit |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = "—" if row["gain"] is None else f"{100 * row['gain']:+.1f}"
        wall = "—" if row["wall_s"] is None else f"{row['wall_s']:.0f}"
        lines.append(
            f"| {row['group']} | {row['label']} | {row['n']} "
            f"| {100 * row['mean']:.1f} ± {100 * row['std']:.1f} | {gain} | {wall} "
            f"| {row['commit']} |"
        )
    if teachers:
        lines += ["", "Teachers (fixed across seeds), test accuracy:"]
        lines += [f"- {name}: {100 * value:.1f} %" for name, value in teachers.items()]
    return "\n".join(lines) + "\n"


def epoch_series(directory: Path, prefix: str) -> dict[str, list[float]]:
    """Per-epoch values of the CSV-logged metrics ``<prefix><name>``, keyed by ``name``."""
    series: dict[str, list[float]] = {}
    for path in sorted(directory.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            for record in csv.DictReader(handle):
                for key, value in record.items():
                    if key.startswith(prefix) and value not in ("", None):
                        series.setdefault(key[len(prefix) :], []).append(float(value))
    return series


def draw_plots(
    out: Path, entries: Sequence[Entry], rows: Sequence[dict], summaries: dict
) -> list[Path]:
    """Write the PNGs for the runs found; returns their paths."""
    written = []

    def save(figure: Any, name: str) -> None:
        path = out / name
        figure.savefig(path, dpi=120)
        written.append(path)

    scratch = next((row["mean"] for row in rows if row["group"] == "baseline"), None)
    save(
        accuracy_bars(
            [row["label"] for row in rows],
            [row["mean"] for row in rows],
            [row["std"] for row in rows],
            reference=scratch,
            title="MNIST-1D: distilled MLP student, test accuracy",
        ),
        "accuracy.png",
    )
    weights = {
        entry.label.removeprefix("fusion="): epoch_series(
            run_dir(out, entry, 0), "val/fusion_weight/"
        )
        for entry in entries
        if entry.group in ("fusion rule", "ensemble")
    }
    weights = {name: series for name, series in weights.items() if series}
    if weights:
        save(
            metric_curves(weights, "mean fusion weight", "Per-teacher fusion weights (validation)"),
            "fusion_weights.png",
        )
    headline = next(entry for entry in entries if entry.label == HEADLINE)
    agreement = epoch_series(run_dir(out, headline, 0), "val/agreement/student_vs_")
    if agreement:
        save(
            metric_curves(
                {HEADLINE: agreement}, "top-1 agreement", "Student-teacher agreement (validation)"
            ),
            "student_agreement.png",
        )
    if summaries.get(HEADLINE):
        summary = summaries[HEADLINE][0]
        names = summary["teachers"]
        pairs = summary["agreement"]["teachers"]
        matrix = [
            [1.0 if a == b else pairs.get(f"{a}_vs_{b}", pairs.get(f"{b}_vs_{a}")) for b in names]
            for a in names
        ]
        save(
            agreement_heatmap(matrix, names, "Pairwise teacher agreement (test)"),
            "teacher_agreement.png",
        )
    return written


def run_protocol(
    entries: Sequence[Entry], seeds: int, overrides: Sequence[str], args: argparse.Namespace
) -> list[str]:
    """Train the teachers, then every unfinished run, ``args.jobs`` at a time; returns failures."""
    # Train (or find) the teachers once, before runs that would race to train them.
    teachers = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_lightning.cli.teachers",
            *overrides,
            f"hydra.run.dir={args.out / 'teachers'}",
        ],
        check=False,
    )
    if teachers.returncode != 0:
        raise SystemExit("training the teachers failed; see the output above")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # Seed by seed, so that a stopped protocol leaves every entry with the same number of seeds.
    jobs = [(entry, seed) for seed in range(seeds) for entry in entries]
    failures = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_one, entry, seed, args.out, overrides, threads) for entry, seed in jobs
        ]
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs", unit="run"):
            if future.exception() is not None:
                failures.append(str(future.exception()))
                tqdm.write(failures[-1])
    return failures


def main(argv: Sequence[str] | None = None) -> None:
    """The ``kd-results`` command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seeds", type=int, help="seeds per entry (default: the preset's)")
    parser.add_argument("--only", help="comma-separated entry labels, e.g. fusion=mean_probs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    parser.add_argument(
        "--report-only", action="store_true", help="write the table of the runs finished so far"
    )
    parser.add_argument("overrides", nargs="*", help="extra kd-train overrides for every run")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    seeds = args.seeds or preset["seeds"]
    overrides = [*preset["overrides"], *args.overrides]
    entries = protocol()
    if args.only:
        wanted = {label.strip() for label in args.only.split(",")}
        unknown = wanted - {entry.label for entry in entries}
        if unknown:
            raise SystemExit(
                f"--only: unknown entries {sorted(unknown)}; known: {[e.label for e in entries]}"
            )
        entries = [entry for entry in entries if entry.label in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    failures = [] if args.report_only else run_protocol(entries, seeds, overrides, args)
    summaries = read_summaries(args.out, protocol(), seeds)
    ledger_path = args.out / "mnist1d.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    if ledger.get("overrides") != overrides:
        ledger = {}  # another preset's rows never mix with this one's
    rows = table_rows(protocol(), summaries, ledger.get("rows", []))
    if not rows:
        raise SystemExit("no run has finished yet: " + "; ".join(failures))
    teachers_acc = teacher_accuracies(protocol(), summaries) or ledger.get("teachers", {})
    write_json(ledger_path, {"overrides": overrides, "rows": rows, "teachers": teachers_acc})
    hours = sum(row["wall_s"] * row["n"] for row in rows if row["wall_s"] is not None) / 3600
    header = (
        f"# MNIST-1D results ({args.preset}: {' '.join(overrides) or 'kd-train defaults'})\n\n"
        f"MLP student, teachers cnn/gru/mlp, up to {seeds} seeds per entry (`seed=0..{seeds - 1}`); "
        f"the scratch baseline is trained in the `{HEADLINE}` runs. {machine()}. "
        f"Written by `kd-results --preset {args.preset}`; the runs took {hours:.1f} h one after "
        f"another (each run's wall time includes its scratch baseline where there is one)."
    )
    (args.out / "mnist1d.md").write_text(markdown(rows, teachers_acc, header))
    written = draw_plots(args.out, protocol(), rows, summaries)
    if args.wandb:
        log_to_wandb(args.out, rows, written)
    print(markdown(rows, teachers_acc, header))
    print(f"written: {args.out / 'mnist1d.md'}, " + ", ".join(str(path) for path in written))
    if failures:
        raise SystemExit(f"{len(failures)} runs failed:\n" + "\n".join(failures))


def log_to_wandb(out: Path, rows: Sequence[dict[str, Any]], plots: Sequence[Path]) -> None:
    """Log the table and the plots as one W&B run (offline when not logged in)."""
    import wandb

    from kd_lightning.reporting.loggers import resolve_wandb_mode

    columns = ("group", "label", "n", "mean", "std", "gain", "wall_s", "commit")
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "kd_lightning"),
        job_type="results",
        mode=resolve_wandb_mode(),  # type: ignore[arg-type]  # a str checked against WANDB_MODES
        dir=str(out),
    )
    table = wandb.Table(columns=list(columns), data=[[row[c] for c in columns] for row in rows])
    run.log({"results": table} | {path.stem: wandb.Image(str(path)) for path in plots})
    run.finish()


if __name__ == "__main__":
    main()
