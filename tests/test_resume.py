"""A run killed with SIGKILL and relaunched in the same directory ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from kd_lightning.callbacks import LossSchedule, RandomStateCheckpoint

from .conftest import make_trainer

# Everything that must come back after a kill: learnable fusion parameters (the AMTML gate), a
# cosine LR schedule, two LossSchedule callbacks, the agreement accumulators, a shuffled train
# loader and dropout in the student. 100 steps per epoch, so that the kill lands inside an epoch.
RESUMABLE_RUN = [
    "data=synthetic",
    "data.batch_size=10",
    "teachers=[mlp]",
    "teacher_epochs=1",
    "fusion=learned_gate",
    "callbacks=annealed",
    "~callbacks.heatmap",
    "+student.dropout=0.1",
    "trainer.max_epochs=3",
    "+trainer.limit_val_batches=3",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "baseline=false",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        **ONE_THREAD,
        "KD_LIGHTNING_CACHE": str(tmp_path / "cache"),
        "KD_LIGHTNING_LOGS": str(tmp_path / "logs"),
    }
    args = [
        sys.executable,
        "-m",
        "kd_lightning.cli.train",
        *RESUMABLE_RUN,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finished_run(tmp_path: Path, run_dir: Path) -> tuple[dict, dict]:
    """Launch to completion; return ``summary.json`` and the state saved in ``last.ckpt``."""
    process = launch(tmp_path, run_dir)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    reference_summary, reference = finished_run(tmp_path, tmp_path / "uninterrupted")

    killed_dir = tmp_path / "killed"
    process = launch(tmp_path, killed_dir)
    first_checkpoint = killed_dir / "checkpoints" / "last.ckpt"  # written after epoch000.ckpt
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    time.sleep(0.3)  # into the second epoch
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_dir / "summary.json").exists()
    interrupted = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert interrupted["epoch"] < 2  # killed with at least one epoch left

    resumed_summary, resumed = finished_run(tmp_path, killed_dir)

    assert resumed["global_step"] == reference["global_step"] == 3 * 100
    for key in ("test_accuracy", "agreement", "kl_to_student"):
        assert resumed_summary.get(key) == reference_summary.get(key), key
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    assert any(key.startswith("loss.fusion.") for key in reference["state_dict"])
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    for name in ("LossSchedule{'attribute': 'temperature'}", "LossSchedule{'attribute': 'alpha'}"):
        assert resumed["callbacks"][name] == reference["callbacks"][name]


def test_random_states_survive_a_weights_only_checkpoint(tmp_path):
    callback = RandomStateCheckpoint()
    torch.save({"callbacks": {"random": callback.state_dict()}}, tmp_path / "state.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = torch.load(tmp_path / "state.ckpt", weights_only=True)["callbacks"]["random"]
    callback.load_state_dict(state)
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


class _Loss(torch.nn.Module):
    temperature = 4.0


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.loss = _Loss()

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def test_step(self, batch, batch_idx):
        self.log("test/temperature", self.loss.temperature)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_loss_schedule_value_comes_back_when_only_testing_is_left(tmp_path):
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2
    )

    def fit(max_epochs: int, ckpt_path: str | None) -> tuple[L.Trainer, _Module]:
        module = _Module()
        schedule = LossSchedule("temperature", 8.0, 2.0, kind="linear")
        alpha = LossSchedule("alpha", 0.0, 1.0)
        assert schedule.state_key != alpha.state_key  # both kept in one checkpoint
        trainer = make_trainer(tmp_path, max_epochs=max_epochs, callbacks=[schedule])
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
        return trainer, module

    trainer, module = fit(2, None)
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    assert module.loss.temperature == 2.0  # the last of 4 steps: progress 3/3
    _, resumed = fit(2, str(tmp_path / "done.ckpt"))  # nothing left to train
    assert resumed.loss.temperature == 2.0
