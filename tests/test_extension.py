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


def test_a_users_fusion_rule_and_teacher_run_through_kd_train(tmp_path):
    user = tmp_path / "user"
    write_package(user)
    result = run_command(
        [
            "-m",
            "kd_lightning.cli.train",
            f"hydra.searchpath=[file://{user / 'conf'}]",
            "teachers=[mlp,two_layer]",
            "fusion=most_confident",
            "experiment=smoke",
            "data=synthetic",
            "logger=none",
            "baseline=false",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
        env_overrides={"PYTHONPATH": str(user)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("logs/train/runs/*/summary.json")
    summary = json.loads(path.read_text())
    assert summary["fusion"] == "most_confident"
    assert set(summary["test_accuracy"]["teachers"]) == {"mlp", "two_layer"}
    assert summary["test_accuracy"]["teachers"]["two_layer"] > 0.3  # it trained: 10 classes
    assert list((tmp_path / "cache").rglob("two_layer*"))
