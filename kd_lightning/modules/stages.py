"""Earlier stages of multi-stage methods: each trained once, its weights kept in the run's
``stages/`` directory, and skipped when a relaunch in the same run directory finds them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from safetensors.torch import save_file
from torch import Tensor, nn

from kd_lightning.callbacks.progress import progress_bar
from kd_lightning.teachers import load_teacher
from kd_lightning.teachers.loading import read_state_dict

log = logging.getLogger(__name__)

# Trainer settings of the main run that also shape a stage's run (e.g. experiment=smoke's limits).
SHARED_TRAINER_KEYS = ("accelerator", "precision", "limit_train_batches", "limit_val_batches")


def stage_path(stage_dir: Path, name: str) -> Path:
    """Where stage ``name`` keeps its weights: ``<stage_dir>/<name>.safetensors``."""
    return Path(stage_dir) / f"{name}.safetensors"


def save_weights(state: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a state dict as safetensors atomically: the file appears only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(
            {key: value.detach().cpu().contiguous() for key, value in state.items()},
            str(partial),
            metadata=dict(metadata),
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def stage_trainer(
    trainer_cfg: Mapping[str, Any],
    label: str,
    max_epochs: int,
    callbacks: list[Callback] | None = None,
) -> Trainer:
    """A quiet Trainer for one stage: no logger, no checkpoints, a progress bar named ``label``.

    ``trainer_cfg`` is the run's ``trainer`` config; its accelerator, precision, batch limits and
    ``enable_progress_bar`` carry over.
    """
    shared = {key: trainer_cfg[key] for key in SHARED_TRAINER_KEYS if key in trainer_cfg}
    return L.Trainer(
        **shared,
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_progress_bar=trainer_cfg.get("enable_progress_bar", True),
        callbacks=[
            *(callbacks or []),
            *progress_bar(label, trainer_cfg.get("enable_progress_bar", True)),
        ],
    )


def run_stage(
    name: str,
    model: nn.Module,
    make_module: Callable[[], LightningModule],
    datamodule: LightningDataModule,
    stage_dir: Path,
    trainer_cfg: Mapping[str, Any],
    max_epochs: int,
) -> bool:
    """Train ``model`` through ``make_module()`` for ``max_epochs``, or load it when done before.

    The weights go to :func:`stage_path` once training ends; a later call with the same
    ``stage_dir`` loads them into ``model`` and trains nothing. Returns whether it trained.
    """
    path = stage_path(stage_dir, name)
    if path.is_file():
        log.info("stage %s: finished earlier, loading %s", name, path)
        load_teacher(model, path, name=name)
        return False
    if max_epochs < 1:
        raise ValueError(f"stage {name}: needs at least one epoch, got {max_epochs}")
    stage_trainer(trainer_cfg, f"stage {name}", max_epochs).fit(
        make_module(), datamodule=datamodule
    )
    save_weights(model.state_dict(), path, {"stage": name, "epochs": str(max_epochs)})
    return True


class TrajectoryCheckpoints(Callback):
    """Keep ``model``'s weights at ``num_checkpoints`` evenly spaced optimizer steps, the last at
    the end of training, each as ``<stage_dir>/<name>-<i>.safetensors``.

    With the trainer's total steps ``N``, checkpoint ``i`` (0-based) is taken after step
    ``ceil((i + 1)·N / n)``; when ``n`` divides the epochs these are ends of epochs.

    Example:
        >>> TrajectoryCheckpoints.steps(total_steps=10, num_checkpoints=4)
        [3, 5, 8, 10]
    """

    def __init__(self, model: nn.Module, stage_dir: Path, name: str, num_checkpoints: int) -> None:
        self.model = model
        self.paths = trajectory_paths(stage_dir, name, num_checkpoints)
        self.name = name
        self.save_at: dict[int, Path] = {}

    @staticmethod
    def steps(total_steps: int, num_checkpoints: int) -> list[int]:
        """The optimizer steps after which the checkpoints are taken."""
        if num_checkpoints > total_steps:
            raise ValueError(
                f"cannot keep {num_checkpoints} checkpoints (method.num_checkpoints) of a training "
                f"of {total_steps} optimizer steps: lower it or train longer"
            )
        return [-(-(i + 1) * total_steps // num_checkpoints) for i in range(num_checkpoints)]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = self.steps(int(trainer.estimated_stepping_batches), len(self.paths))
        self.save_at = dict(zip(steps, self.paths, strict=True))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        path = self.save_at.pop(trainer.global_step, None)
        if path is not None:
            self._save(path, trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for path in self.save_at.values():  # a training shorter than estimated
            self._save(path, trainer.global_step)
        self.save_at = {}

    def _save(self, path: Path, step: int) -> None:
        save_weights(self.model.state_dict(), path, {"stage": self.name, "step": str(step)})


def trajectory_paths(stage_dir: Path, name: str, num_checkpoints: int) -> list[Path]:
    """The files of a trajectory stage: ``<stage_dir>/<name>-<i>.safetensors``, ``i < n``."""
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints must be positive, got {num_checkpoints}")
    return [stage_path(stage_dir, f"{name}-{index}") for index in range(num_checkpoints)]


def run_trajectory_stage(
    name: str,
    model: nn.Module,
    make_module: Callable[[], LightningModule],
    datamodule: LightningDataModule,
    stage_dir: Path,
    trainer_cfg: Mapping[str, Any],
    max_epochs: int,
    num_checkpoints: int,
) -> list[dict[str, Tensor]]:
    """Train ``model`` keeping ``num_checkpoints`` states along the way (see
    :class:`TrajectoryCheckpoints`); returns them, earliest first.

    When every file is there from an earlier launch they are read and nothing trains; otherwise the
    whole trajectory is trained again (the stage is the unit of resumption).
    """
    paths = trajectory_paths(stage_dir, name, num_checkpoints)
    if not all(path.is_file() for path in paths):
        if max_epochs < 1:
            raise ValueError(f"stage {name}: needs at least one epoch, got {max_epochs}")
        keeper = TrajectoryCheckpoints(model, stage_dir, name, num_checkpoints)
        stage_trainer(trainer_cfg, f"stage {name}", max_epochs, [keeper]).fit(
            make_module(), datamodule=datamodule
        )
    else:
        log.info("stage %s: finished earlier, loading %d checkpoints", name, num_checkpoints)
    return [read_state_dict(path) for path in paths]
