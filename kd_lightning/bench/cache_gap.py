"""``kd-bench --lm-cache``: what the sparse sequence cache of ``experiment=lm`` costs and how far
the KD term read from it is from the live teachers', at k = 8, 32 and 128.

On the data and the three teachers of ``experiment=lm`` (the Hydra config composed as ``kd-train``
composes it; teachers loaded from ``${paths.cache_dir}/teachers``, trained first where missing
and ``train_if_missing`` allows), each ``k`` gets:

* a sparse cache of the **training split** at ``cache_value_bits`` (8 by default), built by
  :func:`~kd_lightning.teachers.cache.sequence_build.build_sequence_cache` with the batch size
  ``kd-cache`` uses, and timed: the build time, the size on disk and the bytes per token per
  teacher (``train_blocks=N`` builds the first N blocks only and extrapolates the whole split's
  time and size: on a shared 2-core machine the whole split takes about an hour per ``k``);
* a cache of the validation blocks a run validates on (``trainer.limit_val_batches``), from which
  the KD term is computed and compared with the same term from the live teachers: the **KD gap**
  ``(KD_cache − KD_live) / KD_live`` of the config's loss (``mean_probs``, KL) at T = 1 (as
  ``experiment=lm`` trains) and T = 2, for an untrained student and for the same student trained
  briefly with cross-entropy.

The caches are built under a temporary directory, removed at the end: the timings are those of a
first build, never of a cache found complete.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from kd_lightning.cli.config import CONFIG_DIR
from kd_lightning.cli.teacher_checkpoints import build_teachers
from kd_lightning.data.text import TextDataModule
from kd_lightning.losses.distillation import DistillationLoss
from kd_lightning.modules import ClassifierModule
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.sequence_build import build_sequence_cache
from kd_lightning.teachers.cache.sequence_store import SequenceCachedTeachers

TOP_KS = (8, 32, 128)
TEMPERATURES = (1.0, 2.0)
STUDENT_STEPS = 200
"""Cross-entropy steps of the briefly trained student."""
QUICK_OVERRIDES = (
    "data.max_bytes=20000",
    "data.vocab_size=300",
    "data.block_size=32",
    "data.batch_size=8",
    "teachers.lm_wide.model.d_model=32",
    "teachers.lm_deep.model.d_model=32",
    "teachers.lm_deep.model.n_layers=1",
    "teachers.lm_gru.model.d_model=32",
    "student.d_model=16",
    "trainer.enable_progress_bar=false",
)
"""``--quick``: the stdlib slice and model widths of the tests (a minute or two on 2 CPU cores,
the teachers' training included)."""
QUICK_STEPS = 20


def lm_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The ``kd-train experiment=lm`` config with ``overrides``, runs writing to ``output_dir``.

    Examples:
        >>> cfg = lm_config(["data.block_size=64"], output_dir="/tmp/kd-gap")
        >>> cfg.data.block_size, list(cfg.teachers), cfg.method.loss.temperature
        (64, ['lm_wide', 'lm_deep', 'lm_gru'], 1.0)
    """
    GlobalHydra.instance().clear()
    extra = [] if output_dir is None else [f"paths.output_dir={output_dir}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["experiment=lm", *overrides, *extra])


def train_student(
    cfg: DictConfig, datamodule: TextDataModule, student: nn.Module, steps: int
) -> None:
    """Train ``student`` in place for ``steps`` steps of next-token cross-entropy with the
    config's optimizer, on the training split.

    Examples:
        >>> from omegaconf import OmegaConf
        >>> from kd_lightning.models import CausalLM
        >>> root = tempfile.TemporaryDirectory()
        >>> sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
        >>> cfg = OmegaConf.create({"optimizer": sgd, "paths": {"output_dir": root.name}})
        >>> dm = TextDataModule(tokenizer="byte", block_size=16, batch_size=4, max_bytes=4000,
        ...                     val_fraction=0, test_fraction=0, cache_dir=root.name)
        >>> lm = CausalLM(258, d_model=16, n_layers=1, n_heads=2, max_len=16)
        >>> before = [p.clone() for p in lm.parameters()]
        >>> train_student(cfg, dm, lm, steps=2)
        >>> any(not torch.equal(a, b) for a, b in zip(before, lm.parameters()))
        True
        >>> root.cleanup()
    """
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=cfg.paths.output_dir,
    )
    trainer.fit(
        ClassifierModule(student, optimizer=instantiate(cfg.optimizer)), datamodule=datamodule
    )
    student.eval()


def kd_terms(
    loss: DistillationLoss, students: dict[str, Tensor], teachers: Tensor, labels: Tensor
) -> dict[str, float]:
    """The KD term of each student's logits against ``teachers`` ``(K, B, L, V)``, summed over
    the tokens (so that batches add up).

    Examples:
        >>> loss = DistillationLoss("mean_probs", temperature=1.0)
        >>> logits = torch.zeros(2, 1, 3, 5)
        >>> kd_terms(loss, {"s": torch.zeros(1, 3, 5)}, logits, torch.zeros(1, 3, dtype=torch.long))
        {'s': 0.0}
    """
    return {
        name: loss(logits, teachers, labels).soft.item() * labels.numel()
        for name, logits in students.items()
    }


def measure_gaps(
    students: dict[str, nn.Module],
    teachers: TeacherEnsemble,
    caches: dict[int, SequenceCachedTeachers],
    datamodule: TextDataModule,
    losses: dict[str, DistillationLoss],
    blocks: int,
    progress: bool = True,
) -> dict[str, Any]:
    """The KD term of each student on the first ``blocks`` validation blocks under each of
    ``losses`` (e.g. ``{"T=1": ..., "T=2": ...}``), from the live ``teachers`` and from each cache
    (``{k: cache}``): ``{"live": {student: {loss: kd}}, "cached": {k: {student: {loss: kd}}},
    "tokens"}``, each KD term the mean over those blocks' tokens."""
    val = datamodule.val_set
    if val is None or not 0 < blocks <= len(val):
        raise ValueError(
            f"cannot measure a KD gap on {blocks} of the {len(val or ())} validation blocks "
            "(data.val_fraction, data.max_bytes, trainer.limit_val_batches)"
        )
    device = teachers.device
    students = {name: student.eval().to(device) for name, student in students.items()}
    live: dict[str, dict[str, float]] = {name: dict.fromkeys(losses, 0.0) for name in students}
    cached = {k: {name: dict.fromkeys(losses, 0.0) for name in students} for k in caches}
    tokens = 0
    size = datamodule.batch_size
    starts = range(0, blocks, size)
    for start in tqdm(starts, desc="KD gap (val blocks)", unit="batch", disable=not progress):
        rows = list(range(start, min(start + size, blocks)))
        inputs = torch.stack([val[row]["input_ids"] for row in rows]).to(device)
        labels = torch.stack([val[row]["labels"] for row in rows]).to(device)
        with torch.no_grad():
            exact = teachers(inputs)
            logits = {name: student(inputs) for name, student in students.items()}
            for key, loss in losses.items():
                for name, value in kd_terms(loss, logits, exact, labels).items():
                    live[name][key] += value
            for k, cache in caches.items():
                sparse = cache.logits("val", rows).to(device)
                for key, loss in losses.items():
                    for name, value in kd_terms(loss, logits, sparse, labels).items():
                        cached[k][name][key] += value
        tokens += labels.numel()
    for table in (live, *cached.values()):
        for terms in table.values():
            for key in terms:
                terms[key] /= tokens
    return {"live": live, "cached": cached, "tokens": tokens}


def validation_blocks(cfg: DictConfig, available: int, batch_size: int) -> int:
    """How many validation blocks a run of ``cfg`` validates on: ``trainer.limit_val_batches``
    batches (an integer), that fraction of them (a float), or all ``available``.

    Examples:
        >>> from omegaconf import OmegaConf
        >>> validation_blocks(OmegaConf.create({"trainer": {"limit_val_batches": 20}}), 767, 16)
        320
        >>> validation_blocks(OmegaConf.create({"trainer": {"limit_val_batches": 0.5}}), 767, 16)
        384
        >>> validation_blocks(OmegaConf.create({"trainer": {}}), 767, 16)
        767
    """
    limit = cfg.trainer.get("limit_val_batches")
    if limit is None:
        return available
    if isinstance(limit, float):
        return min(available, math.ceil(limit * math.ceil(available / batch_size)) * batch_size)
    return min(available, int(limit) * batch_size)


def disk_bytes(path: Path) -> int:
    """The bytes of every file below ``path``.

    Examples:
        >>> with tempfile.TemporaryDirectory() as root:
        ...     _ = (Path(root) / "a.npy").write_bytes(b"12345")
        ...     disk_bytes(Path(root))
        5
    """
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def run_cache_gap(
    overrides: Sequence[str] = (),
    top_ks: Sequence[int] = TOP_KS,
    temperatures: Sequence[float] = TEMPERATURES,
    student_steps: int = STUDENT_STEPS,
    train_blocks: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the ``experiment=lm`` sparse cache at each of ``top_ks`` and measure its cost and KD gap.

    Args:
        overrides: Hydra overrides on top of ``experiment=lm`` (e.g. ``data.max_bytes=1000000``).
        top_ks: The ``cache_top_k`` values, each at most the vocabulary.
        temperatures: The temperatures of the KD term.
        student_steps: Cross-entropy steps of the briefly trained student.
        train_blocks: Cache only the first this many training blocks, and extrapolate the whole
            split's build time and size from them; ``None`` caches the whole split.
        seed: Seed of the student's initialisation and training.
        progress: Show progress bars (cache builds, the validation pass).

    Returns:
        ``{"settings", "live_kd": {student: {"T=t": kd}}, "caches": [{"top_k",
        "bytes_per_token", "cached_blocks", "build_s", "tokens_per_s", "disk_bytes",
        "split_build_s", "split_disk_bytes", "kd": {...}, "kd_gap": {student: {"T=t": relative
        gap}}}]}``, one entry of ``caches`` per ``k``; ``split_*`` are for the whole training
        split (measured, or extrapolated from ``train_blocks``). The KD terms are over the
        validation blocks the config validates on (``trainer.limit_val_batches``).
    """
    if not top_ks:
        raise ValueError("top_ks is empty: give at least one cache_top_k")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kd-gap-") as workdir:
        cfg = lm_config(overrides, output_dir=Path(workdir) / "output")
        datamodule: TextDataModule = instantiate(cfg.data)
        if not isinstance(datamodule, TextDataModule):
            raise TypeError(f"data={cfg.data._target_}: the KD gap needs a TextDataModule")
        datamodule.prepare_data()
        datamodule.setup("fit")
        too_large = [k for k in top_ks if k > datamodule.vocab_size]
        if too_large:
            raise ValueError(
                f"top_ks {too_large} exceed the vocabulary (data.vocab_size={datamodule.vocab_size})"
            )
        split, val_set = datamodule.train_set, datamodule.val_set
        assert split is not None and val_set is not None  # set up above
        cached_blocks = len(split) if train_blocks is None else train_blocks
        if not 0 < cached_blocks <= len(split):
            raise ValueError(
                f"train_blocks={train_blocks}: the training split has {len(split)} blocks"
            )
        val_size = validation_blocks(cfg, len(val_set), datamodule.batch_size)
        teachers = build_teachers(cfg, datamodule)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teachers.to(device)
        L.seed_everything(seed, workers=True, verbose=False)
        untrained: nn.Module = instantiate(cfg.student)
        trained: nn.Module = instantiate(cfg.student)
        trained.load_state_dict(untrained.state_dict())
        train_student(cfg, datamodule, trained, student_steps)
        students = {"untrained": untrained, "trained": trained}

        value_bits = cfg.get("cache_value_bits", 8)
        layout = {
            "tokenizer": datamodule.tokenizer,
            "vocab_size": datamodule.vocab_size,
            "block_size": datamodule.block_size,
            "batch_size": datamodule.batch_size,
            "value_bits": value_bits,
            "device": device,
            "progress": progress,
        }
        entries: list[dict[str, Any]] = []
        caches = {}
        for k in top_ks:
            root = Path(workdir) / f"k{k}"
            start = time.perf_counter()
            train_cache = build_sequence_cache(
                teachers, {"train": Subset(split, range(cached_blocks))}, root, top_k=k, **layout
            )
            seconds = time.perf_counter() - start
            stored = disk_bytes(train_cache.path)
            scale = len(split) / cached_blocks
            entries.append(
                {
                    "top_k": k,
                    "bytes_per_token": train_cache.bytes_per_token,
                    "cached_blocks": cached_blocks,
                    "build_s": seconds,
                    "tokens_per_s": cached_blocks * datamodule.block_size / seconds,
                    "disk_bytes": stored,
                    "split_build_s": seconds * scale,
                    "split_disk_bytes": round(stored * scale),
                }
            )
            shutil.rmtree(train_cache.path)  # k = 128 of the whole split takes about 1 GB
            caches[k] = build_sequence_cache(
                teachers,
                {"val": Subset(val_set, range(val_size))},
                root,
                top_k=k,
                **layout,
            )
        losses = {f"T={t:g}": instantiate(cfg.method.loss, temperature=t) for t in temperatures}
        terms = measure_gaps(students, teachers, caches, datamodule, losses, val_size, progress)
    for entry in entries:
        kd = terms["cached"][entry["top_k"]]
        entry["kd"] = kd
        entry["kd_gap"] = {
            name: {key: (value - terms["live"][name][key]) / terms["live"][name][key]
                   for key, value in kd[name].items()}
            for name in kd
        }  # fmt: skip
    return {
        "settings": {
            "experiment": "lm",
            "overrides": list(overrides),
            "teachers": list(teachers.names),
            "fusion": str(cfg.fusion._target_).rsplit(".", 1)[-1],
            "temperatures": list(temperatures),
            "value_bits": value_bits,
            "vocab_size": datamodule.vocab_size,
            "block_size": datamodule.block_size,
            "batch_size": datamodule.batch_size,
            "train_blocks": len(split),
            "val_blocks": val_size,
            "val_tokens": terms["tokens"],
            "student_steps": student_steps,
            "seed": seed,
            "device": str(device),
            "load_average": [load_before, os.getloadavg()[0]],
        },
        "live_kd": terms["live"],
        "caches": entries,
    }


def format_cache_gap(report: dict[str, Any]) -> str:
    """The report as markdown: the machine and commit, the settings, one table row per ``k``."""
    s = report["settings"]
    m = report["machine"]
    temperatures = [f"T={t:g}" for t in s["temperatures"]]
    students = list(report["live_kd"])
    cached = report["caches"][0]["cached_blocks"]
    whole = cached == s["train_blocks"]
    split = "" if whole else " (extrapolated)"
    lines = [
        "# The sparse sequence cache of `experiment=lm`: cost and KD gap",
        "",
        f"Commit `{report['commit']}`; {m['platform']}, {m['cpu_count']} CPUs, torch "
        f"{m['torch']}, {m['threads']} threads, device {m.get('gpu', m['device'])}; 1-minute "
        f"load average {s['load_average'][0]:.1f} at the start, {s['load_average'][1]:.1f} at "
        "the end (`kd-bench --lm-cache`).",
        "",
        f"Teachers {', '.join(s['teachers'])} (`kd-teachers experiment=lm`); BPE V = "
        f"{s['vocab_size']}, blocks of {s['block_size']} tokens, {s['value_bits']} bits per "
        f"value, teachers run on batches of {s['batch_size']}. Built: "
        + (
            f"the training split's {s['train_blocks']} blocks"
            if whole
            else f"the first {cached} of the training split's {s['train_blocks']} blocks, the "
            "whole split's build time and size extrapolated from them"
        )
        + f". KD gap: (KD from the cache − KD from the live teachers) / KD live, KL to the "
        f"{s['fusion']} target, over the {s['val_blocks']} validation blocks `experiment=lm` "
        f"validates on ({s['val_tokens']:,} tokens), for an untrained student and one trained "
        f"{s['student_steps']} steps with cross-entropy.",
        "",
    ]
    header = [
        "k",
        "bytes/token/teacher",
        f"build of {cached} blocks (s)",
        "tokens/s",
        f"training split: build (min){split}",
        f"on disk (MiB){split}",
        *[f"gap {name} {t}" for name in students for t in temperatures],
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for entry in report["caches"]:
        cells = [
            str(entry["top_k"]),
            f"{entry['bytes_per_token']:.1f}",
            f"{entry['build_s']:.1f}",
            f"{entry['tokens_per_s']:,.0f}",
            f"{entry['split_build_s'] / 60:.1f}",
            f"{entry['split_disk_bytes'] / 2**20:.1f}",
            *[
                f"{100 * entry['kd_gap'][name][t]:+.2f} %"
                for name in students
                for t in temperatures
            ],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    live = "; ".join(
        f"{name} " + ", ".join(f"{t} {report['live_kd'][name][t]:.4f}" for t in temperatures)
        for name in students
    )
    lines += ["", f"KD term from the live teachers (nats per token): {live}."]
    if s["overrides"]:
        lines.append(f"Overrides: `{' '.join(s['overrides'])}`.")
    return "\n".join(lines) + "\n"
