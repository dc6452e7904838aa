"""Tf-KD: the virtual teacher's distribution and objective, and the self, virtual and reverse
variants through `train(cfg)`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from torch import nn

from kd_lightning.cli.train import build_module, train
from kd_lightning.cli.validation import validate_config
from kd_lightning.errors import ConfigError
from kd_lightning.functional import tfkd_virtual_loss, virtual_teacher_probs
from kd_lightning.models import CNN1D, MLP
from kd_lightning.modules import DistillationModule, VirtualTeacherModule

from .app_helpers import FAST, compose_config


def test_virtual_teacher_distribution_by_hand():
    probs = virtual_teacher_probs(torch.tensor([2, 0]), num_classes=10, correct_prob=0.99)
    assert probs.shape == (2, 10)
    assert probs[0, 2].item() == pytest.approx(0.99)
    assert probs[0, 0].item() == pytest.approx(0.01 / 9)  # (1 − a)/(C − 1) = 0.00111…
    assert probs[1, 0].item() == pytest.approx(0.99)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5])
def test_virtual_teacher_refuses_degenerate_probabilities(bad):
    with pytest.raises(ValueError, match="correct_prob"):
        virtual_teacher_probs(torch.tensor([0]), 3, bad)


def test_virtual_objective_is_the_papers_form_with_t_squared():
    """(1 − α)CE + α·T²·KL(p_d^τ ‖ q^τ), p_d^τ ∝ p_d^{1/T}, against NumPy."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2])
    a, alpha, T, C = 0.9, 0.3, 3.0, 5
    z, y = student.numpy(), labels.numpy()

    p_d = np.full((4, C), (1 - a) / (C - 1))
    p_d[np.arange(4), y] = a
    soft_target = p_d ** (1 / T) / (p_d ** (1 / T)).sum(-1, keepdims=True)
    log_q = z / T - np.log(np.exp(z / T).sum(-1, keepdims=True))
    kl = (soft_target * (np.log(soft_target) - log_q)).sum(-1).mean()
    ce = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(4), y].mean()
    expected = (1 - alpha) * ce + alpha * T**2 * kl

    got = tfkd_virtual_loss(student, labels, alpha, T, a)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_virtual_module_reports_the_distribution_as_one_teacher():
    module = VirtualTeacherModule(nn.Linear(4, 3), num_classes=3, correct_prob=0.8)
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    labels = torch.tensor([1, 2])
    out = module.training_step((torch.randn(2, 4), labels), 0)
    assert module.teacher_names == ["virtual"] and out["teacher_logits"].shape == (1, 2, 3)
    torch.testing.assert_close(
        out["teacher_logits"][0].exp(), torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    )
    assert out["loss"].requires_grad and not out["student_logits"].requires_grad


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["method.variant=mirror"], "method.variant: "),
        (
            [
                "method.variant=reverse",
                "teachers.cnn.input_transform={_target_:kd_lightning.teachers.ReverseSequence}",
            ],
            "method.reverse_network: ",
        ),
        (["method.variant=virtual", "method.num_classes=null"], "method.num_classes: "),
    ],
    ids=["variant", "reverse-without-plain-teacher", "virtual-without-classes"],
)
def test_bad_settings_are_refused_before_any_stage(tmp_path, overrides, key):
    cfg = compose_config(tmp_path, [*FAST, "method=tfkd", "teachers=[cnn]", *overrides])
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    assert [problem[: len(key)] for problem in caught.value.problems] == [key]
    assert not (tmp_path / "output" / "stages").exists()


VARIANTS = {
    # variant: (teacher names, class of the trained network, class of its teacher)
    "virtual": (["virtual"], MLP, None),
    "self": (["self"], MLP, MLP),
    "reverse": (["pretrained_student"], CNN1D, MLP),
}


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(variant, marks=[] if variant == "virtual" else [pytest.mark.slow])
        for variant in sorted(VARIANTS)
    ],
)
def test_tfkd_variant_runs_end_to_end(tmp_path, variant):
    names, trained, teacher = VARIANTS[variant]
    cfg = compose_config(
        tmp_path,
        [*FAST, "baseline=false", "method=tfkd", f"method.variant={variant}", "teachers=[cnn]"],
    )
    summary, objects = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert written == summary and summary["teachers"] == names
    module = objects["module"]
    assert isinstance(module.student, trained)
    assert objects["teachers"] is None  # no configured teacher was loaded or trained
    assert not (tmp_path / "cache" / "teachers").exists()
    if variant == "virtual":
        assert isinstance(module, VirtualTeacherModule)
        assert summary["test_accuracy"]["teachers"]["virtual"] == 1.0
        agreement = summary["agreement"]["student_vs"]["virtual"]
        assert agreement == pytest.approx(summary["test_accuracy"]["student"])
        return
    assert isinstance(module, DistillationModule)
    (frozen,) = module.teachers
    assert isinstance(frozen, teacher)
    stored = load_file(str(Path(cfg.paths.output_dir) / "stages" / "tfkd-student.safetensors"))
    for key, value in frozen.state_dict().items():
        torch.testing.assert_close(value, stored[key])  # the pretrained stage teaches, unchanged


def test_the_trained_network_of_reverse_tfkd_is_the_teacher_architecture(tmp_path):
    """The module's ``student`` is what the scratch baseline trains a fresh copy of."""
    for variant, trained in (("reverse", CNN1D), ("self", MLP), ("virtual", MLP)):
        cfg = compose_config(
            tmp_path / variant,
            [*FAST, "method=tfkd", f"method.variant={variant}", "teachers=[cnn]"],
        )
        module = build_module(cfg, instantiate(cfg.data))
        assert type(module.student) is trained, variant
