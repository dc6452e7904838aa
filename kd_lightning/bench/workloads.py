"""The workloads of ``kd-bench``: each one's models, its training, and the timing of its epochs.

A workload runs in a thread and waits for its turn at each epoch boundary (:class:`Turns`), so
that a scheduler can time the workloads round-robin; see :mod:`kd_lightning.bench.run`.
"""

from __future__ import annotations

import os
import threading
import time
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
    "lightning_handwritten",
    "cached_lightning_handwritten",
)
LR = 0.01  # the project's default optimizer: Adam, lr 0.01
ALPHA = 0.5  # the project's default method (conf/method/ensemble.yaml)
TEMPERATURE = 4.0
TEACHER_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "cnn": CNN1D,
    "gru": GRUClassifier,
    "mlp": partial(MLP, hidden=512, dropout=0.2),
}


def cache_dir() -> Path:
    """``$KD_LIGHTNING_CACHE``, or ``~/.cache/kd_lightning``."""
    return Path(os.environ.get("KD_LIGHTNING_CACHE", Path.home() / ".cache" / "kd_lightning"))


def training_data(batch_size: int, num_samples: int) -> MNIST1DDataModule:
    """The benchmark's MNIST-1D, cached under :func:`cache_dir`, set up for fitting."""
    datamodule = MNIST1DDataModule(
        data_dir=str(cache_dir() / "data"),
        num_samples=num_samples,
        val_size=min(500, num_samples // 10),
        batch_size=batch_size,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


class _Aborted(Exception):
    """Raised in a workload thread when the benchmark stops early."""


class Turns:
    """Hands one workload thread the turn at a time; the thread gives it back at each epoch end.

    Examples:
        >>> turns = Turns()
        >>> worker = threading.Thread(target=lambda: (turns.wait_turn(), turns.end_turn()))
        >>> worker.start()
        >>> turns.run_turn(worker)  # returns once the worker has ended its turn
        >>> worker.join()
    """

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
class Workload:
    """One workload's timed epochs: wall and thread CPU seconds, and the peak CUDA memory.

    Examples:
        >>> workload = Workload("plain", torch.device("cpu"), total_epochs=1)
        >>> workload.turns.go.set()  # the scheduler's next turn, granted in advance
        >>> workload.epoch_start()
        >>> workload.epoch_end()
        >>> len(workload.times), len(workload.cpu_times)
        (1, 1)
    """

    name: str
    device: torch.device
    total_epochs: int
    turns: Turns = field(default_factory=Turns)
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
    def __init__(self, workload: Workload) -> None:
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
    workload: Workload,
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


class HandwrittenKDModule(L.LightningModule):
    """KD as a user writes it in their own ``LightningModule`` without this library: the teachers
    in a list, run under ``torch.no_grad`` (or their logits read from a cache by the batch's sample
    indices), :func:`handwritten_kd` in plain torch ops, the loss, CE, KD and accuracy logged with
    ``self.log(..., on_step=False, on_epoch=True)``, Adam.

    Examples:
        >>> module = HandwrittenKDModule(nn.Linear(4, 3), [nn.Linear(4, 3), nn.Linear(4, 3)])
        >>> module.teacher_logits((torch.randn(2, 4), torch.tensor([0, 1]))).shape
        torch.Size([2, 2, 3])
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module] | CachedTeachers) -> None:
        super().__init__()
        self.student = student
        self.cache = teachers if isinstance(teachers, CachedTeachers) else None
        self.teachers = nn.ModuleList(teachers if not isinstance(teachers, CachedTeachers) else ())
        self.teachers.eval().requires_grad_(False)

    def teacher_logits(self, batch: Any) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.logits("train", batch[2]).to(self.device)
        with torch.no_grad():
            return torch.stack([teacher(batch[0]) for teacher in self.teachers])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch[0], batch[1]
        logits = self.student(inputs)
        loss, hard, soft = handwritten_kd(logits, self.teacher_logits(batch), labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        for name, value in (("loss", loss), ("ce", hard), ("kd", soft), ("acc", accuracy)):
            self.log(f"train/{name}", value, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=LR)


def _trainer(workload: Workload, limit: int | None) -> L.Trainer:
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


def make_teachers(names: Sequence[str]) -> dict[str, nn.Module]:
    """Randomly initialised teachers by name (see ``TEACHER_FACTORIES``); refuses unknown names."""
    unknown = [name for name in names if name not in TEACHER_FACTORIES]
    if unknown:
        raise ValueError(f"unknown teachers {unknown}; choose from {list(TEACHER_FACTORIES)}")
    return {name: TEACHER_FACTORIES[name]() for name in names}


def build_workload(
    name: str,
    workload: Workload,
    teachers: Sequence[str],
    loader: DataLoader,
    limit: int | None,
    seed: int,
) -> Callable[[], None]:
    """Build the models of workload ``name`` (seeded) and return the function that trains it."""
    torch.manual_seed(seed)
    student = MLP()
    if name == "plain_handwritten":
        return lambda: _handwritten_loop(workload, student, loader, limit)
    if name == "handwritten":
        models = list(make_teachers(teachers).values())
        return lambda: _handwritten_loop(workload, student, loader, limit, models)
    if name == "cached_handwritten":
        cache, indexed = _cache(teachers, loader), indexed_loader(loader)
        return lambda: _handwritten_loop(workload, student, indexed, limit, cache)
    module, loader = lightning_workload(name, student, teachers, loader)
    trainer = _trainer(workload, limit)
    return lambda: trainer.fit(module, train_dataloaders=loader)


LIGHTNING_WORKLOADS = (
    "plain",
    "live",
    "aekd",
    "cached",
    "lightning_handwritten",
    "cached_lightning_handwritten",
)


def lightning_workload(
    name: str, student: nn.Module, teachers: Sequence[str], loader: DataLoader
) -> tuple[L.LightningModule, DataLoader]:
    """The LightningModule of workload ``name`` (one of :data:`LIGHTNING_WORKLOADS`) around
    ``student``, and the loader it trains on (with sample indices for the cached ones)."""
    adam = partial(torch.optim.Adam, lr=LR)
    mean_probs = DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
    if name == "plain":
        return ClassifierModule(student, optimizer=adam), loader
    if name == "live":
        return DistillationModule(
            student, TeacherEnsemble(make_teachers(teachers)), mean_probs, adam
        ), loader
    if name == "aekd":
        loss = DistillationLoss(
            GradientSpaceWeights(), alpha=ALPHA, temperature=TEMPERATURE, aggregation="loss"
        )
        return DistillationModule(
            student, TeacherEnsemble(make_teachers(teachers)), loss, adam
        ), loader
    if name == "cached":
        return DistillationModule(
            student, _cache(teachers, loader), mean_probs, adam
        ), indexed_loader(loader)
    if name == "lightning_handwritten":
        return HandwrittenKDModule(student, list(make_teachers(teachers).values())), loader
    if name == "cached_lightning_handwritten":
        return HandwrittenKDModule(student, _cache(teachers, loader)), indexed_loader(loader)
    raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS)}")


def _cache(teachers: Sequence[str], loader: DataLoader) -> CachedTeachers:
    """The teacher-output cache of ``teachers`` over the loader's dataset (built on first use)."""
    return build_output_cache(
        TeacherEnsemble(make_teachers(teachers)),
        {"train": loader.dataset},
        cache_dir() / "outputs",
        batch_size=loader.batch_size or 1,
    )
