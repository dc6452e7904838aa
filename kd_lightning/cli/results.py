"""``kd-results``: a results table over seeds, with its plots, for MNIST-1D or the stdlib LM.

Every entry of a protocol runs as a real ``kd-train`` process per seed, in
``<out>/runs/<entry>/seed<k>``: on MNIST-1D the scratch baseline, KD from each single teacher, every
fusion rule and every method; on the standard-library LM (``--preset lm``) the scratch baseline,
each single teacher, the mean of probabilities, the entropy and confidence weights, AE-KD, the
routed rule with one teacher per sequence and the sparse top-32 cache (its tails spread evenly,
then like the student's). A finished run (its ``summary.json`` exists) is never run again and an
interrupted one resumes from its ``last.ckpt``, so rerunning the command continues where it
stopped. Then ``<out>/mnist1d.md`` gets the table
(mean ± std test accuracy over seeds, gain over scratch, wall time, the commit and the machine) and
``<out>/*.png`` the plots:

* ``accuracy.png`` — mean accuracy per entry with ±1 std error bars;
* ``fusion_weights.png`` — each fusion rule's per-teacher weight over the epochs (seed 0);
* ``student_agreement.png`` — the student's top-1 agreement with each teacher over the epochs;
* ``teacher_agreement.png`` — the pairwise teacher agreement on the test set.

For the LM, ``<out>/stdlib_lm.md`` gives test perplexities and ``val_loss.png`` the validation
cross-entropy over training of the scratch and distilled students (seed 0).

Every run distils from one teacher set: the teachers are trained once (``kd-teachers``), copied
to ``<out>/teachers/<name>.safetensors`` with their SHA-256 in ``<out>/teachers/teachers.json``,
and every run loads them from there and records their fingerprints in its ``provenance.json``. The
table is computed from the run files alone, and a run whose teachers are not the table's is
refused, never averaged in. Gains over scratch are paired by seed: each seed's scratch student is
trained on the same batches in that seed's ``fusion=mean_probs`` run. The rows also go to
``<out>/mnist1d.json`` (``stdlib_lm.json``). The LM teachers' weights (megabytes) are kept out of
git, their fingerprints in it: a retrained set with other weights is refused.

Presets: ``full`` (the reference recipe: augmentation, students 300 epochs, teachers 150,
5 seeds), ``quick`` (the ``kd-train`` defaults, 5 seeds), ``smoke`` (seconds per run, for CI) and
``lm`` (``experiment=lm`` validated every 50 steps, 3 seeds; ``--out results/lm``).
Example: ``kd-results --preset full --jobs 2``; ``--only fusion=mean_probs`` runs one entry
(the scratch baseline always comes with ``fusion=mean_probs``); ``--report-only`` writes the table
of the runs finished so far.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kd_lightning.cli.config import CONFIG_DIR
from kd_lightning.cli.summary import write_json
from kd_lightning.cli.teacher_checkpoints import file_sha256
from kd_lightning.reporting.plots import (
    accuracy_bars,
    agreement_heatmap,
    metric_curves,
    step_curves,
)
from kd_lightning.reporting.provenance import git_commit

PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "benchmark": "mnist1d",
        "seeds": 5,
        "overrides": ["data.augment=true", "trainer.max_epochs=300", "teacher_epochs=150"],
    },
    "quick": {"benchmark": "mnist1d", "seeds": 5, "overrides": []},
    "smoke": {
        "benchmark": "mnist1d",
        "seeds": 2,
        "overrides": [
            "teacher_epochs=1",
            "trainer.max_epochs=2",
            "++trainer.limit_train_batches=3",
            "++trainer.limit_val_batches=2",
        ],
    },
    "lm": {
        "benchmark": "stdlib_lm",
        "seeds": 3,
        "overrides": ["experiment=lm", "+trainer.val_check_interval=50"],
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
# The LM protocol's rules besides the headline, and its sparse cache of the three teachers; the
# routed rule serves each sequence from one teacher, round robin (data.route_ids); the cache is
# read with each teacher's tail spread evenly, then like the student's (method.loss.topk_tail).
LM_FUSIONS = ("entropy", "confidence", "aekd")
LM_ROUTED = ("fusion=routed", "data.route_ids=3")
LM_CACHE = ("cache=true", "cache_top_k=32")
LM_STUDENT_TAIL = ("method.loss.topk_tail=student",)
# The online methods that train language models: two CausalLM peers, no pretrained teacher.
LM_ONLINE = ("dml", "codistillation")
# Corrections of the teachers' targets, each on top of the headline's mean of probabilities.
TARGET_TRANSFORMS = {"probability_shift": ("method.loss.probability_shift=true",)}
HEADLINE = "fusion=mean_probs"  # the default distillation; its runs also train the scratch baseline
# Hydra's compose API is process-global: runs started by --jobs threads compose one at a time.
COMPOSING = threading.Lock()
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
    """Where one run of ``entry`` lives: a directory name without spaces or brackets.

    Examples:
        >>> run_dir(Path("out"), Entry("sparse cache", "cached k=32", ()), 1).as_posix()
        'out/runs/cached_k-32/seed1'
    """
    safe = (
        entry.label.replace("=", "-")
        .replace("[", "")
        .replace("]", "")
        .replace(",", "+")
        .replace(" ", "_")
    )
    return out / "runs" / safe / f"seed{seed}"


def lm_protocol(teachers: Sequence[str] = ("lm_wide", "lm_deep", "lm_gru")) -> list[Entry]:
    """The stdlib LM's entries: the mean of probabilities (with the scratch baseline), each
    single teacher, the uncertainty-weighted rules, AE-KD, one teacher per sequence (routed,
    round robin, as a TRL ``teacher_id`` column assigns them), the mean of probabilities read
    from a sparse top-32 cache of the teachers, with each teacher's tail spread evenly, then like
    the student's, and the online methods that train language-model peers (no teacher).

    Examples:
        >>> [entry.label for entry in lm_protocol()][7:]
        ['fusion=routed', 'cached k=32', 'cached k=32 tail=student', 'method=dml', 'method=codistillation']
    """
    entries = [Entry("ensemble", HEADLINE, (HEADLINE,))]
    entries += [Entry("single teacher", f"teachers=[{t}]", (f"teachers=[{t}]",)) for t in teachers]
    for fusion in LM_FUSIONS:
        label = f"fusion={fusion}"
        entries.append(Entry("fusion rule", label, (label, *EXTRA_OVERRIDES.get(label, []))))
    entries.append(Entry("fusion rule", LM_ROUTED[0], LM_ROUTED))
    entries.append(Entry("sparse cache", "cached k=32", (HEADLINE, *LM_CACHE)))
    entries.append(
        Entry("sparse cache", "cached k=32 tail=student", (HEADLINE, *LM_CACHE, *LM_STUDENT_TAIL))
    )
    entries += [Entry("online", f"method={m}", (f"method={m}",)) for m in LM_ONLINE]
    return entries


@dataclass(frozen=True)
class Benchmark:
    """What a results protocol runs and how its table reads: its entries, the summary metric it
    averages (accuracy, or perplexity for a language model) and its file names."""

    name: str
    title: str
    student: str
    entries: Callable[[Sequence[str]], list[Entry]]
    metric: str

    @property
    def per_token(self) -> bool:
        """Whether the table is in perplexity (a language model) rather than accuracy."""
        return self.metric == "test_perplexity"


BENCHMARKS = {
    "mnist1d": Benchmark("mnist1d", "MNIST-1D", "MLP student", protocol, "test_accuracy"),
    "stdlib_lm": Benchmark(
        "stdlib_lm",
        "Standard-library language model",
        "CausalLM student (`experiment=lm`)",
        lm_protocol,
        "test_perplexity",
    ),
}
DEFAULT_OUT = {"mnist1d": Path("results/mnist1d"), "stdlib_lm": Path("results/lm")}


def protocol_teachers(out: Path, overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The protocol's one teacher set, ``{name: {file, sha256, test_acc, test_loss}}``.

    On first use the teachers are trained (or found in the cache) by ``kd-teachers`` with the
    protocol's ``overrides`` and copied to ``<out>/teachers/``; ``teachers.json`` there keeps their
    fingerprints and the overrides. Later calls check the files against the fingerprints and the
    overrides against the protocol's, and refuse a mismatch naming the file or the overrides.
    """
    directory = out / "teachers"
    manifest = directory / "teachers.json"
    if not manifest.is_file():
        log = directory / "kd-teachers"
        command = [sys.executable, "-m", "kd_lightning.cli.teachers", *overrides]
        if subprocess.run([*command, f"hydra.run.dir={log}"], check=False).returncode != 0:
            raise SystemExit("training the teachers failed; see the output above")
        report = json.loads((log / "teachers.json").read_text())
        teachers = {}
        for name, entry in report.items():
            shutil.copyfile(entry["checkpoint"], directory / f"{name}.safetensors")
            teachers[name] = {"file": f"{name}.safetensors"} | {
                key: entry[key] for key in ("sha256", "test_acc", "test_loss")
            }
        write_json(manifest, {"overrides": list(overrides), "teachers": teachers})
    recorded = json.loads(manifest.read_text())
    if recorded["overrides"] != list(overrides):
        raise SystemExit(
            f"{manifest}: these teachers were trained with the overrides {recorded['overrides']}, "
            f"this protocol has {list(overrides)}; use another --out for another protocol"
        )
    for name, teacher in recorded["teachers"].items():
        path = directory / teacher["file"]
        if not path.is_file() or file_sha256(path) != teacher["sha256"]:
            raise SystemExit(
                f"{path}: teacher {name}'s weights are missing or differ from their SHA-256 in "
                f"{manifest}; restore them (git checkout) or start the protocol in another --out"
            )
    return recorded["teachers"]


def entry_teachers(entry: Entry, overrides: Sequence[str]) -> list[str]:
    """The teachers a run of ``entry`` distils from: its composed config's ``teachers``."""
    from hydra import compose, initialize_config_dir

    with COMPOSING, initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *entry.overrides])
    return list(cfg.teachers or {})


def run_one(
    entry: Entry,
    seed: int,
    out: Path,
    overrides: Sequence[str],
    threads: int,
    teachers: dict[str, dict[str, Any]],
) -> Path:
    """Run ``kd-train`` for ``entry`` and ``seed`` unless it already finished, from the protocol's
    ``teachers``; its log goes to ``kd-train.log`` beside its ``summary.json``."""
    directory = run_dir(out, entry, seed)
    if (directory / "summary.json").is_file():
        return directory
    names = entry_teachers(entry, overrides)
    unknown = [name for name in names if name not in teachers]
    if unknown:
        raise RuntimeError(
            f"{entry.label}: teachers {unknown} are not the protocol's {list(teachers)}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    write_json(
        directory / "provenance.json",
        {"commit": git_commit(), "teachers": {name: teachers[name]["sha256"] for name in names}},
    )
    checkpoints = [
        f"teachers.{name}.checkpoint={(out / 'teachers' / teachers[name]['file']).resolve()}"
        for name in names
    ]
    command = [
        sys.executable,
        "-m",
        "kd_lightning.cli.train",
        *overrides,
        *entry.overrides,
        *checkpoints,
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


def read_summaries(
    out: Path, entries: Sequence[Entry], seeds: int, teachers: dict[str, dict[str, Any]]
) -> dict[str, list[dict]]:
    """The ``summary.json`` of every finished run, per entry label, each with its ``seed`` and
    ``commit``. A run that did not distil from ``teachers`` (by their SHA-256) is refused."""
    found: dict[str, list[dict]] = {}
    for entry in entries:
        for seed in range(seeds):
            directory = run_dir(out, entry, seed)
            if not (directory / "summary.json").is_file():
                continue
            provenance_path = directory / "provenance.json"
            provenance = (
                json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
            )
            used = provenance.get("teachers")
            if used is None:
                raise SystemExit(
                    f"{directory}: the run records no teacher fingerprints, so it cannot join a "
                    "table of one teacher set; delete it to rerun it"
                )
            for name, sha256 in used.items():
                if name not in teachers or teachers[name]["sha256"] != sha256:
                    raise SystemExit(
                        f"{directory}: the run distilled from teacher {name} with weights "
                        f"{sha256[:12]}, not the table's teachers in {out / 'teachers'}; a table "
                        "never mixes teacher sets: delete the run to rerun it"
                    )
            summary = json.loads((directory / "summary.json").read_text())
            summary |= {"seed": seed, "commit": provenance.get("commit", "?")}
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


def paired_change(value: float, scratch: float, metric: str) -> float:
    """A run's change over the same seed's scratch student: the accuracy difference, or for a
    perplexity the relative change (negative: better than scratch).

    Examples:
        >>> round(paired_change(0.87, 0.83, "test_accuracy"), 4), paired_change(45.0, 60.0, "test_perplexity")
        (0.04, -0.25)
    """
    return value / scratch - 1 if metric == "test_perplexity" else value - scratch


def table_rows(
    entries: Sequence[Entry], summaries: dict[str, list[dict]], metric: str = "test_accuracy"
) -> list[dict[str, Any]]:
    """One row per entry with runs: the scratch baseline first, then the entries in order.

    Each row has the mean and std over its seeds of ``metric`` (a summary key: ``test_accuracy``
    or ``test_perplexity``); each gain over scratch is the mean and std over seeds of
    :func:`paired_change` against the same seed's scratch student (``pairs`` seeds have both).
    """
    headline = summaries.get(HEADLINE, [])
    scratch = {run["seed"]: run[metric]["baseline"] for run in headline}
    rows: list[dict[str, Any]] = []
    if headline:
        mean, std = mean_std(list(scratch.values()))
        rows.append(
            {"group": "baseline", "label": SCRATCH, "n": len(scratch), "mean": mean, "std": std}
            | {"gain": None, "gain_std": None, "pairs": 0, "wall_s": None}
            | {"commit": commits(headline)}
        )
    for entry in entries:
        runs = summaries.get(entry.label)
        if not runs:
            continue
        mean, std = mean_std([run[metric]["student"] for run in runs])
        gains = [
            paired_change(run[metric]["student"], scratch[run["seed"]], metric)
            for run in runs
            if run["seed"] in scratch
        ]
        gain, gain_std = mean_std(gains) if gains else (None, None)
        rows.append(
            {"group": entry.group, "label": entry.label, "n": len(runs), "mean": mean}
            | {"std": std, "gain": gain, "gain_std": gain_std, "pairs": len(gains)}
            | {"wall_s": statistics.fmean(run["wall_time_s"] for run in runs)}
            | {"commit": commits(runs)}
        )
    return rows


def teacher_scores(
    teachers: dict[str, dict[str, Any]], summaries: dict[str, list[dict]], metric: str
) -> dict[str, float]:
    """Each teacher's test accuracy or perplexity (from ``kd-teachers``) and, once a
    ``fusion=mean_probs`` run has finished, their ensemble's."""
    scores = {
        name: math.exp(teacher["test_loss"])
        if metric == "test_perplexity"
        else float(teacher["test_acc"])
        for name, teacher in teachers.items()
    }
    if summaries.get(HEADLINE):
        scores["ensemble (mean p)"] = summaries[HEADLINE][0][metric]["ensemble"]
    return scores


def machine() -> str:
    """Commit, CPU and library versions, for the table's header."""
    return (
        f"commit `{git_commit()}`, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, Python {platform.python_version()}, torch {torch.__version__}"
    )


def markdown(
    rows: Sequence[dict[str, Any]],
    scores: dict[str, float],
    teachers: dict[str, dict[str, Any]],
    header: str,
    per_token: bool = False,
) -> str:
    """The results table as markdown (accuracies, or perplexities with ``per_token``), then the
    teachers with their fingerprints."""
    value_head, gain_head = (
        ("test perplexity", "change over scratch, paired by seed (%)")
        if per_token
        else ("test acc (%)", "gain over scratch, paired by seed (pp)")
    )
    scale = 1 if per_token else 100
    lines = [
        header,
        "",
        f"| group | run | seeds | {value_head} | {gain_head} | wall time / run (s) | commit |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = "—"
        if row["gain"] is not None:
            gain = f"{100 * row['gain']:+.1f} ± {100 * row['gain_std']:.1f}"
            if row["pairs"] < row["n"]:
                gain += f" ({row['pairs']} of {row['n']} seeds)"
        wall = "—" if row["wall_s"] is None else f"{row['wall_s']:.0f}"
        lines.append(
            f"| {row['group']} | {row['label']} | {row['n']} "
            f"| {scale * row['mean']:.1f} ± {scale * row['std']:.1f} | {gain} | {wall} "
            f"| {row['commit']} |"
        )
    if scores:
        kind = "perplexity" if per_token else "accuracy"
        lines += ["", f"Teachers (one set for every run; SHA-256 of the weights), test {kind}:"]
        for name, value in scores.items():
            fingerprint = f" (`{teachers[name]['sha256'][:12]}`)" if name in teachers else ""
            shown = f"{value:.1f}" if per_token else f"{100 * value:.1f} %"
            lines.append(f"- {name}: {shown}{fingerprint}")
    return "\n".join(lines) + "\n"


def csv_log(log_dir: Path) -> list[dict[str, str]]:
    """The rows a run's CSV logger wrote under ``log_dir`` (``version_*/metrics.csv``), in order.

    A run resumed from its checkpoint logs to a new version from the checkpoint's step on; the
    rows an earlier version wrote from that step on (trained again after the restart) are dropped.
    """
    versions = sorted(
        log_dir.glob("version_*/metrics.csv"), key=lambda path: int(path.parent.name[8:])
    )
    rows: list[dict[str, str]] = []
    for path in versions:
        with open(path, newline="") as handle:
            records = list(csv.DictReader(handle))
        if records:
            resumed_at = min(float(record["step"]) for record in records)
            rows = [row for row in rows if float(row["step"]) < resumed_at] + records
    return rows


def epoch_series(directory: Path, prefix: str) -> dict[str, list[float]]:
    """Per-epoch values of the CSV-logged metrics ``<prefix><name>``, keyed by ``name``."""
    series: dict[str, list[float]] = {}
    for record in csv_log(directory / "csv"):
        for key, value in record.items():
            if key.startswith(prefix) and value not in ("", None):
                series.setdefault(key[len(prefix) :], []).append(float(value))
    return series


def step_series(log_dir: Path, key: str) -> tuple[list[float], list[float]]:
    """The training steps and values at which the CSV logs under ``log_dir`` recorded ``key``."""
    recorded = [record for record in csv_log(log_dir) if record.get(key) not in ("", None)]
    return [float(record["step"]) for record in recorded], [
        float(record[key]) for record in recorded
    ]


def draw_lm_plot(out: Path, entries: Sequence[Entry]) -> list[Path]:
    """``val_loss.png``: the validation cross-entropy over training of seed 0's scratch student
    and of each distilled one."""
    headline = next(entry for entry in entries if entry.label == HEADLINE)
    directory = run_dir(out, headline, 0)
    curves = {SCRATCH: step_series(directory / "csv_baseline", "val/loss")}
    for entry in entries:
        if entry.group != "single teacher":
            curves[entry.label] = step_series(run_dir(out, entry, 0) / "csv", "val/ce")
    curves = {label: curve for label, curve in curves.items() if curve[0]}
    if not curves:
        return []
    figure = step_curves(
        curves, "validation cross-entropy (nats/token)", "Standard-library LM: CausalLM student"
    )
    path = out / "val_loss.png"
    figure.savefig(path, dpi=120)
    return [path]


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
    entries: Sequence[Entry],
    seeds: int,
    overrides: Sequence[str],
    teachers: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> list[str]:
    """Every unfinished run, ``args.jobs`` at a time; returns the failures."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # Seed by seed, so that a stopped protocol leaves every entry with the same number of seeds.
    jobs = [(entry, seed) for seed in range(seeds) for entry in entries]
    failures = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_one, entry, seed, args.out, overrides, threads, teachers)
            for entry, seed in jobs
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
    parser.add_argument(
        "--out", type=Path, help="default: results/mnist1d, or results/lm for --preset lm"
    )
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    parser.add_argument(
        "--report-only", action="store_true", help="write the table of the runs finished so far"
    )
    parser.add_argument("overrides", nargs="*", help="extra kd-train overrides for every run")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    benchmark = BENCHMARKS[preset["benchmark"]]
    args.out = args.out or DEFAULT_OUT[benchmark.name]
    seeds = args.seeds or preset["seeds"]
    overrides = [*preset["overrides"], *args.overrides]
    if args.report_only and not (args.out / "teachers" / "teachers.json").is_file():
        raise SystemExit(f"--report-only: {args.out / 'teachers'} holds no teachers yet")
    args.out.mkdir(parents=True, exist_ok=True)
    teachers = protocol_teachers(args.out, overrides)
    entries = benchmark.entries(list(teachers))
    if args.only:
        wanted = {label.strip() for label in args.only.split(",")}
        unknown = wanted - {entry.label for entry in entries}
        if unknown:
            raise SystemExit(
                f"--only: unknown entries {sorted(unknown)}; known: {[e.label for e in entries]}"
            )
        chosen = [entry for entry in entries if entry.label in wanted]
    else:
        chosen = entries
    failures = [] if args.report_only else run_protocol(chosen, seeds, overrides, teachers, args)
    summaries = read_summaries(args.out, entries, seeds, teachers)
    rows = table_rows(entries, summaries, benchmark.metric)
    if not rows:
        raise SystemExit("no run has finished yet: " + "; ".join(failures))
    scores = teacher_scores(teachers, summaries, benchmark.metric)
    about = machine()  # before anything is written: the commit is clean or dirty as it ran
    write_json(
        args.out / f"{benchmark.name}.json",
        {"overrides": overrides, "teachers": teachers, "rows": rows} | {"scores": scores},
    )
    hours = sum(row["wall_s"] * row["n"] for row in rows if row["wall_s"] is not None) / 3600
    header = (
        f"# {benchmark.title} results ({args.preset}: "
        f"{' '.join(overrides) or 'kd-train defaults'})\n\n"
        f"{benchmark.student}, teachers {'/'.join(teachers)} (trained once; their SHA-256 are in "
        f"`teachers/teachers.json`, and every run below distilled from exactly these), up to {seeds} seeds "
        f"per entry (`seed=0..{seeds - 1}`); each seed's scratch baseline is trained on the same "
        f"batches in that seed's `{HEADLINE}` run. {about}. Written by "
        f"`kd-results --preset {args.preset}`; the runs took {hours:.1f} h one after another "
        f"(each run's wall time includes its scratch baseline where there is one)."
    )
    table = markdown(rows, scores, teachers, header, benchmark.per_token)
    (args.out / f"{benchmark.name}.md").write_text(table)
    if benchmark.per_token:
        written = draw_lm_plot(args.out, entries)
    else:
        written = draw_plots(args.out, entries, rows, summaries)
    if args.wandb:
        log_to_wandb(args.out, rows, written)
    print(table)
    print(f"written: {args.out / benchmark.name}.md, " + ", ".join(str(p) for p in written))
    if failures:
        raise SystemExit(f"{len(failures)} runs failed:\n" + "\n".join(failures))


def log_to_wandb(out: Path, rows: Sequence[dict[str, Any]], plots: Sequence[Path]) -> None:
    """Log the table and the plots as one W&B run (offline when not logged in)."""
    import wandb

    from kd_lightning.reporting.loggers import resolve_wandb_mode

    columns = ("group", "label", "n", "mean", "std", "gain", "gain_std", "wall_s", "commit")
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
