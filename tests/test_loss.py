"""DistillationLoss pinned to NumPy references and to the identities of methods.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning import DistillationLoss
from kd_lightning.functional import kd_loss, kl_divergence
from kd_lightning.fusion import ConfidenceAware, LearnedWeights, StaticWeights

from .reference import FUSIONS_BY_NAME, np_kl, np_log_softmax


def np_cross_entropy(s: np.ndarray, y: np.ndarray) -> float:
    return float(-np_log_softmax(s)[np.arange(len(y)), y].mean())


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 5, generator=generator) * 2
    teachers = torch.randn(3, 6, 5, generator=generator) * 3
    labels = torch.randint(0, 5, (6,), generator=generator)
    return student, teachers, labels


def test_mean_probabilities_matches_numpy(batch):
    student, teachers, labels = batch
    alpha, t = 0.7, 3.0
    s, z, y = student.double().numpy(), teachers.double().numpy(), labels.numpy()
    p_mean = np.exp(np_log_softmax(z, t)).mean(0)
    expected = (1 - alpha) * np_cross_entropy(s, y) + alpha * np_kl(p_mean, s, t).mean()
    out = DistillationLoss("mean_probs", alpha=alpha, temperature=t)(student, teachers, labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.hard.item() == pytest.approx(np_cross_entropy(s, y), rel=1e-5)
    torch.testing.assert_close(out.weights, torch.full((6, 3), 1 / 3))


def test_loss_aggregation_matches_numpy(batch):
    student, teachers, labels = batch
    t = 2.0
    s, z = student.double().numpy(), teachers.double().numpy()
    per_teacher = np.stack([np_kl(np.exp(np_log_softmax(z[k], t)), s, t) for k in range(3)])
    weights = np.array([0.5, 0.3, 0.2])
    expected = (weights[:, None] * per_teacher).sum(0).mean()
    loss = DistillationLoss(StaticWeights([5, 3, 2]), alpha=1.0, temperature=t, aggregation="loss")
    assert loss(student, teachers, labels).soft.item() == pytest.approx(expected, rel=1e-5)


def test_mse_fuses_logits(batch):
    student, teachers, labels = batch
    s, z = student.double().numpy(), teachers.double().numpy()
    target = np.tensordot(np.array([0.5, 0.3, 0.2]), z, axes=1)
    expected_target = ((s - target) ** 2).mean()
    expected_loss = np.mean([((s - z[k]) ** 2).mean(-1) for k in range(3)], axis=1) @ np.array(
        [0.5, 0.3, 0.2]
    )
    for aggregation, expected in (("target", expected_target), ("loss", expected_loss)):
        loss = DistillationLoss(
            StaticWeights([5, 3, 2]), alpha=1.0, divergence="mse", aggregation=aggregation
        )
        assert loss(student, teachers, labels).soft.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "fusion", ["mean_probs", "entropy", "confidence", "correct_only", "static"]
)
def test_identity_e1_target_and_loss_aggregation_share_the_gradient(batch, fusion):
    student, teachers, labels = batch
    grads = []
    for aggregation in ("target", "loss"):
        s = student.clone().requires_grad_(True)
        rule = StaticWeights([1, 2, 3]) if fusion == "static" else fusion
        DistillationLoss(rule, alpha=0.8, temperature=4.0, aggregation=aggregation)(
            s, teachers, labels
        ).loss.backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", [*FUSIONS_BY_NAME, "static"])
@pytest.mark.parametrize("aggregation", ["target", "loss"])
def test_one_teacher_is_hinton_kd(batch, fusion, aggregation):
    student, teachers, labels = batch
    loss = DistillationLoss(fusion, alpha=0.6, temperature=4.0, aggregation=aggregation)
    if fusion == "vote" and aggregation == "target":  # a single vote is the teacher's hard label
        target = torch.nn.functional.one_hot(teachers[0].argmax(-1), 5).float()
        soft = kl_divergence(student, target, 4.0)
    else:
        soft = kd_loss(student, teachers[0], 4.0)
    expected = 0.4 * torch.nn.functional.cross_entropy(student, labels) + 0.6 * soft
    assert loss(student, teachers[:1], labels).loss.item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_reordering_teachers_reorders_only_the_weights(batch):
    student, teachers, labels = batch
    order = torch.tensor([2, 0, 1])
    loss = DistillationLoss(ConfidenceAware(), temperature=2.0)
    first, second = loss(student, teachers, labels), loss(student, teachers[order], labels)
    assert first.loss.item() == pytest.approx(second.loss.item(), rel=1e-6)
    torch.testing.assert_close(first.weights[:, order], second.weights)


@pytest.mark.parametrize("divergence", ["kl", "mse"])
def test_computed_in_float32_under_autocast(batch, divergence):
    student, teachers, labels = batch
    loss = DistillationLoss(StaticWeights([1, 2, 3]), temperature=4.0, divergence=divergence)
    reference = loss(student.bfloat16().float(), teachers.bfloat16().float(), labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(student.bfloat16(), teachers.bfloat16().float(), labels)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_learnable_weights_receive_gradients(batch):
    student, teachers, labels = batch
    loss = DistillationLoss(LearnedWeights(num_teachers=3), alpha=1.0)
    assert len(list(loss.parameters())) == 1
    loss(student, teachers, labels).loss.backward()
    assert next(loss.parameters()).grad.abs().sum() > 0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="alpha must be in"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="unknown divergence 'kld'"):
        DistillationLoss(divergence="kld")
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        DistillationLoss(aggregation="mean")
    with pytest.raises(ValueError, match="mean_probs"):
        DistillationLoss("averages")


def test_bad_inputs_are_refused(batch):
    student, teachers, labels = batch
    loss = DistillationLoss()
    with pytest.raises(ValueError, match="the student has 5 classes but the teachers have 7"):
        loss(student, torch.randn(3, 6, 7), labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*from 0 to 9"):
        loss(student, teachers, torch.tensor([0, 1, 2, 3, 4, 9]))
    with pytest.raises(ValueError, match="integer class indices"):
        loss(student, teachers, labels.float())
    with pytest.raises(ValueError, match="stacked as"):
        loss(student, teachers[0], labels)


def test_padding_found_whatever_ignore_index_is(batch):
    """A batch without padding takes the unmasked path; padding is found even when ignore_index
    is a class index, and a padded position changes nothing."""
    student, teachers, labels = batch
    labels = torch.tensor([1, 0, 2, 0, 3, 4])
    for ignore_index in (-100, 0, 7):
        loss = DistillationLoss("entropy", alpha=0.5, ignore_index=ignore_index)
        padded = labels == ignore_index
        out = loss(student, teachers, labels)
        real = ~padded
        alone = DistillationLoss("entropy", alpha=0.5)(
            student[real], teachers[:, real], labels[real]
        )
        torch.testing.assert_close(out.loss, alone.loss)
        torch.testing.assert_close(out.weights[real], alone.weights)
        assert bool((out.weights[padded] == 0).all())
    with pytest.raises(ValueError, match=r"\(besides ignore_index=7\).*from -1 to 4"):
        DistillationLoss(ignore_index=7)(student, teachers, torch.tensor([1, 7, 2, -1, 3, 4]))
