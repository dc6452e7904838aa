"""The student's checkpoints are written beside their target and renamed into place."""

from __future__ import annotations

import os

import pytest
import torch

from kd_lightning.callbacks import AtomicCheckpointIO
from kd_lightning.cli.train import train

from .app_helpers import FAST, compose_config


def test_a_checkpoint_is_renamed_into_place_from_its_own_directory(tmp_path, monkeypatch):
    renames = []
    rename = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or rename(a, b))
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)
    assert renames == [(target.with_name(".last.ckpt.partial"), target)]
    assert torch.load(target)["epoch"] == 1


def test_a_failed_write_keeps_the_last_whole_checkpoint_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"epoch": 1}, target)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.save_checkpoint({"epoch": 2}, target)
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(target)["epoch"] == 1


def test_kd_train_writes_the_students_checkpoints_with_it(tmp_path, monkeypatch):
    written = []
    save = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(
        AtomicCheckpointIO,
        "save_checkpoint",
        lambda self, checkpoint, path, **options: (
            written.append(path) or save(self, checkpoint, path, **options)
        ),
    )
    train(compose_config(tmp_path, [*FAST, "teachers=[mlp]", "baseline=false"]))
    names = {os.path.basename(path) for path in written}
    assert "last.ckpt" in names and any(name.startswith("epoch") for name in names)
