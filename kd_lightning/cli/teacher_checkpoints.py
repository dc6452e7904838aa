"""Teachers from a config: load the user's checkpoint, or train once and cache by config."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.batch import BatchAdapter
from kd_lightning.callbacks.nonfinite import training_callbacks
from kd_lightning.cli.config import show_progress
from kd_lightning.modules import ClassifierModule
from kd_lightning.modules.stages import save_weights
from kd_lightning.teachers import DrawnTeachers, TeacherEnsemble, load_teacher
from kd_lightning.teachers.runtime import RUNTIME_OPTIONS

# Data settings that do not change the data itself, left out of a teacher's key.
IRRELEVANT_DATA_KEYS = ("data_dir", "cache_dir", "num_workers", "route_ids")
# Label of samples a teacher with a class map does not cover: cross-entropy's default ignore_index.
IGNORE_INDEX = -100
# Teacher names become cache file names and module keys: no path separator, no dot.
TEACHER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# teacher_runtime keys that decide which teachers run at each step, not how the ensemble runs:
# sharding is DistillationModule's shard_teachers, draws are teacher_source's DrawnTeachers.
STEP_OPTIONS = ("shard_across_ranks", "draw_per_step")


def teacher_key(name: str, cfg: DictConfig) -> str:
    """A short hash of everything that decides a cached teacher's weights.

    The teacher's model and fit settings, its ``input_transform`` and ``class_map`` when set, and
    the data (not where it is stored) enter the key; the student, fusion and method do not.
    """
    teacher = OmegaConf.to_container(cfg.teachers[name], resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(teacher, dict) and isinstance(data, dict)
    described = {
        "model": teacher["model"],
        "fit": teacher["fit"],
        "data": {key: value for key, value in data.items() if key not in IRRELEVANT_DATA_KEYS},
    }
    # A teacher trained through an input transform or on mapped labels has other weights. Unset,
    # they stay out of the key, so caches of plain teachers keep their names.
    for option in ("input_transform", "class_map"):
        if teacher.get(option) is not None:
            described[option] = teacher[option]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), which names a teacher's weights exactly.

    Examples:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as handle:
        ...     _ = handle.write(b"weights")
        ...     handle.flush()
        ...     file_sha256(Path(handle.name))[:12]
        '9a129038d9a0'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_teacher_name(name: str) -> None:
    """Refuse a teacher name that could not be a plain file name inside the cache.

    Examples:
        >>> check_teacher_name("cnn_wide-2")
        >>> check_teacher_name("../../evil")
        Traceback (most recent call last):
        ...
        ValueError: teachers.../../evil: a teacher name may hold only letters, digits, '_' and '-', since it names the teacher's cache file
    """
    if not TEACHER_NAME.fullmatch(str(name)):
        raise ValueError(
            f"teachers.{name}: a teacher name may hold only letters, digits, '_' and '-', since it "
            "names the teacher's cache file"
        )


def cached_teacher_path(name: str, cfg: DictConfig) -> Path:
    """``<cache_dir>/teachers/<name>-<key>.safetensors``, refusing names that would leave it."""
    check_teacher_name(name)
    return Path(cfg.paths.cache_dir) / "teachers" / f"{name}-{teacher_key(name, cfg)}.safetensors"


def teacher_checkpoint(name: str, cfg: DictConfig) -> Path:
    """The file a teacher's weights come from: the user's ``checkpoint`` or the cache entry."""
    checkpoint = cfg.teachers[name].checkpoint
    return Path(checkpoint) if checkpoint else cached_teacher_path(name, cfg)


def missing_teachers(cfg: DictConfig) -> list[str]:
    """Teachers without weights yet, after refusing user checkpoints that do not exist."""
    missing = []
    for name in cfg.teachers:
        path = teacher_checkpoint(name, cfg)
        if cfg.teachers[name].checkpoint and not path.is_file():
            raise FileNotFoundError(f"teachers.{name}.checkpoint: no such file: {path}")
        if not path.is_file():
            missing.append(name)
    if missing and not cfg.train_if_missing:
        lines = [f"  teachers.{name}: {cached_teacher_path(name, cfg)}" for name in missing]
        choice = ",".join(missing)
        raise FileNotFoundError(
            "teachers have no checkpoint and train_if_missing=false:\n"
            + "\n".join(lines)
            + f"\ntrain them with `kd-teachers teachers=[{choice}]` (same overrides as this run), "
            "or point teachers.<name>.checkpoint at your own files"
        )
    return missing


def train_teacher(name: str, cfg: DictConfig, datamodule: LightningDataModule) -> Path:
    """Train teacher ``name`` with plain cross-entropy and cache it; returns the cache file.

    A teacher with an ``input_transform`` is trained on transformed inputs, and one with a
    ``class_map`` on labels moved into its own classes (samples of classes it does not cover are
    left out of its loss), so that it later fits the ensemble that applies both. A step whose
    loss is NaN or inf stops the training naming the teacher, or with ``on_nonfinite=skip`` is
    skipped (:func:`~kd_lightning.callbacks.nonfinite.training_callbacks`).
    The file appears only once complete (written aside, then renamed), so an interrupted run
    never leaves a teacher that later runs would load; a write that fails (a full disk) is an
    ``OSError`` naming the teacher, ``paths.cache_dir`` and the file.
    """
    teacher = cfg.teachers[name]
    L.seed_everything(teacher.fit.seed, workers=True, verbose=False)
    model: nn.Module = instantiate(teacher.model)
    transform = input_transform(teacher)
    class_map = teacher_class_map(teacher)
    module = ClassifierModule(
        model if transform is None else _Transformed(transform, model),
        optimizer=instantiate(teacher.fit.optimizer),
        scheduler=instantiate(cfg.scheduler),
        batch_adapter=None if class_map is None else _TeacherLabels(class_map),
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        max_epochs=teacher.fit.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
        callbacks=training_callbacks(
            f"teacher {name}", cfg.get("on_nonfinite", "stop"), show_progress(cfg)
        ),
        default_root_dir=cfg.paths.output_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    path = cached_teacher_path(name, cfg)
    metadata = {
        "teacher": name,
        "config": json.dumps(OmegaConf.to_container(teacher, resolve=True)),
    }
    try:
        save_weights(model.state_dict(), path, metadata)
    except OSError as error:
        error.args = (f"teachers.{name}: paths.cache_dir={cfg.paths.cache_dir}: {error}",)
        raise
    return path


def input_transform(teacher: DictConfig) -> Any:
    """The teacher's ``input_transform``, instantiated, or ``None``."""
    node = teacher.get("input_transform")
    return None if node is None else instantiate(node)


def teacher_class_map(teacher: DictConfig) -> list[int] | None:
    """The teacher's ``class_map`` as a plain list, or ``None``."""
    node = teacher.get("class_map")
    if node is None:
        return None
    if not OmegaConf.is_list(node):
        raise TypeError(f"class_map must be a list of student class indices, got {node!r}")
    return list(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]


def draws_per_step(cfg: DictConfig) -> int | None:
    """``teacher_runtime.draw_per_step``, checked: ``None`` or from 1 to the number of teachers.

    Examples:
        >>> cfg = OmegaConf.create({"teachers": {"a": {}, "b": {}}, "teacher_runtime": {"draw_per_step": 1}})
        >>> draws_per_step(cfg)
        1
        >>> draws_per_step(OmegaConf.merge(cfg, {"teacher_runtime": {"draw_per_step": 3}}))
        Traceback (most recent call last):
        ...
        ValueError: teacher_runtime.draw_per_step=3: must be null or an integer from 1 to the number of teachers (2)
    """
    value = (cfg.get("teacher_runtime") or {}).get("draw_per_step")
    if value is None:
        return None
    count = len(cfg.get("teachers") or {})
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= count:
        raise ValueError(
            f"teacher_runtime.draw_per_step={value}: must be null or an integer from 1 to the "
            f"number of teachers ({count})"
        )
    return value


def teacher_source(cfg: DictConfig, ensemble: TeacherEnsemble) -> TeacherEnsemble | DrawnTeachers:
    """The teachers a training run reads each step: ``ensemble``, or with
    ``teacher_runtime.draw_per_step=N`` a :class:`~kd_lightning.teachers.DrawnTeachers` running
    N teachers drawn per training step (every teacher in validation and test)."""
    per_step = draws_per_step(cfg)
    return ensemble if per_step is None else DrawnTeachers(ensemble, per_step)


def build_teachers(cfg: DictConfig, datamodule: LightningDataModule) -> TeacherEnsemble:
    """The config's teachers, trained first where missing, loaded safely, as a frozen ensemble.

    Each teacher's ``input_transform`` and ``class_map`` go to the ensemble; when a teacher has a
    class map, the top-level ``num_classes`` (the student's class count) does too. The ensemble is
    built (and its settings checked, the per-step options of :func:`teacher_source` too) before any
    teacher is trained.
    """
    missing = missing_teachers(cfg)
    models: dict[str, nn.Module] = {}
    adapters: dict[str, Any] = {}
    transforms: dict[str, Any] = {}
    class_maps: dict[str, list[int]] = {}
    for name, teacher in cfg.teachers.items():
        models[name] = instantiate(teacher.model)
        if teacher.get("output_adapter"):
            adapters[name] = teacher.output_adapter
        transform = input_transform(teacher)
        if transform is not None:
            transforms[name] = transform
        class_map = teacher_class_map(teacher)
        if class_map is not None:
            width = teacher.model.get("num_classes")
            if width is not None and width != len(class_map):
                raise ValueError(
                    f"teachers.{name}.class_map has {len(class_map)} entries but "
                    f"teachers.{name}.model.num_classes={width}: give the student class of each "
                    f"of the teacher's classes"
                )
            class_maps[name] = class_map
    num_classes = cfg.get("num_classes") if class_maps else None
    runtime: dict[str, Any] = OmegaConf.to_container(cfg.get("teacher_runtime") or {})  # type: ignore[assignment]
    for option in STEP_OPTIONS:
        runtime.pop(option, None)
    unknown = sorted(set(runtime) - set(RUNTIME_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown teacher_runtime keys {unknown}; choose from "
            f"{[*RUNTIME_OPTIONS, *STEP_OPTIONS]}"
        )
    draws_per_step(cfg)  # checked before any teacher is trained
    ensemble = TeacherEnsemble(models, adapters, transforms, class_maps, num_classes, **runtime)
    for name in missing:
        train_teacher(name, cfg, datamodule)
    for name, model in models.items():
        load_teacher(model, teacher_checkpoint(name, cfg), name=name)
    return ensemble


class _Transformed(nn.Module):
    """``model(transform(x))``, to train a teacher on the inputs the ensemble will give it."""

    def __init__(self, transform: Any, model: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.model = model
        if isinstance(transform, nn.Module):
            transform.requires_grad_(False)

    def train(self, mode: bool = True) -> _Transformed:
        super().train(mode)
        if isinstance(self.transform, nn.Module):
            self.transform.eval()  # a fixed preprocessing step, as in the ensemble
        return self

    def forward(self, inputs: Any) -> Any:
        with torch.no_grad():
            inputs = self.transform(inputs)
        return self.model(inputs)


class _TeacherLabels(BatchAdapter):
    """Student labels → the teacher's class indices through its class map.

    Labels of classes the teacher does not cover become ``-100``, which cross-entropy ignores.
    """

    def __init__(self, class_map: list[int]) -> None:
        super().__init__()
        lookup = torch.full((max(class_map) + 1,), IGNORE_INDEX, dtype=torch.long)
        lookup[torch.tensor(class_map)] = torch.arange(len(class_map))
        self.lookup = lookup

    def __call__(self, batch: Any) -> tuple[Any, Any]:
        inputs, labels = super().__call__(batch)
        lookup = self.lookup.to(labels.device)
        covered = (labels >= 0) & (labels < len(lookup))
        mapped = lookup[labels.clamp(0, len(lookup) - 1)]
        return inputs, torch.where(covered, mapped, IGNORE_INDEX)
