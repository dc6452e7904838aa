"""Two DDP processes over gloo, each with half the batch, train the student a single process trains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from kd_lightning.data import SyntheticDataModule

from .app_helpers import run_command

ROOT = Path(__file__).parents[1]
GLOBAL_BATCH = 100
SHORT_RUN = [
    "data=synthetic",
    "data._target_=tests.test_ddp_equivalence.InOrderSynthetic",
    "teachers=[mlp,cnn]",
    "teacher_epochs=1",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "~callbacks.heatmap",
    "logger=none",
    "baseline=false",
]


class InOrderSynthetic(SyntheticDataModule):
    """Synthetic data read in DDP's order, also by a single process.

    Under DDP, Lightning gives the train loader of each of the two ranks a
    ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``: one permutation per epoch, of which
    rank r reads positions r, r + 2, r + 4, ... With a per-rank batch of B/2, the two ranks' i-th
    batches together are positions iB ... (i + 1)B - 1 of the permutation. A single process reads
    the same permutation through a one-replica ``DistributedSampler`` with the same seed, in
    batches of B: its i-th batch is the union of the ranks' i-th batches, and DDP's average of the
    two ranks' gradients of their mean losses is the gradient of the mean loss over those B samples.
    """

    def train_dataloader(self) -> DataLoader:
        if torch.distributed.is_initialized():  # Lightning adds its DistributedSampler
            return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)
        sampler = DistributedSampler(
            self.train_set, num_replicas=1, rank=0, seed=int(os.environ.get("PL_GLOBAL_SEED", 0))
        )
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The student's weights in the run's ``last.ckpt``, after checking it trained 2 × 10 steps."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 * 1000 // GLOBAL_BATCH
    state = checkpoint["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("student.")}


@pytest.mark.slow
def test_ddp_student_matches_one_process_with_the_global_batch(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = run_command(
        [
            "-m",
            "kd_lightning.cli.train",
            *SHORT_RUN,
            f"data.batch_size={GLOBAL_BATCH}",
            f"hydra.run.dir={tmp_path / 'single'}",
        ],
        tmp_path,
        env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # The batch size is part of a cached teacher's key: give DDP the teachers trained above.
    same_teachers = [
        f"teachers.{path.name.split('-')[0]}.checkpoint={path}"
        for path in (tmp_path / "cache" / "teachers").glob("*.safetensors")
    ]
    assert len(same_teachers) == 2
    ddp = run_command(
        [
            "-m",
            "kd_lightning.cli.train",
            *SHORT_RUN,
            *same_teachers,
            "accelerator=ddp_cpu",
            f"data.batch_size={GLOBAL_BATCH // 2}",
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ],
        tmp_path,
        env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = student_weights(tmp_path / "single"), student_weights(tmp_path / "ddp")
    assert one.keys() == two.keys() and one
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
