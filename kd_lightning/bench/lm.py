"""``kd-bench --lm``: tokens per second of LM distillation against plain LM training, side by side.

Eight workloads train the same :class:`~kd_lightning.models.CausalLM` student on the same
packed blocks of the standard library's sources (:class:`~kd_lightning.data.TextDataModule`, byte
tokens), each through a Lightning ``Trainer``:

* ``lm_plain``: next-token cross-entropy alone (:class:`~kd_lightning.ClassifierModule`);
* ``lm_live``: :class:`~kd_lightning.DistillationModule` with K = 3 live teacher LMs;
* ``lm_live_handwritten``: the same as a user writes it in their own ``LightningModule``
  (:class:`HandwrittenLMModule`);
* ``lm_cached_k32`` and ``lm_cached_k128``: ``DistillationModule`` reading the teachers' top 32
  or 128 logits per token from a sequence cache built before timing
  (:func:`~kd_lightning.teachers.cache.sequence_build.build_sequence_cache`), the KD term
  computed from them unexpanded (:mod:`kd_lightning.losses.sparse`);
* ``lm_cached_k32_tail``: the k = 32 cache with each teacher's tail spread like the student's
  (``DistillationLoss(topk_tail="student")``);
* ``lm_unchunked`` and ``lm_chunked``: the k = 32 cache read as dense logits
  (``SequenceCachedTeachers(sparse=False)``) with :class:`~kd_lightning.DistillationLoss` or
  with :class:`~kd_lightning.losses.ChunkedDistillationLoss`, timed as a pair of their own.

An epoch is ``steps`` training steps; the workloads take turns one epoch at a time, as in
:mod:`kd_lightning.bench.run`, and a ratio is the median over rounds of the paired epoch times,
with its quartiles. ``trl=True`` adds ``lm_trl`` and ``lm_one_teacher`` (:mod:`kd_lightning.bench.trl_gkd`).
The teachers are randomly initialised: a step's cost does not depend on their weights.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from kd_lightning.bench.workloads import (
    ALPHA,
    LR,
    TEMPERATURE,
    Workload,
    _trainer,
    cache_dir,
    handwritten_kd,
)
from kd_lightning.data import TextDataModule
from kd_lightning.data.indexed import indexed_loader
from kd_lightning.losses import ChunkedDistillationLoss
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.models.causal_lm import CausalLM
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.sequence_build import build_sequence_cache
from kd_lightning.teachers.cache.sequence_store import SequenceCachedTeachers

LM_WORKLOADS = (
    "lm_plain",
    "lm_live",
    "lm_live_handwritten",
    "lm_cached_k32",
    "lm_cached_k128",
    "lm_cached_k32_tail",
    "lm_unchunked",
    "lm_chunked",
)
LM_TARGETS = {
    "lm_cached_k32/lm_plain": 1.10,
    "lm_cached_k128/lm_plain": 1.10,
    "lm_cached_k32_tail/lm_cached_k32": 1.10,
    "lm_live/lm_live_handwritten": 1.03,
    "lm_chunked/lm_unchunked": 1.15,
}
"""The tracked ratios of epoch times and their targets (at most)."""
NUM_TEACHERS = 3


@dataclass(frozen=True)
class LMSize:
    """The models and data of a run: student and teacher widths, blocks, and steps per epoch.

    Examples:
        >>> LMSize().tokens_per_epoch
        8192
    """

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    teacher_d_model: int = 96
    teacher_layers: int = 2
    block_size: int = 128
    batch_size: int = 8
    steps: int = 8

    @property
    def tokens_per_epoch(self) -> int:
        return self.steps * self.batch_size * self.block_size


QUICK = LMSize(d_model=16, n_layers=1, n_heads=2, teacher_d_model=16, teacher_layers=1,
               block_size=32, batch_size=4, steps=2)  # fmt: skip
"""Seconds in all: for tests of the plumbing."""


def text_data(size: LMSize) -> TextDataModule:
    """Byte-level stdlib blocks, just enough for ``size.steps`` batches, cached under
    :func:`~kd_lightning.bench.workloads.cache_dir`."""
    datamodule = TextDataModule(
        tokenizer="byte",
        block_size=size.block_size,
        batch_size=size.batch_size,
        val_fraction=0.0,
        test_fraction=0.0,
        max_bytes=size.tokens_per_epoch + 4 * size.block_size,
        cache_dir=cache_dir() / "text",
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def student_lm(size: LMSize, vocab_size: int, seed: int) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(vocab_size, size.d_model, size.n_layers, size.n_heads, size.block_size)


def teacher_lms(size: LMSize, vocab_size: int, seed: int) -> dict[str, nn.Module]:
    """K = 3 teacher LMs, each from its own seed."""
    teachers: dict[str, nn.Module] = {}
    for k in range(NUM_TEACHERS):
        torch.manual_seed(seed + 1 + k)
        teachers[f"teacher{k}"] = CausalLM(
            vocab_size, size.teacher_d_model, size.teacher_layers, size.n_heads, size.block_size
        )
    return teachers


class HandwrittenLMModule(L.LightningModule):
    """Per-token KD as a user writes it in their own ``LightningModule`` without this library: the
    teachers in a list under ``torch.no_grad``, the objective of
    :func:`~kd_lightning.bench.workloads.handwritten_kd` over every position, the loss, CE, KD and
    accuracy logged with ``self.log(..., on_epoch=True)``, Adam.

    Examples:
        >>> lm = lambda: CausalLM(vocab_size=11, d_model=8, n_layers=1, n_heads=2, max_len=4)
        >>> module = HandwrittenLMModule(lm(), [lm(), lm()])
        >>> len(module.teachers), any(p.requires_grad for p in module.teachers.parameters())
        (2, False)
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.teachers.eval().requires_grad_(False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, labels = batch["input_ids"], batch["labels"]
        logits = self.student(tokens)
        with torch.no_grad():
            teacher_logits = torch.stack([teacher(tokens) for teacher in self.teachers])
        loss, hard, soft = handwritten_kd(
            logits.flatten(0, 1), teacher_logits.flatten(1, 2), labels.flatten()
        )
        accuracy = (logits.argmax(-1) == labels).float().mean()
        for name, value in (("loss", loss), ("ce", hard), ("kd", soft), ("acc", accuracy)):
            self.log(f"train/{name}", value, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.student.parameters(), lr=LR)


def sequence_cache(
    size: LMSize, datamodule: TextDataModule, top_k: int, seed: int, device: torch.device
) -> SequenceCachedTeachers:
    """The teachers' top-``top_k`` sequence cache over the training blocks (built on first use)."""
    teachers = TeacherEnsemble(teacher_lms(size, datamodule.vocab_size, seed)).to(device)
    return build_sequence_cache(
        teachers,
        {"train": datamodule.train_dataloader()},
        cache_dir() / "outputs",
        top_k=top_k,
        tokenizer=datamodule.tokenizer,
        vocab_size=datamodule.vocab_size,
        batch_size=size.batch_size,
        device=device,
        progress=False,
    )


def lm_workload(
    name: str, size: LMSize, datamodule: TextDataModule, seed: int, device: torch.device
) -> tuple[L.LightningModule, DataLoader]:
    """The LightningModule of workload ``name`` (one of :data:`LM_WORKLOADS`) and its loader."""
    vocab_size = datamodule.vocab_size
    student = student_lm(size, vocab_size, seed)
    adam = partial(torch.optim.Adam, lr=LR)
    loss = DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
    loader = datamodule.train_dataloader()
    if name == "lm_plain":
        return ClassifierModule(student, optimizer=adam), loader
    if name == "lm_live":
        teachers = TeacherEnsemble(teacher_lms(size, vocab_size, seed))
        return DistillationModule(student, teachers, loss, adam), loader
    if name == "lm_live_handwritten":
        models = list(teacher_lms(size, vocab_size, seed).values())
        return HandwrittenLMModule(student, models), loader
    if name.startswith("lm_cached") or name in ("lm_unchunked", "lm_chunked"):
        top_k = 128 if name == "lm_cached_k128" else 32
        if name == "lm_chunked":
            loss = ChunkedDistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
        if name == "lm_cached_k32_tail":
            loss = DistillationLoss(
                "mean_probs", alpha=ALPHA, temperature=TEMPERATURE, topk_tail="student"
            )
        cache = sequence_cache(size, datamodule, top_k, seed, device)
        if name in ("lm_unchunked", "lm_chunked"):  # the chunking of the dense KD term
            cache = SequenceCachedTeachers(cache.path, sparse=False)
        return DistillationModule(student, cache, loss, adam), indexed_loader(loader)
    raise ValueError(f"unknown LM workload {name!r}; choose from {list(LM_WORKLOADS)}")


def _thread_body(workload: Workload, train: Callable[[], None], threads: int) -> None:
    torch.set_num_threads(threads)  # per thread (OpenMP)
    try:
        workload.turns.wait_turn()
        train()
    except BaseException as error:  # reported by the scheduler
        workload.turns.error = error
    finally:
        workload.turns.end_turn()


def run_round_robin(
    trainers: dict[str, Callable[[Workload], Callable[[], None]]],
    total: int,
    device: torch.device,
) -> dict[str, Workload]:
    """Run each workload's ``total`` epochs in its own thread, one epoch at a time, round-robin.

    ``trainers[name](workload)`` builds the workload and returns the function that trains it,
    calling ``workload.epoch_start()`` and ``workload.epoch_end()`` around each epoch.
    """
    threads = torch.get_num_threads()
    runs = []
    for name, build in trainers.items():
        workload = Workload(name, device, total)
        thread = threading.Thread(
            target=_thread_body, args=(workload, build(workload), threads), daemon=True
        )
        thread.start()
        runs.append((workload, thread))
    try:
        for _ in range(total + 1):  # the last turn lets each workload finish alone
            for workload, thread in runs:
                workload.turns.run_turn(thread)
                if workload.turns.error is not None:
                    raise RuntimeError(f"workload {workload.name!r} failed") from (
                        workload.turns.error
                    )
    finally:
        for workload, thread in runs:
            workload.turns.aborted = True
            while thread.is_alive():
                workload.turns.go.set()
                thread.join(timeout=0.1)
    for workload, _ in runs:
        if len(workload.times) != total:
            raise RuntimeError(
                f"workload {workload.name!r} ran {len(workload.times)} epochs, expected {total}"
            )
    return {workload.name: workload for workload, _ in runs}


def paired_ratios(
    workloads: dict[str, dict[str, Any]], pairs: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """For each pair ``"a/b"`` of present workloads: the median of the round-by-round ratios of
    their epoch times, the quartiles, and the rounds themselves.

    Examples:
        >>> times = {"a": {"s_epochs": [2.0, 3.0, 4.0]}, "b": {"s_epochs": [1.0, 2.0, 2.0]}}
        >>> paired_ratios(times, ["a/b", "a/c"])["a/b"]["median"]
        2.0
    """
    ratios: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        a, b = pair.split("/")
        if a in workloads and b in workloads:
            rounds = [
                x / y
                for x, y in zip(workloads[a]["s_epochs"], workloads[b]["s_epochs"], strict=True)
            ]
            quartiles = (
                statistics.quantiles(rounds, n=4, method="inclusive")
                if len(rounds) > 1
                else [rounds[0]] * 3
            )
            ratios[pair] = {
                "median": statistics.median(rounds),
                "quartiles": [quartiles[0], quartiles[2]],
                "rounds": rounds,
            }
    return ratios


def run_lm_benchmark(
    size: LMSize = LMSize(),
    epochs: int = 20,
    warmup: int = 1,
    seed: int = 0,
    device: torch.device | None = None,
    workloads: Sequence[str] = LM_WORKLOADS,
    trl: bool = False,
) -> dict[str, Any]:
    """Time ``epochs`` epochs (after ``warmup``) of ``size.steps`` steps of each LM workload.

    Args:
        size: The models, blocks and steps per epoch.
        epochs: Measured epochs per workload.
        warmup: Epochs run first and discarded.
        seed: Seed of every workload's models.
        device: Where they train; CUDA if available by default.
        workloads: Which of :data:`LM_WORKLOADS` to run.
        trl: Also pair TRL's GKD trainer with the library's one-teacher path
            (:mod:`kd_lightning.bench.trl_gkd`; needs ``trl`` installed).

    Returns:
        ``{"settings", "workloads": {name: {"tokens_per_s", "s_epochs", "peak_memory_bytes"}},
        "ratios": {pair: {"median", "quartiles", "rounds", "target"}}}``, the target a string
        such as ``"<= 1.10"``.
    """
    if epochs < 1 or warmup < 0:
        raise ValueError(f"need epochs >= 1 and warmup >= 0, got {epochs} and {warmup}")
    unknown = [name for name in workloads if name not in LM_WORKLOADS]
    if unknown:
        raise ValueError(f"unknown LM workloads {unknown}; choose from {list(LM_WORKLOADS)}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodule = text_data(size)
    train_blocks = len(datamodule.train_set or ())
    if train_blocks < size.steps * size.batch_size:
        raise RuntimeError(
            f"{train_blocks} training blocks cannot fill {size.steps} batches of {size.batch_size}"
        )
    total = warmup + epochs

    def lightning(name: str, workload: Workload) -> Callable[[], None]:
        module, loader = lm_workload(name, size, datamodule, seed, device)
        trainer = _trainer(workload, size.steps)
        return lambda: trainer.fit(module, train_dataloaders=loader)

    trainers: dict[str, Callable[[Workload], Callable[[], None]]] = {
        name: partial(lightning, name) for name in workloads
    }
    pairs = list(LM_TARGETS)
    at_least: dict[str, float] = {}
    if trl:
        from kd_lightning.bench.trl_gkd import TRL_PAIR, trl_trainers

        trainers.update(trl_trainers(size, datamodule, seed, device))
        pairs.append(TRL_PAIR)
        at_least[TRL_PAIR] = 1.0
    timed = run_round_robin(trainers, total, device)

    results: dict[str, dict[str, Any]] = {}
    for name, workload in timed.items():
        seconds = workload.times[warmup:]
        results[name] = {
            "tokens_per_s": size.tokens_per_epoch / statistics.median(seconds),
            "s_epochs": seconds,
            "peak_memory_bytes": workload.peak_bytes if device.type == "cuda" else None,
        }
    ratios = paired_ratios(results, pairs)
    for pair, entry in ratios.items():
        entry["target"] = (
            f"<= {LM_TARGETS[pair]:.2f}" if pair in LM_TARGETS else f">= {at_least[pair]:.2f}"
        )
    return {
        "settings": {
            **asdict(size),
            "epochs": epochs,
            "warmup": warmup,
            "seed": seed,
            "device": str(device),
            "teachers": NUM_TEACHERS,
            "vocab_size": datamodule.vocab_size,
            "train_blocks": train_blocks,
            "tokens_per_epoch": size.tokens_per_epoch,
            "alpha": ALPHA,
            "temperature": TEMPERATURE,
        },
        "workloads": results,
        "ratios": ratios,
    }


def format_lm_report(report: dict[str, Any]) -> str:
    """The settings line, tokens/s per workload and the paired ratios against their targets."""
    s = report["settings"]
    lines = [
        f"stdlib text, byte tokens (V = {s['vocab_size']}), blocks of {s['block_size']}, batch "
        f"{s['batch_size']}; student CausalLM d{s['d_model']}×{s['n_layers']}, "
        f"{s['teachers']} teachers d{s['teacher_d_model']}×{s['teacher_layers']}; "
        f"{s['steps']} steps per epoch, median of {s['epochs']} epochs after {s['warmup']} "
        f"warm-up, round-robin, device {s['device']}",
    ]
    cuda = s["device"].startswith("cuda")
    header = f"{'workload':<22} {'tokens/s':>10}" + (f" {'peak MiB':>9}" if cuda else "")
    lines += [header, "-" * len(header)]
    for name, entry in report["workloads"].items():
        row = f"{name:<22} {entry['tokens_per_s']:>10.0f}"
        if cuda:
            row += f" {entry['peak_memory_bytes'] / 2**20:>9.1f}"
        lines.append(row)
    for pair, entry in report["ratios"].items():
        low, high = entry["quartiles"]
        lines.append(
            f"{pair}: {entry['median']:.3f}x (quartiles {low:.3f} to {high:.3f}, "
            f"target {entry['target']})"
        )
    return "\n".join(lines)


def scaled(size: LMSize, factor: int) -> LMSize:
    """``size`` with ``factor`` times the width of every model and the batch.

    Examples:
        >>> scaled(LMSize(), 4).d_model, scaled(LMSize(), 4).batch_size
        (256, 32)
    """
    return replace(
        size,
        d_model=size.d_model * factor,
        teacher_d_model=size.teacher_d_model * factor,
        batch_size=size.batch_size * factor,
    )
