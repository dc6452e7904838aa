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
  ``cached_handwritten/plain_handwritten`` is the floor's ratio without Lightning or the module.

Each workload runs in its own thread, but only one at a time: a scheduler hands them the turn
round-robin, one epoch each, so slow drifts of the machine spread over all of them. Lightning
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
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kd_lightning.bench.fast_paths import CALLS, ROUNDS, format_fast_paths, time_fast_paths
from kd_lightning.bench.memory import probe_in_subprocess
from kd_lightning.data import MNIST1DDataModule
from kd_lightning.data.indexed import indexed_loader
from kd_lightning.fusion import GradientSpaceWeights
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.models import CNN1D, MLP, GRUClassifier
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.build import build_output_cache
from kd_lightning.teachers.cache.store import CachedTeachers

WORKLOADS = (
    "plain",
    "live",
    "handwritten",
    "aekd",
    "plain_handwritten",
    "cached",
    "cached_handwritten",
)
LR = 0.01  # the project's default optimizer: Adam, lr 0.01
ALPHA = 0.5  # the project's default method (conf/method/ensemble.yaml)
TEMPERATURE = 4.0
TEACHER_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "cnn": CNN1D,
    "gru": GRUClassifier,
    "mlp": partial(MLP, hidden=512, dropout=0.2),
}
NOTE = (
    "teachers are randomly initialised (an epoch's cost does not depend on their weights); "
    "times are training epochs only (no validation), from one run in one process"
)


def cache_dir() -> Path:
    """``$KD_LIGHTNING_CACHE``, or ``~/.cache/kd_lightning``."""
    return Path(os.environ.get("KD_LIGHTNING_CACHE", Path.home() / ".cache" / "kd_lightning"))


class _Aborted(Exception):
    """Raised in a workload thread when the benchmark stops early."""


class _Turns:
    """Hands one workload thread the turn at a time; the thread gives it back at each epoch end."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.aborted = False

    def wait_turn(self) -> None:
        self.go.wait()
        self.go.clear()
        if self.aborted:
            raise _Aborted

    def end_turn(self) -> None:
        self.done.set()

    def run_turn(self, thread: threading.Thread) -> None:
        """Called by the scheduler: let the thread run until it ends its turn (or dies)."""
        self.go.set()
        while not self.done.wait(timeout=0.5):
            if not thread.is_alive():
                break
        self.done.clear()


@dataclass
class _Workload:
    name: str
    device: torch.device
    total_epochs: int
    turns: _Turns = field(default_factory=_Turns)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    report: list[float] = field(default_factory=list)  # a hand-written loop's epoch means
    _start: float = 0.0
    _cpu_start: float = 0.0

    def epoch_start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        self._cpu_start = time.thread_time()

    def epoch_end(self) -> None:
        """Record the epoch, give the turn back, and wait for the next one (also after the last
        epoch: the scheduler's final turn lets the workload finish and tear down alone)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.thread_time() - self._cpu_start)
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        self.turns.end_turn()
        self.turns.wait_turn()


class _EpochTimer(L.Callback):
    def __init__(self, workload: _Workload) -> None:
        self.workload = workload

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.workload.epoch_start()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.workload.epoch_end()


def _batches(loader: DataLoader, limit: int | None) -> Iterator[Any]:
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            return
        yield batch


def handwritten_kd(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The workloads' objective in plain torch ops: ``(loss, CE, KD)``, the same values as
    ``DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)``."""
    target = torch.softmax(teacher_logits / TEMPERATURE, -1).mean(0)
    log_student = F.log_softmax(logits / TEMPERATURE, -1)
    soft = TEMPERATURE**2 * F.kl_div(log_student, target, reduction="batchmean")
    hard = F.cross_entropy(logits, labels)
    return (1.0 - ALPHA) * hard + ALPHA * soft, hard, soft


def _handwritten_loop(
    workload: _Workload,
    student: nn.Module,
    loader: DataLoader,
    limit: int | None,
    teachers: Sequence[nn.Module] | CachedTeachers | None = None,
) -> None:
    """A minimal training loop: Adam on cross-entropy, or with ``teachers`` on
    :func:`handwritten_kd`, the teachers in eval under ``no_grad`` (or their logits read from a
    cache by the batch's sample indices).

    Like the modules, it reports the epoch's mean loss (and CE and KD terms) and accuracy: summed on
    the device each step, read once at the end of the epoch.
    """
    cache = teachers if isinstance(teachers, CachedTeachers) else None
    models: Sequence[nn.Module] = () if isinstance(teachers, CachedTeachers) else teachers or ()
    device = workload.device
    student.to(device).train()
    for teacher in models:
        teacher.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    for _ in range(workload.total_epochs):
        workload.epoch_start()
        sums = torch.zeros(5, device=device)  # loss, CE, KD (each × batch size), correct, samples
        for batch in _batches(loader, limit):
            inputs, labels = batch[0].to(device), batch[1].to(device)
            logits = student(inputs)
            if teachers is None:
                loss = hard = F.cross_entropy(logits, labels)
                soft = torch.zeros((), device=device)
            else:
                if cache is not None:
                    teacher_logits = cache.logits("train", batch[2]).to(device)
                else:
                    with torch.no_grad():
                        teacher_logits = torch.stack([teacher(inputs) for teacher in models])
                loss, hard, soft = handwritten_kd(logits, teacher_logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums[:3] += torch.stack([loss.detach(), hard.detach(), soft.detach()]) * len(labels)
            sums[3] += (logits.detach().argmax(-1) == labels).sum()
            sums[4] += len(labels)
        workload.report = (sums[:4] / sums[4]).tolist()  # the one read per epoch
        workload.epoch_end()


def _trainer(workload: _Workload, limit: int | None) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if workload.device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=workload.total_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        limit_train_batches=limit if limit is not None else 1.0,
        callbacks=[_EpochTimer(workload)],
    )


def _teachers(names: Sequence[str]) -> dict[str, nn.Module]:
    unknown = [name for name in names if name not in TEACHER_FACTORIES]
    if unknown:
        raise ValueError(f"unknown teachers {unknown}; choose from {list(TEACHER_FACTORIES)}")
    return {name: TEACHER_FACTORIES[name]() for name in names}


def _build(
    name: str,
    workload: _Workload,
    teachers: Sequence[str],
    loader: DataLoader,
    limit: int | None,
    seed: int,
) -> Callable[[], None]:
    """Build the models of workload ``name`` (seeded) and return the function that trains it."""
    torch.manual_seed(seed)
    student = MLP()
    adam = partial(torch.optim.Adam, lr=LR)
    if name == "plain_handwritten":
        return lambda: _handwritten_loop(workload, student, loader, limit)
    if name == "handwritten":
        models = list(_teachers(teachers).values())
        return lambda: _handwritten_loop(workload, student, loader, limit, models)
    if name == "cached_handwritten":
        cache, indexed = _cache(teachers, loader), indexed_loader(loader)
        return lambda: _handwritten_loop(workload, student, indexed, limit, cache)
    module: L.LightningModule
    if name == "plain":
        module = ClassifierModule(student, optimizer=adam)
    elif name == "live":
        loss = DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
        module = DistillationModule(student, TeacherEnsemble(_teachers(teachers)), loss, adam)
    elif name == "aekd":
        loss = DistillationLoss(
            GradientSpaceWeights(), alpha=ALPHA, temperature=TEMPERATURE, aggregation="loss"
        )
        module = DistillationModule(student, TeacherEnsemble(_teachers(teachers)), loss, adam)
    elif name == "cached":
        loss = DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
        module = DistillationModule(student, _cache(teachers, loader), loss, adam)
        loader = indexed_loader(loader)
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS)}")
    trainer = _trainer(workload, limit)
    return lambda: trainer.fit(module, train_dataloaders=loader)


def _cache(teachers: Sequence[str], loader: DataLoader) -> CachedTeachers:
    """The teacher-output cache of ``teachers`` over the loader's dataset (built on first use)."""
    return build_output_cache(
        TeacherEnsemble(_teachers(teachers)),
        {"train": loader.dataset},
        cache_dir() / "outputs",
        batch_size=loader.batch_size or 1,
    )


def _thread_body(workload: _Workload, train: Callable[[], None], threads: int) -> None:
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
    _teachers(teachers)  # unknown names fail here, before any thread starts
    num_threads = torch.get_num_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    datamodule = MNIST1DDataModule(
        data_dir=str(cache_dir() / "data"),
        num_samples=num_samples,
        val_size=min(500, num_samples // 10),
        batch_size=batch_size,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")

    total = warmup + epochs
    runs = []
    for name in workloads:
        workload = _Workload(name, device, total)
        # Each workload gets its own loader over the same training set.
        train = _build(name, workload, teachers, datamodule.train_dataloader(), limit_batches, seed)
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
            "peak_memory_bytes": workload.peak_bytes if device.type == "cuda" else None,
        }
    plain = results["plain"]["ms_per_epoch"]
    for entry in results.values():
        entry["x_plain"] = entry["ms_per_epoch"] / plain

    def ratio(a: str, b: str, key: str = "ms_per_epoch") -> float | None:
        if a in results and b in results:
            return float(results[a][key] / results[b][key])
        return None

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
        "ratios": {
            "live/handwritten": ratio("live", "handwritten"),
            "aekd/live": ratio("aekd", "live"),
            "cached/plain": ratio("cached", "plain"),
            "cached_handwritten/plain_handwritten": ratio(
                "cached_handwritten", "plain_handwritten"
            ),
        },
        # The CPU time of each workload's own thread: all of its work with threads=1, and far
        # less sensitive than wall time to other processes sharing the machine.
        "cpu_ratios": {
            "live/handwritten": ratio("live", "handwritten", "cpu_ms_per_epoch"),
            "plain/plain_handwritten": ratio("plain", "plain_handwritten", "cpu_ms_per_epoch"),
        },
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
    header = f"{'workload':<18} {'ms/epoch':>9} {'x plain':>8} {'cpu ms':>8}" + (
        f" {'peak MiB':>9}" if cuda else ""
    )
    lines += [header, "-" * len(header)]
    for name, entry in report["workloads"].items():
        row = (
            f"{name:<18} {entry['ms_per_epoch']:>9.1f} {entry['x_plain']:>7.2f}x "
            f"{entry['cpu_ms_per_epoch']:>8.1f}"
        )
        if cuda:
            row += f" {entry['peak_memory_bytes'] / 2**20:>9.1f}"
        lines.append(row)
    for key, value in report["ratios"].items():
        if value is not None:
            lines.append(f"{key}: {value:.2f}x")
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
        lines += _memory_table(probes)
    lines.append(f"note: {report['note']}")
    return "\n".join(lines)


def _memory_table(probes: dict[str, dict[str, Any]]) -> list[str]:
    header = (
        f"{'workload':<18} {'peak MiB':>9} {'saved KiB/step':>15} {'student MiB':>12} "
        f"{'teachers MiB':>13}"
    )
    lines = [
        "memory, each workload alone for one epoch in a fresh process: peak growth over the "
        "built models (RSS, or CUDA allocated), autograd's saved tensors per step, weights",
        header,
        "-" * len(header),
    ]
    for name, probe in probes.items():
        peak = probe["peak_cuda_growth_bytes"] or probe["peak_rss_growth_bytes"]
        peak_text = "n/a" if peak is None else f"{peak / 2**20:.1f}"
        lines.append(
            f"{name:<18} {peak_text:>9} {probe['autograd_saved_bytes_per_step'] / 2**10:>15.1f} "
            f"{probe['student_weight_bytes'] / 2**20:>12.2f} "
            f"{probe['teacher_weight_bytes'] / 2**20:>13.2f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-bench",
        description="Time an epoch of distillation against plain training, in one process.",
    )
    # Medians of 5 epochs moved the ratios by ±0.15 between runs here; of 30, by about ±0.03.
    parser.add_argument("--epochs", type=int, default=20, help="measured epochs (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded epochs (default 2)")
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
    args = parser.parse_args(argv)
    if args.fast_paths:
        report = fast_paths_report(args.batch_size, args.threads, args.compile, args.seed)
        print(report["title"] + "\n\n" + format_fast_paths(report["ms_per_forward"]))
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


def epochs_report(args: argparse.Namespace) -> dict[str, Any]:
    """The default ``kd-bench``: epochs of every workload, printed as a table."""
    # Lightning's start-up banners say nothing about cost; keep the report readable.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    report = run_benchmark(
        epochs=args.epochs,
        warmup=args.warmup,
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
