"""``kd-bench``: the cost of an epoch of distillation against plain training, in one process.

Seven workloads train the MNIST-1D MLP student on the same data in the same process:

* ``plain``: the student alone with cross-entropy through a Lightning ``Trainer`` (the floor);
* ``live``: :class:`~kd_lightning.DistillationModule` with live teachers (mean of probabilities);
* ``handwritten``: the same live-teacher workload as a minimal plain-PyTorch loop;
* ``aekd``: ``DistillationModule`` with :class:`~kd_lightning.fusion.GradientSpaceWeights` and
  ``aggregation="loss"``;
* ``plain_handwritten``: the student alone in a plain-PyTorch loop (Lightning's own overhead);
* ``cached``: ``DistillationModule`` reading the teachers' logits from a teacher-output cache
  (:mod:`kd_lightning.teachers.cache.build`, built once before timing under
  ``$KD_LIGHTNING_CACHE/outputs``) by sample index: no teacher runs while it trains;
* ``cached_handwritten``: the same cache read by a minimal plain-PyTorch loop, so
  ``cached_handwritten/plain_handwritten`` is the floor's ratio without Lightning or the module;
* ``lightning_handwritten`` and ``cached_lightning_handwritten``: KD as a user writes it in their
  own ``LightningModule`` (:class:`~kd_lightning.bench.workloads.HandwrittenKDModule`), with live
  teachers and from the same cache: what ``live`` and ``cached`` are measured against.

Each workload runs in its own thread, but only one at a time: a scheduler hands them the turn
round-robin, one epoch each, so slow drifts of the machine spread over all of them. A ratio is the
median over rounds of the two workloads' epoch times in the same round, reported with the
quartiles of those paired ratios (``ratio_spread``). Lightning
workloads are one ``fit`` of ``warmup + epochs`` epochs; a callback records
``time.perf_counter()`` (wall) and ``time.thread_time()`` (the CPU time of the workload's own
thread: all of its work with ``--threads 1``, and much less disturbed than wall time by other
processes on a shared machine) at the start and end of each training epoch, and waits for its next
turn there. Warm-up epochs are discarded. The teachers are randomly initialised: an epoch's cost
does not depend on their weights. The hand-written loops keep the epoch means the modules log
(loss, CE, KD, accuracy), so both sides do the same user-visible work. ``--memory`` also runs each
workload alone in a fresh process to measure its memory (:mod:`kd_lightning.bench.memory`).

This is a measuring tool, configured by plain ``argparse`` rather than Hydra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import signal
import statistics
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kd_lightning.bench.cache_gap import (
    QUICK_OVERRIDES,
    QUICK_STEPS,
    STUDENT_STEPS,
    format_cache_gap,
    run_cache_gap,
)
from kd_lightning.bench.fast_paths import CALLS, ROUNDS, format_fast_paths, time_fast_paths
from kd_lightning.bench.lm import QUICK, LMSize, format_lm_report, run_lm_benchmark
from kd_lightning.bench.memory import memory_table, probe_in_subprocess
from kd_lightning.bench.profile import format_profile, profile_workload
from kd_lightning.bench.sync_costs import ROUNDS as SYNC_ROUNDS
from kd_lightning.bench.sync_costs import STEPS as SYNC_STEPS
from kd_lightning.bench.sync_costs import format_sync_costs, time_sync_costs
from kd_lightning.bench.workloads import (
    ALPHA,
    LIGHTNING_WORKLOADS,
    TEMPERATURE,
    WORKLOADS,
    Workload,
    build_workload,
    make_teachers,
    training_data,
)
from kd_lightning.reporting.provenance import git_commit

RATIOS = (
    "live/lightning_handwritten",
    "cached/cached_lightning_handwritten",
    "live/handwritten",
    "aekd/live",
    "cached/plain",
    "cached_handwritten/plain_handwritten",
)
"""The tracked ratios: the first two are the targets (the library against the ``LightningModule``
a user would write instead); the others are information."""
CPU_RATIOS = (
    "live/lightning_handwritten",
    "cached/cached_lightning_handwritten",
    "live/handwritten",
    "plain/plain_handwritten",
)
NOTE = (
    "teachers are randomly initialised (an epoch's cost does not depend on their weights); "
    "times are training epochs only (no validation), from one run in one process"
)


def _thread_body(workload: Workload, train: Callable[[], None], threads: int) -> None:
    # The intra-op thread count is per thread (OpenMP): set it in every workload thread.
    torch.set_num_threads(threads)
    try:
        workload.turns.wait_turn()
        train()
    except BaseException as error:  # reported by the scheduler
        workload.turns.error = error
    finally:
        workload.turns.end_turn()


def machine(threads: int, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "threads": threads,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(
    epochs: int = 20,
    warmup: int = 2,
    batch_size: int = 100,
    teachers: Sequence[str] = ("cnn", "gru", "mlp"),
    seed: int = 0,
    threads: int | None = None,
    num_samples: int = 5000,
    limit_batches: int | None = None,
    workloads: Sequence[str] = WORKLOADS,
    memory_probe: bool = False,
) -> dict[str, Any]:
    """Time ``epochs`` training epochs (after ``warmup``) of each workload, round-robin.

    Args:
        epochs: Measured epochs per workload.
        warmup: Epochs run first and discarded.
        batch_size: Training batch size.
        teachers: Names of the live teachers (``cnn``, ``gru``, ``mlp``).
        seed: Seed of every workload's models.
        threads: ``torch.set_num_threads`` for every workload; ``None`` keeps torch's default.
        num_samples: MNIST-1D samples (train, validation and test together).
        limit_batches: Training batches per epoch; ``None`` for all of them.
        workloads: Which workloads to run; ``plain`` is required (the ratios' denominator).
        memory_probe: Also run each workload one epoch alone in a fresh process and report its
            memory there (:mod:`kd_lightning.bench.memory`), under ``workloads[name]["memory"]``.

    Returns:
        ``{"machine", "settings", "workloads": {name: {"ms_per_epoch", "ms_epochs", "x_plain",
        "peak_memory_bytes"}}, "ratios": {"live/handwritten", "aekd/live", "cached/plain",
        "cached_handwritten/plain_handwritten"}, "cpu_ratios", "memory", "note"}``.
    """
    if epochs < 1 or warmup < 0:
        raise ValueError(f"need epochs >= 1 and warmup >= 0, got {epochs} and {warmup}")
    if "plain" not in workloads:
        raise ValueError("the workloads must include 'plain', the denominator of every ratio")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    make_teachers(teachers)  # unknown names fail here, before any thread starts
    num_threads = torch.get_num_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    datamodule = training_data(batch_size, num_samples)

    total = warmup + epochs
    runs = []
    for name in workloads:
        workload = Workload(name, device, total)
        # Each workload gets its own loader over the same training set.
        train = build_workload(
            name, workload, teachers, datamodule.train_dataloader(), limit_batches, seed
        )
        thread = threading.Thread(
            target=_thread_body,
            args=(workload, train, num_threads),
            name=f"kd-bench-{name}",
            daemon=True,
        )
        thread.start()
        runs.append((workload, thread))
    try:
        for _ in range(total + 1):  # the last turn lets each workload finish its fit alone
            for workload, thread in runs:
                workload.turns.run_turn(thread)
                if workload.turns.error is not None:
                    raise RuntimeError(f"workload {workload.name!r} failed") from (
                        workload.turns.error
                    )
    finally:
        for workload, thread in runs:
            workload.turns.aborted = True  # a no-op unless a failure stopped the rounds early
            while thread.is_alive():
                workload.turns.go.set()
                thread.join(timeout=0.1)

    results: dict[str, dict[str, Any]] = {}
    for workload, _ in runs:
        if len(workload.times) != total:
            raise RuntimeError(
                f"workload {workload.name!r} ran {len(workload.times)} epochs, expected {total}"
            )
        measured = [1000 * seconds for seconds in workload.times[warmup:]]
        cpu = [1000 * seconds for seconds in workload.cpu_times[warmup:]]
        results[workload.name] = {
            "ms_per_epoch": statistics.median(measured),
            "ms_epochs": measured,
            "cpu_ms_per_epoch": statistics.median(cpu),
            "cpu_ms_epochs": cpu,
            "peak_memory_bytes": workload.peak_bytes if device.type == "cuda" else None,
        }
    plain = results["plain"]["ms_per_epoch"]
    for entry in results.values():
        entry["x_plain"] = entry["ms_per_epoch"] / plain

    def paired(pair: str, key: str) -> list[float] | None:
        """Round by round, the first workload's epoch over the second's; ``None`` if one is absent."""
        a, b = pair.split("/")
        if a not in results or b not in results:
            return None
        return [x / y for x, y in zip(results[a][key], results[b][key], strict=True)]

    def ratio(pair: str, key: str = "ms_epochs") -> float | None:
        rounds = paired(pair, key)
        return None if rounds is None else statistics.median(rounds)

    def spread(pair: str) -> list[float] | None:
        rounds = paired(pair, "ms_epochs")
        if rounds is None or len(rounds) < 2:
            return None
        low, _, high = statistics.quantiles(rounds, n=4, method="inclusive")
        return [low, high]

    if device.type == "cuda":
        memory: dict[str, Any] = {
            "kind": "torch.cuda.max_memory_allocated per workload (its own epochs)"
        }
    else:
        # ru_maxrss is in kilobytes on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        memory = {
            "kind": "process max RSS at the end, process-wide (all workloads together)",
            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        }
    if memory_probe:
        for name in results:
            results[name]["memory"] = probe_in_subprocess(
                name,
                teachers=list(teachers),
                batch_size=batch_size,
                num_samples=num_samples,
                limit_batches=limit_batches,
                seed=seed,
            )
    return {
        "machine": machine(num_threads, device),
        "settings": {
            "epochs": epochs,
            "warmup": warmup,
            "batch_size": batch_size,
            "teachers": list(teachers),
            "seed": seed,
            "num_samples": num_samples,
            "train_samples": len(datamodule.train_set or ()),
            "limit_batches": limit_batches,
            "alpha": ALPHA,
            "temperature": TEMPERATURE,
        },
        "workloads": results,
        "ratios": {pair: ratio(pair) for pair in RATIOS},
        "ratio_spread": {pair: spread(pair) for pair in RATIOS},
        # The CPU time of each workload's own thread: all of its work with threads=1, and far
        # less sensitive than wall time to other processes sharing the machine.
        "cpu_ratios": {pair: ratio(pair, "cpu_ms_epochs") for pair in CPU_RATIOS},
        "memory": memory,
        "note": NOTE,
    }


def format_report(report: dict[str, Any]) -> str:
    """The machine line, a table (name, median ms/epoch, × plain) and the tracked ratios."""
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"lightning {m['lightning']}, {m['threads']} threads, device {m.get('gpu', m['device'])}",
        f"MNIST-1D, {s['train_samples']} training samples, batch {s['batch_size']}, MLP student, "
        f"teachers {'+'.join(s['teachers'])}; median of {s['epochs']} epochs after {s['warmup']} "
        "warm-up, round-robin",
    ]
    cuda = m["device"].startswith("cuda")
    header = f"{'workload':<28} {'ms/epoch':>9} {'x plain':>8} {'cpu ms':>8}" + (
        f" {'peak MiB':>9}" if cuda else ""
    )
    lines += [header, "-" * len(header)]
    for name, entry in report["workloads"].items():
        row = (
            f"{name:<28} {entry['ms_per_epoch']:>9.1f} {entry['x_plain']:>7.2f}x "
            f"{entry['cpu_ms_per_epoch']:>8.1f}"
        )
        if cuda:
            row += f" {entry['peak_memory_bytes'] / 2**20:>9.1f}"
        lines.append(row)
    for key, value in report["ratios"].items():
        if value is not None:
            quartiles = report["ratio_spread"].get(key)
            between = (
                ""
                if quartiles is None
                else f" (quartiles {quartiles[0]:.2f} to {quartiles[1]:.2f})"
            )
            lines.append(f"{key}: {value:.2f}x{between}")
    for key, value in report["cpu_ratios"].items():
        if value is not None:
            lines.append(f"{key} (cpu ms, the workload's own thread): {value:.2f}x")
    memory = report["memory"]
    if "process_max_rss_bytes" in memory:
        lines.append(
            f"memory: {memory['process_max_rss_bytes'] / 2**20:.0f} MiB max RSS "
            "(process-wide, all workloads together)"
        )
    probes = {n: e["memory"] for n, e in report["workloads"].items() if "memory" in e}
    if probes:
        lines += memory_table(probes)
    lines.append(f"note: {report['note']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-bench",
        description="Time an epoch of distillation against plain training, in one process.",
    )
    # Medians of 5 epochs moved the ratios by ±0.15 between runs here; of 30, by about ±0.03.
    parser.add_argument(
        "--epochs", type=int, default=None, help="measured epochs (default 20; 2 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="discarded epochs (default 2; 1 with --lm)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--teachers", default="cnn,gru,mlp", help="comma-separated teachers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=5000, help=argparse.SUPPRESS)
    parser.add_argument("--limit-batches", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="write the results there")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure each workload's memory alone, in a fresh process (a few s each)",
    )
    parser.add_argument(
        "--fast-paths",
        action="store_true",
        help="instead, time one ensemble forward under each teacher fast path",
    )
    parser.add_argument(
        "--compile", action="store_true", help="with --fast-paths: also time torch.compile"
    )
    parser.add_argument(
        "--sync-costs",
        action="store_true",
        help="instead, time the per-step checks that read a value back from the device",
    )
    parser.add_argument(
        "--profile",
        metavar="WORKLOAD",
        default=None,
        help=f"instead, profile a few training steps of one workload ({', '.join(LIGHTNING_WORKLOADS)})",
    )
    parser.add_argument(
        "--lm",
        action="store_true",
        help="instead, tokens/s of LM distillation workloads against plain LM training",
    )
    parser.add_argument(
        "--lm-cache",
        action="store_true",
        help="instead, build the sparse cache of experiment=lm at k = 8, 32, 128: bytes per "
        "token, build time and the KD gap against the live teachers (about an hour per k "
        "on 2 CPU cores; see --train-blocks)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --lm-cache: write kd_gap.json and kd_gap.md there (e.g. results/lm)",
    )
    parser.add_argument(
        "--train-blocks",
        type=int,
        default=None,
        help="with --lm-cache: cache only the first N training blocks and extrapolate the "
        "whole split's build time and size (default: the whole split)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="with --lm-cache: Hydra overrides of experiment=lm, e.g. data.max_bytes=1000000",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --lm: tiny models and 2 epochs unless --epochs (seconds); with --lm-cache: "
        "tiny data and models (a minute or two)",
    )
    parser.add_argument(
        "--trl",
        action="store_true",
        help="with --lm: also pair TRL's GKD trainer with the library (pip install '.[bench]')",
    )
    args = parser.parse_args(argv)
    # A stopped benchmark (SIGTERM) unwinds, so its temporary directories are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.lm_cache and (args.overrides or args.out is not None or args.train_blocks):
        parser.error("overrides, --out and --train-blocks go with --lm-cache")
    if args.lm_cache:
        report = cache_gap_report(args)
    elif args.lm:
        report = lm_report(args)
    elif args.profile is not None:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        teachers = [name for name in args.teachers.split(",") if name]
        report = profile_workload(
            args.profile, batch_size=args.batch_size, teachers=teachers, seed=args.seed
        )
        print(format_profile(report))
    elif args.fast_paths:
        report = fast_paths_report(args.batch_size, args.threads, args.compile, args.seed)
        print(report["title"] + "\n\n" + format_fast_paths(report["ms_per_forward"]))
    elif args.sync_costs:
        teachers = [name for name in args.teachers.split(",") if name]
        report = sync_costs_report(args.batch_size, args.threads, teachers, args.seed)
        print(report["title"] + "\n\n" + format_sync_costs(report["table"]))
    else:
        report = epochs_report(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def fast_paths_report(
    batch_size: int, threads: int | None, compile: bool, seed: int
) -> dict[str, Any]:
    """``kd-bench --fast-paths``: :func:`~kd_lightning.bench.fast_paths.time_fast_paths` with the
    machine it ran on."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = time_fast_paths(device, batch_size=batch_size, compile=compile, seed=seed)
    info = machine(torch.get_num_threads(), device)
    title = (
        f"ms per ensemble forward, batch {batch_size}, median of {ROUNDS} rounds of {CALLS} "
        f"calls; "
        f"{info.get('gpu', info['processor'])}, torch {info['torch']}, "
        f"{info['threads']} threads, device {device}"
    )
    return {"machine": info, "title": title, "ms_per_forward": table}


def sync_costs_report(
    batch_size: int, threads: int | None, teachers: Sequence[str], seed: int
) -> dict[str, Any]:
    """``kd-bench --sync-costs``: :func:`~kd_lightning.bench.sync_costs.time_sync_costs` with the
    machine it ran on."""
    if threads is not None:
        torch.set_num_threads(threads)
    make_teachers(teachers)  # unknown names fail here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = time_sync_costs(device, batch_size=batch_size, teachers=teachers, seed=seed)
    info = machine(torch.get_num_threads(), device)
    title = (
        f"per-step device reads against a training step: MNIST-1D, batch {batch_size}, MLP "
        f"student, teachers {'+'.join(teachers)}; median of {SYNC_ROUNDS} rounds of "
        f"{SYNC_STEPS} steps; "
        f"{info.get('gpu', info['processor'])}, torch {info['torch']}, "
        f"{info['threads']} threads, device {device}"
    )
    return {"machine": info, "title": title, "table": table}


def lm_report(args: argparse.Namespace) -> dict[str, Any]:
    """``kd-bench --lm``: :func:`~kd_lightning.bench.lm.run_lm_benchmark` with the machine it ran
    on, printed as a table; ``--quick`` for tiny models (and 2 epochs unless ``--epochs``)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    default_epochs = 2 if args.quick else 20
    report = run_lm_benchmark(
        QUICK if args.quick else LMSize(),
        epochs=default_epochs if args.epochs is None else args.epochs,
        warmup=1 if args.warmup is None else args.warmup,
        seed=args.seed,
        trl=args.trl,
    )
    device = torch.device(report["settings"]["device"])
    report = {"machine": machine(torch.get_num_threads(), device), **report}
    m = report["machine"]
    print(
        f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, "
        f"{m['threads']} threads\n{format_lm_report(report)}"
    )
    return report


def cache_gap_report(args: argparse.Namespace) -> dict[str, Any]:
    """``kd-bench --lm-cache``: :func:`~kd_lightning.bench.cache_gap.run_cache_gap` with the
    machine and commit it ran on, printed as markdown and, with ``--out``, written to
    ``kd_gap.json`` and ``kd_gap.md`` there; ``--quick`` for tiny data and models."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = [*QUICK_OVERRIDES, *args.overrides] if args.quick else list(args.overrides)
    report = run_cache_gap(
        overrides,
        student_steps=QUICK_STEPS if args.quick else STUDENT_STEPS,
        train_blocks=args.train_blocks,
        seed=args.seed,
    )
    device = torch.device(report["settings"]["device"])
    report = {"machine": machine(torch.get_num_threads(), device), "commit": git_commit(), **report}
    markdown = format_cache_gap(report)
    print(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kd_gap.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "kd_gap.md").write_text(markdown)
    return report


def epochs_report(args: argparse.Namespace) -> dict[str, Any]:
    """The default ``kd-bench``: epochs of every workload, printed as a table."""
    # Lightning's start-up banners say nothing about cost; keep the report readable.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    report = run_benchmark(
        epochs=20 if args.epochs is None else args.epochs,
        warmup=2 if args.warmup is None else args.warmup,
        batch_size=args.batch_size,
        teachers=[name for name in args.teachers.split(",") if name],
        seed=args.seed,
        threads=args.threads,
        num_samples=args.num_samples,
        limit_batches=args.limit_batches,
        memory_probe=args.memory,
    )
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
