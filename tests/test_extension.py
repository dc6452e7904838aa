"""A user's own fusion rule, teacher architecture and method, in their own package and config
folder, run through `kd-train` with `hydra.searchpath` and touch nothing in the library."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from .app_helpers import run_command

pytestmark = pytest.mark.slow

PACKAGE = {
    "my_kd/__init__.py": "",
    "my_kd/rules.py": '''
        import torch
        from kd_lightning.fusion import FusionContext, FusionRule


        class MostConfident(FusionRule, name="most_confident"):
            """All the weight on the teacher whose top probability is highest, per sample."""

            def weights(self, teacher_logits, context: FusionContext):
                top = teacher_logits.softmax(-1).amax(-1)  # (K, *batch)
                return torch.nn.functional.one_hot(top.argmax(0), teacher_logits.shape[0]).float()
        ''',
    "my_kd/models.py": """
        from torch import nn


        class TwoLayer(nn.Module):
            def __init__(self, in_features: int, num_classes: int, width: int = 32):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
                self.head = nn.Linear(width, num_classes)

            def forward(self, x):
                return self.head(self.body(x.flatten(1)))
        """,
    "my_kd/methods.py": '''
        import torch
        import torch.nn.functional as F
        from kd_lightning.modules.base import MethodModule


        class SoftTargetsOnly(MethodModule):
            """Distil from the teachers' mean softened probabilities alone, without labels."""

            def __init__(self, student, teachers, temperature: float = 2.0,
                         optimizer=torch.optim.Adam, scheduler=None):
                super().__init__(("loss", "acc"), optimizer, scheduler)
                if temperature <= 0:
                    raise ValueError(f"temperature must be > 0, got {temperature}")
                self.student, self.teachers, self.temperature = student, teachers, temperature

            @property
            def teacher_names(self):
                return list(self.teachers.names)

            def step(self, batch, stage):
                inputs, labels = self.batch_adapter(batch)
                logits = self.student(inputs)
                teachers = self.teachers.outputs(inputs, batch, stage)
                target = (teachers.logits / self.temperature).softmax(-1).mean(0)
                log_probs = F.log_softmax(logits / self.temperature, -1)
                loss = F.kl_div(log_probs, target, reduction="batchmean")
                accuracy = (logits.argmax(-1) == labels).float().mean()
                self.update_epoch_means(stage, [loss, accuracy], [len(labels), len(labels)])
                return {
                    "loss": loss,
                    "student_logits": logits.detach(),
                    "teacher_logits": teachers.logits,
                    "teacher_indices": torch.tensor(teachers.ran),
                    "labels": labels,
                }
        ''',
    "conf/method/soft_only.yaml": """
        # Labels unused: the student matches the teachers' mean softened probabilities.
        _target_: my_kd.methods.SoftTargetsOnly
        _partial_: true
        temperature: 2.0
        optimizer: ${optimizer}
        scheduler: ${scheduler}
        """,
    "conf/fusion/most_confident.yaml": """
        _target_: my_kd.rules.MostConfident
        """,
    "conf/teachers/two_layer.yaml": """
        # @package teachers.two_layer
        model:
          _target_: my_kd.models.TwoLayer
          in_features: 40
          num_classes: 10
          width: 64
        checkpoint: null
        output_adapter: null
        input_transform: null
        class_map: null
        fit:
          max_epochs: ${teacher_epochs}
          seed: 0
          optimizer: {_target_: torch.optim.Adam, _partial_: true, lr: 0.01}
        """,
}


def write_package(root: Path) -> None:
    for name, text in PACKAGE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def kd_train(tmp_path: Path, user: Path, *overrides: str) -> dict:
    """``kd-train`` with the user's package importable and their configs on the search path."""
    result = run_command(
        [
            "-m",
            "kd_lightning.cli.train",
            f"hydra.searchpath=[file://{user / 'conf'}]",
            *overrides,
            "experiment=smoke",
            "data=synthetic",
            "logger=none",
            "baseline=false",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        env_overrides={"PYTHONPATH": str(user)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_a_users_fusion_rule_and_teacher_run_through_kd_train(tmp_path):
    user = tmp_path / "user"
    write_package(user)
    summary = kd_train(tmp_path, user, "teachers=[mlp,two_layer]", "fusion=most_confident")
    assert summary["fusion"] == "most_confident"
    assert set(summary["test_accuracy"]["teachers"]) == {"mlp", "two_layer"}
    assert summary["test_accuracy"]["teachers"]["two_layer"] > 0.3  # it trained: 10 classes
    assert list((tmp_path / "cache").rglob("two_layer*"))


def test_a_users_method_runs_through_kd_train(tmp_path):
    user = tmp_path / "user"
    write_package(user)
    summary = kd_train(tmp_path, user, "teachers=[mlp,two_layer]", "method=soft_only")
    assert summary["method"] == "soft_only"
    assert summary["test_accuracy"]["student"] > 0.3  # learnt from soft targets alone
