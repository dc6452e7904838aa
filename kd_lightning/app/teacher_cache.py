"""Teachers from a config: load the user's checkpoint, or train once and cache by config."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from kd_lightning.callbacks.progress import progress_bar
from kd_lightning.modules import ClassifierModule
from kd_lightning.teachers import TeacherEnsemble, load_teacher

# Data settings that do not change the data itself, left out of a teacher's key.
IRRELEVANT_DATA_KEYS = ("data_dir", "num_workers")


def teacher_key(name: str, cfg: DictConfig) -> str:
    """A short hash of everything that decides a cached teacher's weights.

    The teacher's model and fit settings and the data (not where it is stored) enter the key;
    the student, fusion and method do not.
    """
    teacher = OmegaConf.to_container(cfg.teachers[name], resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(teacher, dict) and isinstance(data, dict)
    described = {
        "model": teacher["model"],
        "fit": teacher["fit"],
        "data": {key: value for key, value in data.items() if key not in IRRELEVANT_DATA_KEYS},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def cached_teacher_path(name: str, cfg: DictConfig) -> Path:
    """``<cache_dir>/teachers/<name>-<key>.safetensors``."""
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

    The file appears only once complete (written aside, then renamed), so an interrupted run
    never leaves a teacher that later runs would load.
    """
    teacher = cfg.teachers[name]
    L.seed_everything(teacher.fit.seed, workers=True, verbose=False)
    model: nn.Module = instantiate(teacher.model)
    module = ClassifierModule(
        model, optimizer=instantiate(teacher.fit.optimizer), scheduler=instantiate(cfg.scheduler)
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
        callbacks=progress_bar(cfg, f"teacher {name}"),
        default_root_dir=cfg.paths.output_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    path = cached_teacher_path(name, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "teacher": name,
        "config": json.dumps(OmegaConf.to_container(teacher, resolve=True)),
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(partial),
            metadata=metadata,
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def build_teachers(cfg: DictConfig, datamodule: LightningDataModule) -> TeacherEnsemble:
    """The config's teachers, trained first where missing, loaded safely, as a frozen ensemble."""
    for name in missing_teachers(cfg):
        train_teacher(name, cfg, datamodule)
    models: dict[str, nn.Module] = {}
    adapters: dict[str, Any] = {}
    for name, teacher in cfg.teachers.items():
        models[name] = load_teacher(
            instantiate(teacher.model), teacher_checkpoint(name, cfg), name=name
        )
        if teacher.get("output_adapter"):
            adapters[name] = teacher.output_adapter
    return TeacherEnsemble(models, adapters)
