"""``kd-teachers``: train (once) and evaluate the teachers of a ``kd-train`` config.

Takes the same overrides as ``kd-train``, e.g. ``kd-teachers teachers=[cnn,gru] teacher_epochs=150``,
trains every teacher that has no checkpoint yet into the cache, and prints each teacher's test
accuracy and cross-entropy (and perplexity, for language models) and where its weights are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig

from kd_lightning.cli.config import CONFIG_DIR
from kd_lightning.cli.summary import per_token, write_json
from kd_lightning.cli.teacher_checkpoints import build_teachers, file_sha256, teacher_checkpoint
from kd_lightning.cli.validation import validate_config
from kd_lightning.modules import ClassifierModule
from kd_lightning.teachers import TeacherEnsemble


def command(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """``task`` as a ``kd-*`` command: Hydra composes the ``train`` config from the command line."""
    return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(task)


def data_and_teachers(cfg: DictConfig) -> tuple[LightningDataModule, TeacherEnsemble]:
    """The data module of ``cfg.data`` and the teachers of ``cfg``, trained first where missing."""
    datamodule: LightningDataModule = instantiate(cfg.data)
    return datamodule, build_teachers(cfg, datamodule)


def train_teachers(cfg: DictConfig) -> dict[str, dict[str, float | str]]:
    """Make sure every teacher of ``cfg`` has weights; return
    ``{name: {checkpoint, sha256, test_acc, test_loss}}`` (``sha256``: of the weights file;
    ``test_loss``: the cross-entropy on the labels, per token for a language model), also written
    to ``teachers.json`` in the run's output directory."""
    validate_config(cfg, needs_teachers=True)
    datamodule, teachers = data_and_teachers(cfg)
    report: dict[str, dict[str, float | str]] = {}
    for name in teachers.names:
        trainer = L.Trainer(
            accelerator=cfg.trainer.get("accelerator", "auto"),
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=cfg.paths.output_dir,
        )
        trainer.test(ClassifierModule(teachers.view(name)), datamodule=datamodule, verbose=False)
        checkpoint = teacher_checkpoint(name, cfg)
        report[name] = {
            "checkpoint": str(checkpoint),
            "sha256": file_sha256(checkpoint),
            "test_acc": float(trainer.callback_metrics["test/acc"]),
            "test_loss": float(trainer.callback_metrics["test/loss"]),
        }
    tokens = per_token(datamodule)
    width = max(len(name) for name in report)
    perplexity = "  test ppl" if tokens else ""
    print(f"\n{'teacher':<{width}}  test acc  test loss{perplexity}  checkpoint")
    for name, entry in report.items():
        loss = float(entry["test_loss"])
        cells = f"{100 * float(entry['test_acc']):6.1f} %  {loss:9.3f}"
        if tokens:
            cells += f"  {math.exp(loss):8.2f}"
        print(f"{name:<{width}}  {cells}  {entry['checkpoint']}")
    write_json(Path(cfg.paths.output_dir) / "teachers.json", report)
    return report


main = command(train_teachers)


if __name__ == "__main__":
    main()
