"""AE-KD (GradientSpaceWeights) pinned to autograd and to an independent SciPy SLSQP solver."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.functional import kl_divergence
from kd_lightning.fusion import FUSION_RULES, GradientSpaceWeights, build_fusion
from kd_lightning.fusion.aekd import (
    kd_logit_gradients,
    min_norm_capped_simplex,
    project_capped_simplex,
)

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp

# --- independent references ---------------------------------------------------------------------


def slsqp_min_norm(gram: np.ndarray, cap: float) -> np.ndarray:
    """min λᵀGλ over {0 ≤ λ ≤ C, Σλ = 1} with SciPy's SLSQP, from the uniform point."""
    k = gram.shape[0]
    result = minimize(
        lambda lam: lam @ gram @ lam,
        np.full(k, 1.0 / k),
        jac=lambda lam: 2 * gram @ lam,
        method="SLSQP",
        bounds=[(0.0, cap)] * k,
        constraints=[
            {"type": "eq", "fun": lambda lam: lam.sum() - 1, "jac": lambda lam: np.ones(k)}
        ],
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    assert result.success, result.message
    return result.x


def autograd_gradients(teachers: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """g_k = ∂ kl_T(p_k, s) / ∂s by autograd on a detached leaf copy of the student's logits."""
    leaf = student.detach().clone().requires_grad_()
    grads = [
        torch.autograd.grad(kl_divergence(leaf, F.softmax(z / t, dim=-1), t), leaf)[0]
        for z in teachers
    ]
    return torch.stack(grads)


def random_instance(seed: int, k: int, batch: tuple[int, ...] = (16,), classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    teachers = 3 * torch.randn(k, *batch, classes, generator=generator)
    student = 2 * torch.randn(*batch, classes, generator=generator)
    return teachers, student


def random_gram(seed: int, k: int) -> np.ndarray:
    """A positive definite Gram matrix of K vectors of very different norms (so caps bind)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(k, 3 * k)) * rng.uniform(0.05, 2.0, size=(k, 1))
    return vectors @ vectors.T


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(8,), (3, 5)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_closed_form_gradients_equal_autograd(batch, temperature):
    teachers, student = random_instance(0, 3, batch)
    torch.testing.assert_close(
        kd_logit_gradients(teachers, student, temperature),
        autograd_gradients(teachers, student, temperature),
        rtol=1e-5,
        atol=1e-7,
    )


# --- the solver ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_projection_matches_slsqp(seed):
    rng = np.random.default_rng(seed)
    k, cap = 2 + seed, [0.6, 0.4, 0.3, 0.25][seed]
    values = rng.normal(size=k) * 2
    result = minimize(
        lambda x: ((x - values) ** 2).sum(),
        np.full(k, 1.0 / k),
        method="SLSQP",
        bounds=[(0.0, cap)] * k,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
        options={"ftol": 1e-15},
    )
    ours = project_capped_simplex(torch.from_numpy(values), cap).numpy()
    np.testing.assert_allclose(ours, result.x, atol=1e-6)


@pytest.mark.parametrize(
    "k,cap", [(k, cap) for k in (2, 3, 4, 5) for cap in (1.0, 0.6, 0.4) if k * cap >= 1]
)
def test_solver_matches_slsqp(k, cap):
    for seed in range(6):
        gram = random_gram(100 * k + seed, k)
        expected = slsqp_min_norm(gram, cap)
        ours = min_norm_capped_simplex(torch.from_numpy(gram), cap).numpy()
        assert ours @ gram @ ours == pytest.approx(expected @ gram @ expected, rel=1e-6, abs=1e-12)
        np.testing.assert_allclose(ours, expected, atol=1e-4)
        assert ours.min() >= 0 and ours.max() <= cap + 1e-12
        assert ours.sum() == pytest.approx(1.0, abs=1e-12)


def test_solver_cases_where_the_cap_binds():
    binding = 0
    for seed in range(30):
        gram = random_gram(seed, 2 + seed % 4)
        ours = min_norm_capped_simplex(torch.from_numpy(gram), 0.6).numpy()
        binding += ours.max() > 0.6 - 1e-9
        np.testing.assert_allclose(ours, slsqp_min_norm(gram, 0.6), atol=1e-4)
    assert binding >= 5  # the comparison above covers the cap


def test_solver_degenerate_gram_matrices():
    zero = min_norm_capped_simplex(torch.zeros(3, 3, dtype=torch.float64), 0.6)
    assert zero.sum().item() == pytest.approx(1.0) and zero.max().item() <= 0.6
    # Two identical teachers: the minimiser is not unique, its value is.
    vectors = np.random.default_rng(0).normal(size=(3, 6))
    vectors[2] = vectors[0]
    gram = vectors @ vectors.T
    ours = min_norm_capped_simplex(torch.from_numpy(gram), 0.6).numpy()
    expected = slsqp_min_norm(gram, 0.6)
    assert ours @ gram @ ours == pytest.approx(expected @ gram @ expected, rel=1e-6)
    # C·K = 1: the only feasible point is C everywhere.
    only = min_norm_capped_simplex(torch.from_numpy(gram[:2, :2]), 0.5)
    assert only.tolist() == pytest.approx([0.5, 0.5])


# --- the fusion rule ----------------------------------------------------------------------------


def gram_vectors(gradients: torch.Tensor, gram: str) -> np.ndarray:
    """The authors' code averages each teacher's gradient over the batch; the paper's equation
    takes it whole."""
    k = gradients.shape[0]
    per_teacher = gradients.double().numpy().reshape(k, -1, gradients.shape[-1])
    return per_teacher.mean(1) if gram == "batch_mean" else per_teacher.reshape(k, -1)


@pytest.mark.parametrize("gram", ["batch_mean", "flattened"])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_rule_matches_slsqp_on_autograd_gradients(k, gram):
    cap = 0.6 if k > 2 else 0.55
    for seed in range(3):
        teachers, student = random_instance(seed, k)
        rule = GradientSpaceWeights(max_weight=cap, gram=gram)
        fusion = rule(teachers, None, 4.0, student_logits=student)
        vectors = gram_vectors(autograd_gradients(teachers, student, 4.0), gram)
        gram_matrix = vectors @ vectors.T
        expected = slsqp_min_norm(gram_matrix / np.linalg.norm(gram_matrix, 2), cap)
        weights = fusion.weights
        assert weights.shape == (16, k) and weights.dtype == torch.float32
        assert not weights.requires_grad
        assert torch.equal(weights, weights[:1].expand_as(weights))
        assert (weights >= 0).all() and (weights <= cap + 1e-6).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(16))
        np.testing.assert_allclose(weights[0].double().numpy(), expected, atol=1e-4)
        mixed = (weights[0, :, None, None] * F.softmax(teachers / 4.0, dim=-1)).sum(0)
        torch.testing.assert_close(fusion.target, mixed)


def test_the_authors_gram_and_the_flattened_gram_differ():
    """Averaging over the batch first (the authors' code) can move the weights far from the
    flattened gradients' (the paper's equation); the default follows the code."""
    teachers, student = random_instance(4, 3, batch=(32,))
    weights = {
        gram: GradientSpaceWeights(gram=gram)(teachers, None, 4.0, student_logits=student).weights[
            0
        ]
        for gram in ("batch_mean", "flattened")
    }
    assert (weights["batch_mean"] - weights["flattened"]).abs().max() > 0.1
    default = GradientSpaceWeights()(teachers, None, 4.0, student_logits=student).weights[0]
    torch.testing.assert_close(default, weights["batch_mean"])
    with pytest.raises(ValueError, match="gram must be one of"):
        GradientSpaceWeights(gram="full")


def test_reordering_teachers_permutes_the_weights():
    teachers, student = random_instance(1, 4)
    rule = GradientSpaceWeights()
    weights = rule(teachers, temperature=4.0, student_logits=student).weights[0]
    order = torch.tensor([2, 0, 3, 1])
    permuted = rule(teachers[order], temperature=4.0, student_logits=student).weights[0]
    torch.testing.assert_close(permuted, weights[order], atol=1e-6, rtol=0)


def test_one_teacher_gives_hinton_kd():
    teachers, student = random_instance(2, 1)
    labels = torch.randint(0, 6, (16,))
    for aggregation in ("target", "loss"):
        loss = DistillationLoss(
            GradientSpaceWeights(), alpha=0.9, temperature=4.0, aggregation=aggregation
        )
        out = loss(student, teachers, labels)
        assert out.weights.tolist() == [[1.0]] * 16
        expected = 0.1 * F.cross_entropy(student, labels) + 0.9 * kl_divergence(
            student, F.softmax(teachers[0] / 4.0, dim=-1), 4.0
        )
        torch.testing.assert_close(out.loss, expected)


def test_weights_touch_no_parameter_and_act_as_constants():
    generator = torch.Generator().manual_seed(4)
    student = nn.Linear(5, 6)
    inputs = torch.randn(16, 5, generator=generator)
    teachers = 3 * torch.randn(3, 16, 6, generator=generator)
    labels = torch.randint(0, 6, (16,), generator=generator)
    rule = GradientSpaceWeights()

    logits = student(inputs)
    weights = rule(teachers, labels, 4.0, student_logits=logits).weights
    assert all(p.grad is None for p in student.parameters())
    assert not weights.requires_grad and logits.grad_fn is not None

    DistillationLoss(rule, alpha=0.9, temperature=4.0, aggregation="loss")(
        logits, teachers, labels
    ).loss.backward()
    actual = [p.grad.clone() for p in student.parameters()]

    student.zero_grad(set_to_none=True)
    logits = student(inputs)
    per_teacher = torch.stack(
        [kl_divergence(logits, F.softmax(z / 4.0, dim=-1), 4.0) for z in teachers]
    )
    manual = 0.1 * F.cross_entropy(logits, labels) + 0.9 * (weights[0] * per_teacher).sum()
    manual.backward()
    for got, want in zip(actual, (p.grad for p in student.parameters()), strict=True):
        torch.testing.assert_close(got, want)


def test_target_and_loss_aggregation_share_the_gradient():
    teachers, student = random_instance(5, 3)
    labels = torch.randint(0, 6, (16,))
    grads = []
    for aggregation in ("target", "loss"):
        leaf = student.clone().requires_grad_()
        loss = DistillationLoss(GradientSpaceWeights(), temperature=4.0, aggregation=aggregation)
        loss(leaf, teachers, labels).loss.backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_works_without_autograd():
    teachers, student = random_instance(6, 3)
    rule = GradientSpaceWeights()
    expected = rule(teachers, temperature=4.0, student_logits=student).weights
    with torch.inference_mode():
        weights = rule(teachers, temperature=4.0, student_logits=student).weights
    torch.testing.assert_close(weights, expected)


def test_refuses_missing_student_and_empty_capped_simplex():
    teachers, student = random_instance(7, 3)
    rule = GradientSpaceWeights()
    assert rule.needs_student and FUSION_RULES["aekd"] is GradientSpaceWeights
    with pytest.raises(ValueError, match="GradientSpaceWeights needs the student's logits"):
        rule(teachers, temperature=4.0)
    with pytest.raises(ValueError, match="student_logits shape"):
        rule(teachers, temperature=4.0, student_logits=student[:4])
    with pytest.raises(ValueError, match=r"max_weight = 0\.3 with K = 3"):
        GradientSpaceWeights(max_weight=0.3)(teachers, student_logits=student)
    with pytest.raises(ValueError, match="empty"):
        min_norm_capped_simplex(torch.eye(3), 0.3)
    with pytest.raises(ValueError, match="max_weight"):
        GradientSpaceWeights(max_weight=0.0)
    with pytest.raises(ValueError, match="iterations"):
        GradientSpaceWeights(iterations=0)
    assert build_fusion("aekd", max_weight=0.5).max_weight == 0.5


class WeightsRecorder(L.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(outputs["fusion_weights"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.weights.append(outputs["fusion_weights"])


def test_distillation_module_fits_one_epoch(tmp_path, teachers, datamodule):
    loss = DistillationLoss(GradientSpaceWeights(), aggregation="loss")
    module = DistillationModule(
        small_mlp(), teachers, loss, optimizer=partial(torch.optim.Adam, lr=1e-2)
    )
    recorder = WeightsRecorder()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[recorder])
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    weights = torch.cat(recorder.weights)
    assert weights.shape[1] == 3 and len(recorder.weights) >= 4
    assert (weights >= 0).all() and (weights <= 0.6 + 1e-6).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))
    assert module(torch.randn(2, NUM_FEATURES)).shape == (2, NUM_CLASSES)
