"""AMTML-KD's learned instance gate: per-sample weights that train with the student."""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.fusion import LearnedGate, build_fusion
from kd_lightning.models.taps import FeatureTaps

from .app_helpers import compose_config
from .conftest import NUM_CLASSES, make_trainer, small_mlp


def test_weights_sum_to_one_per_sample_and_depend_on_the_input():
    gate = LearnedGate(num_teachers=3, feature_dim=5)
    with torch.no_grad():
        gate.gate.normal_()
    teachers = torch.randn(3, 6, 5)
    weights = gate(teachers, student_logits=torch.randn(6, 5)).weights
    assert weights.shape == (6, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(6))
    assert (weights >= 0).all()
    assert not torch.allclose(weights[0], weights[1])
    expected = torch.softmax(
        torch.einsum("bd,kd,d->bk", torch.ones(6, 5), gate.theta, gate.gate), -1
    )
    assert torch.allclose(gate(teachers, student_logits=torch.ones(6, 5)).weights, expected)


def test_gate_starts_near_uniform_and_gets_gradients():
    gate = build_fusion("learned_gate", num_teachers=2, feature_dim=4)
    student = torch.randn(8, 4, requires_grad=True)
    loss = DistillationLoss(gate, alpha=1.0)
    out = loss(student, torch.randn(2, 8, 4), torch.randint(0, 4, (8,)))
    assert torch.allclose(out.weights, torch.full((8, 2), 0.5), atol=0.05)
    out.loss.backward()
    assert gate.gate.grad is not None and gate.gate.grad.abs().sum() > 0
    assert gate.theta.grad is not None and gate.theta.grad.abs().sum() > 0
    assert {id(p) for p in loss.parameters()} == {id(gate.theta), id(gate.gate)}


def test_one_teacher_reduces_to_hinton_kd():
    student, teachers, labels = torch.randn(8, 5), torch.randn(1, 8, 5), torch.randint(0, 5, (8,))
    gated = DistillationLoss(LearnedGate(num_teachers=1, feature_dim=5), alpha=0.7)(
        student, teachers, labels
    )
    plain = DistillationLoss("mean_probs", alpha=0.7)(student, teachers, labels)
    assert torch.allclose(gated.weights, torch.ones(8, 1))
    assert torch.allclose(gated.loss, plain.loss)


def test_feature_dim_is_inferred_and_state_dicts_load_back():
    gate = LearnedGate(num_teachers=2)
    gate(torch.randn(2, 3, 7), student_logits=torch.randn(3, 7))
    assert gate.theta.shape == (2, 7)
    fresh = LearnedGate(num_teachers=2)
    fresh.load_state_dict(gate.state_dict())
    assert torch.equal(fresh.theta, gate.theta) and torch.equal(fresh.gate, gate.gate)


def test_gate_parameters_move_during_a_fit_and_are_checkpointed(tmp_path, teachers, datamodule):
    gate = LearnedGate(num_teachers=len(teachers))  # lazy: created by the dry run in setup
    module = DistillationModule(
        small_mlp(),
        teachers,
        DistillationLoss(gate, alpha=1.0),
        optimizer=partial(torch.optim.SGD, lr=1.0),
    )
    trainer = make_trainer(tmp_path, max_epochs=1)
    module.materialize(next(iter(_loader(datamodule))))
    assert gate.theta.shape == (len(teachers), NUM_CLASSES)
    before = {k: v.clone() for k, v in gate.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    for key, value in gate.state_dict().items():
        assert not torch.equal(value, before[key]), f"gate {key} did not train"
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(gate.theta), id(gate.gate)} <= optimized
    trainer.save_checkpoint(tmp_path / "gate.ckpt")
    state = torch.load(tmp_path / "gate.ckpt", weights_only=True)["state_dict"]
    assert {"loss.fusion.theta", "loss.fusion.gate"} <= set(state)


def test_lazy_gate_is_created_in_setup(tmp_path, teachers, datamodule):
    gate = LearnedGate(num_teachers=len(teachers))
    module = DistillationModule(small_mlp(), teachers, DistillationLoss(gate))
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(module, datamodule=datamodule)
    assert gate.theta.shape == (len(teachers), NUM_CLASSES)


def test_hydra_fusion_option_composes(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, ["experiment=smoke", "data=synthetic", "fusion=learned_gate"])
    rule = instantiate(cfg.fusion)
    assert isinstance(rule, LearnedGate)
    assert rule.num_teachers == len(cfg.teachers) and rule.student_layer == "hidden"
    student = instantiate(cfg.student)
    logits, features = _forward(student, rule, torch.randn(4, 40))
    rule(
        torch.randn(len(cfg.teachers), 4, cfg.num_classes),
        student_logits=logits,
        student_features=features,
    )
    assert rule.theta.shape == (len(cfg.teachers), student.hidden.branch[0].out_features)


def _forward(student: nn.Module, gate: LearnedGate, inputs: torch.Tensor):
    """The student's logits and the outputs of the gate's layers, tapped as the module does."""
    with FeatureTaps(student, gate.student_layers) as taps:
        logits = student(inputs)
    return logits, taps.features


def _feature_student() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


def test_beta_is_the_pooled_feature_map_of_the_named_layer():
    torch.manual_seed(0)
    student = _feature_student()
    gate = LearnedGate(num_teachers=2, student_layer="1")
    inputs = torch.randn(5, 1, 6)
    logits, tapped = _forward(student, gate, inputs)
    weights = gate(torch.randn(2, 5, 4), student_logits=logits, student_features=tapped).weights

    features = torch.relu(student[0](inputs)).detach().numpy()  # (B, 3, 4)
    beta = features.mean(axis=2)
    theta, w = gate.theta.detach().numpy(), gate.gate.detach().numpy()
    scores = np.stack([(beta * theta[k]) @ w for k in range(2)], axis=1)
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(weights.detach().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_features_are_detached_from_the_student():
    student = _feature_student()
    gate = LearnedGate(num_teachers=2, student_layer="1")
    logits, features = _forward(student, gate, torch.randn(5, 1, 6))
    beta = features["1"].detach().requires_grad_()  # the gate's input, cut from the student
    loss = DistillationLoss(gate, alpha=1.0)
    out = loss(
        logits, torch.randn(2, 5, 4), torch.randint(0, 4, (5,)), student_features={"1": beta}
    )
    [through_gate] = torch.autograd.grad(out.loss, beta, retain_graph=True, allow_unused=True)
    assert through_gate is None  # the student is not pushed to move its features
    out.loss.backward()
    assert gate.theta.grad is not None and gate.theta.grad.abs().sum() > 0


def test_missing_features_and_unknown_layers_are_refused(teachers):
    gate = LearnedGate(num_teachers=2, student_layer="1")
    with pytest.raises(ValueError, match=r"reads the student's \['1'\] layer outputs"):
        gate(torch.randn(2, 3, 4), student_logits=torch.randn(3, 4))
    unknown = LearnedGate(num_teachers=len(teachers), student_layer="penultimate")
    with pytest.raises(ValueError, match="penultimate"):
        DistillationModule(small_mlp(), teachers, DistillationLoss(unknown))


def test_the_module_taps_the_gate_layer_and_the_gate_survives_pickling(
    tmp_path, teachers, datamodule
):
    gate = LearnedGate(num_teachers=len(teachers), student_layer="0")
    module = DistillationModule(small_mlp(), teachers, DistillationLoss(gate, alpha=1.0))
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(module, datamodule=datamodule)
    hidden = module.student[0].out_features
    assert gate.theta.shape == (len(teachers), hidden)
    clone = pickle.loads(pickle.dumps(module))
    inputs = torch.randn(3, next(module.student.parameters()).shape[1])
    teacher_logits = torch.randn(len(teachers), 3, NUM_CLASSES)
    weights = [
        rule(teacher_logits, student_logits=logits, student_features=features).weights
        for rule, (logits, features) in (
            (gate, _forward(module.student, gate, inputs)),
            (clone.loss.fusion, _forward(clone.student, clone.loss.fusion, inputs)),
        )
    ]
    torch.testing.assert_close(weights[0], weights[1])


def _loader(datamodule):
    datamodule.setup("fit")
    return datamodule.train_dataloader()
