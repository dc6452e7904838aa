"""AMTML-KD's learned instance gate: per-sample weights that train with the student."""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.fusion import LearnedGate, build_fusion
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.modules.optim import JointOptimizer

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
    gate = build_fusion("learned_gate", num_teachers=2, feature_dim=4, init="near_uniform")
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
    gated = DistillationLoss(LearnedGate(num_teachers=1, feature_dim=5, l2=0.0), alpha=0.7)(
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


# The authors' training of the gate (FLHonker/AMTML-KD-code, LR_adaptive_*.ipynb): N(0, 1) start,
# L2 penalty (their 0.1 is 0.5 in this library's KD units), its own SGD at 0.1 (momentum 0.9)
# divided by 10 at epochs 40 and 50, trained during the first 80 epochs only.


def test_the_defaults_are_the_authors_training_of_the_gate(tmp_path):
    from hydra.utils import instantiate

    for gate in (
        LearnedGate(num_teachers=3),
        instantiate(compose_config(tmp_path, ["fusion=learned_gate"]).fusion),
    ):
        plan = gate.own_optimizer
        assert gate.l2 == 0.5 and gate.init == "normal" and gate.pooling == "mean"
        assert plan is not None and plan.milestones == (40, 50) and plan.epochs == 80
        optimizer = plan.build([nn.Parameter(torch.zeros(2))])
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["momentum"] == 0.9
        factors = [plan.learning_rate_factor(epoch) for epoch in (0, 39, 40, 49, 50, 79, 80)]
        assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.0])


def test_normal_init_draws_theta_and_w_from_a_standard_normal():
    torch.manual_seed(0)
    gate = LearnedGate(num_teachers=4, feature_dim=5000)
    for parameter in (gate.theta, gate.gate):
        assert abs(parameter.mean().item()) < 0.05 and abs(parameter.std().item() - 1) < 0.05
    near = LearnedGate(num_teachers=4, feature_dim=5000, init="near_uniform")
    assert abs(near.gate.std().item() * np.sqrt(5000) / 0.01 - 1) < 0.05
    assert abs(near.theta.std().item() - 1) < 0.05
    with pytest.raises(ValueError, match="init"):
        LearnedGate(num_teachers=2, init="zeros")  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_a_feature_map_is_pooled_over_its_positions(pooling):
    torch.manual_seed(0)
    student = _feature_student()
    gate = LearnedGate(num_teachers=2, student_layer="1", pooling=pooling)
    logits, tapped = _forward(student, gate, torch.randn(5, 1, 6))
    weights = gate(torch.randn(2, 5, 4), student_logits=logits, student_features=tapped).weights
    features = tapped["1"].detach().numpy()  # (B, 3, 4)
    beta = features.mean(axis=2) if pooling == "mean" else features.max(axis=2)
    theta, w = gate.theta.detach().numpy(), gate.gate.detach().numpy()
    scores = np.stack([(beta * theta[k]) @ w for k in range(2)], axis=1)
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(weights.detach().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(features.mean(axis=2), features.max(axis=2))


def test_window_options_need_the_gates_own_optimizer():
    with pytest.raises(ValueError, match="train_epochs need the rule's own optimizer"):
        LearnedGate(num_teachers=2, optimizer=None)  # the defaults keep a window
    with pytest.raises(ValueError, match="LearnedGate: train_epochs"):
        LearnedGate(num_teachers=2, train_epochs=0)
    with pytest.raises(ValueError, match="LearnedGate: lr_milestones"):
        LearnedGate(num_teachers=2, lr_milestones=[-1])
    plain = LearnedGate(num_teachers=2, optimizer=None, lr_milestones=[], train_epochs=None)
    assert plain.own_optimizer is None


class GateRecorder(Callback):
    """The gate's values and learning rate at the start and end of every training epoch."""

    def __init__(self) -> None:
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rates: list[float] = []

    def _snapshot(self, pl_module) -> tuple[torch.Tensor, torch.Tensor]:
        gate = pl_module.loss.fusion
        return gate.theta.detach().clone(), gate.gate.detach().clone()

    def on_train_epoch_start(self, trainer, pl_module):
        self.values.append(self._snapshot(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after the module's on_train_epoch_start, which sets the rate
            self.rates.append(trainer.optimizers[0].optimizers[1].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.values.append(self._snapshot(pl_module))


def test_the_gate_has_its_own_optimizer_and_freezes_after_its_window(
    tmp_path, teachers, datamodule
):
    gate = LearnedGate(
        num_teachers=len(teachers), student_layer="0", lr_milestones=[1], train_epochs=2
    )
    module = DistillationModule(
        small_mlp(), teachers, DistillationLoss(gate), optimizer=partial(torch.optim.Adam, lr=1e-2)
    )
    recorder = GateRecorder()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[recorder])
    trainer.fit(module, datamodule=datamodule)

    joint = trainer.optimizers[0]
    assert isinstance(joint, JointOptimizer)
    student_optimizer, gate_optimizer = joint.optimizers
    assert isinstance(student_optimizer, torch.optim.Adam)
    held = {id(p) for group in student_optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.student.parameters()}
    assert isinstance(gate_optimizer, torch.optim.SGD)
    assert [p for g in gate_optimizer.param_groups for p in g["params"]] == [gate.theta, gate.gate]
    assert gate_optimizer.param_groups[0]["momentum"] == 0.9
    # epoch 0 at 0.1, epoch 1 at 0.01 (milestone 1), epoch 2 after the window at 0
    assert recorder.rates == pytest.approx([0.1, 0.01, 0.0])
    (start0, end0), (start1, end1), (start2, end2) = zip(
        recorder.values[0::2], recorder.values[1::2], strict=True
    )
    for moved in (zip(start0, end0, strict=True), zip(start1, end1, strict=True)):
        assert all(not torch.equal(a, b) for a, b in moved)
    for frozen_before, frozen_after in zip(start2, end2, strict=True):
        torch.testing.assert_close(frozen_before, frozen_after, rtol=0, atol=0)
    # the student's cosine schedule does not touch the gate's rate
    assert gate_optimizer.param_groups[0]["initial_lr"] == 0.1


def test_the_gate_trained_with_the_students_optimizer_is_an_option(tmp_path, teachers, datamodule):
    gate = LearnedGate(
        num_teachers=len(teachers),
        l2=0.0,
        init="near_uniform",
        optimizer=None,
        lr_milestones=[],
        train_epochs=None,
    )
    module = DistillationModule(small_mlp(), teachers, DistillationLoss(gate))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=datamodule)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.Adam)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(gate.theta), id(gate.gate)} <= held


def test_a_run_with_the_gates_optimizer_resumes_its_momentum(tmp_path, teachers, datamodule):
    gate = LearnedGate(num_teachers=len(teachers), student_layer="0")
    module = DistillationModule(small_mlp(), teachers, DistillationLoss(gate))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]
    )
    trainer.fit(module, datamodule=datamodule)
    momentum = trainer.optimizers[0].optimizers[1].state[gate.theta]["momentum_buffer"].clone()

    resumed_gate = LearnedGate(num_teachers=len(teachers), student_layer="0")
    resumed = DistillationModule(small_mlp(), teachers, DistillationLoss(resumed_gate))
    again = make_trainer(tmp_path, max_epochs=1)
    again.fit(resumed, datamodule=datamodule, ckpt_path=checkpoint.last_model_path)
    joint = again.optimizers[0]
    torch.testing.assert_close(
        joint.optimizers[1].state[resumed_gate.theta]["momentum_buffer"], momentum
    )
    torch.testing.assert_close(resumed_gate.theta, gate.theta)
