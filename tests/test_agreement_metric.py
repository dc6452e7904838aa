"""TeacherAgreement accumulates counts that match NumPy over the whole data, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.metrics import TeacherAgreement


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(-1)


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(50, 6, generator=generator)
    teachers = torch.randn(3, 50, 6, generator=generator) * 2
    labels = torch.randint(0, 6, (50,), generator=generator)
    weights = torch.softmax(torch.randn(50, 3, generator=generator), -1)
    return student, teachers, labels, weights


def test_matches_numpy_over_uneven_batches(data):
    student, teachers, labels, weights = data
    metric = TeacherAgreement(num_teachers=3)
    for start, stop in ((0, 7), (7, 30), (30, 50)):
        metric.update(
            student[start:stop], teachers[:, start:stop], labels[start:stop], weights[start:stop]
        )
    result = metric.compute()

    s, z, y, w = (
        student.double().numpy(),
        teachers.double().numpy(),
        labels.numpy(),
        weights.double().numpy(),
    )
    s_top, z_top = s.argmax(-1), z.argmax(-1)
    p, q = np_softmax(z), np_softmax(s)
    np.testing.assert_allclose(result["teacher_accuracy"], (z_top == y).mean(1), rtol=1e-6)
    np.testing.assert_allclose(result["student_agreement"], (z_top == s_top).mean(1), rtol=1e-6)
    pairwise = (z_top[:, None] == z_top[None]).mean(-1)
    np.testing.assert_allclose(result["pairwise_agreement"], pairwise, rtol=1e-6)
    expected_disagreement = np.mean([1 - pairwise[0, 1], 1 - pairwise[0, 2], 1 - pairwise[1, 2]])
    assert result["disagreement"].item() == pytest.approx(expected_disagreement, rel=1e-6)
    kl = (p * (np.log(p) - np.log(q))).sum(-1).mean(1)
    np.testing.assert_allclose(result["student_kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(result["fusion_weight"], w.mean(0), rtol=1e-5)
    jsd = (np_entropy(p.mean(0)) - np_entropy(p).mean(0)).mean()
    assert result["ensemble_jsd"].item() == pytest.approx(jsd, rel=1e-5)
    assert result["ensemble_accuracy"].item() == pytest.approx((p.mean(0).argmax(-1) == y).mean())
    assert result["student_accuracy"].item() == pytest.approx((s_top == y).mean())


def test_hand_counted_example():
    # Two samples, two teachers. Teacher 0 says class 0 twice, teacher 1 says class 1 twice;
    # the student says 0 then 1; labels are 0 then 1.
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    teachers = torch.tensor([[[3.0, 0.0], [3.0, 0.0]], [[0.0, 3.0], [0.0, 3.0]]])
    metric = TeacherAgreement(num_teachers=2)
    metric.update(student, teachers, torch.tensor([0, 1]))
    result = metric.compute()
    torch.testing.assert_close(result["teacher_accuracy"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(result["pairwise_agreement"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert result["disagreement"].item() == 1.0
    assert result["fusion_weight"].isnan().all()  # no weights given


def test_reset_and_wrong_shapes(data):
    student, teachers, labels, _ = data
    metric = TeacherAgreement(num_teachers=3)
    metric.update(student, teachers, labels)
    metric.reset()
    assert metric.total.item() == 0
    with pytest.raises(ValueError, match=r"expected teacher logits of shape \(2, \*\(50, 6\)\)"):
        TeacherAgreement(num_teachers=2).update(student, teachers, labels)
    with pytest.raises(ValueError, match="num_teachers must be at least 1"):
        TeacherAgreement(num_teachers=0)
