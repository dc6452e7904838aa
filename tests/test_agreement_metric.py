"""TeacherAgreement accumulates counts that match NumPy over the whole data, whatever the batching."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kd_lightning.callbacks import agreement_log_dict
from kd_lightning.metrics import TeacherAgreement
from kd_lightning.teachers.cache.topk import compress_topk, expand_topk


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


def test_batches_of_some_teachers_count_exactly_the_teachers_that_ran(data):
    """Per-teacher values over the batches each teacher ran in, pairs over those where both did,
    the ensemble over the batches where all ran; columns of weights follow the indices."""
    student, teachers, labels, weights = data
    ran = {(0, 10): [0, 1, 2], (10, 25): [2], (25, 40): [0, 2], (40, 50): [1]}
    metric = TeacherAgreement(num_teachers=3)
    for (start, stop), rows in ran.items():
        metric.update(
            student[start:stop],
            teachers[rows, start:stop],
            labels[start:stop],
            weights[start:stop][:, rows],
            teacher_indices=torch.tensor(rows),
        )
    result = metric.compute()

    z_top, s_top, y = teachers.argmax(-1).numpy(), student.argmax(-1).numpy(), labels.numpy()
    p, q = np_softmax(teachers.double().numpy()), np_softmax(student.double().numpy())

    def positions(*ks: int) -> np.ndarray:
        chosen = [np.arange(a, b) for (a, b), rows in ran.items() if set(ks) <= set(rows)]
        return np.concatenate(chosen)

    for k in range(3):
        seen = positions(k)
        assert metric.teacher_total[k].item() == len(seen)
        assert result["teacher_accuracy"][k].item() == pytest.approx(
            (z_top[k, seen] == y[seen]).mean()
        )
        agree = (z_top[k, seen] == s_top[seen]).mean()
        assert result["student_agreement"][k].item() == pytest.approx(agree)
        kl = (p[k, seen] * (np.log(p[k, seen]) - np.log(q[seen]))).sum(-1).mean()
        assert result["student_kl"][k].item() == pytest.approx(kl, rel=1e-5)
        weight = weights[seen, k].double().numpy().mean()
        assert result["fusion_weight"][k].item() == pytest.approx(weight, rel=1e-5)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = positions(a, b)
        expected = (z_top[a, both] == z_top[b, both]).mean()
        assert result["pairwise_agreement"][a, b].item() == pytest.approx(expected)
        assert result["pairwise_agreement"][b, a].item() == pytest.approx(expected)
    pairs = result["pairwise_agreement"]
    expected_disagreement = np.mean([1 - pairs[0, 1], 1 - pairs[0, 2], 1 - pairs[1, 2]])
    assert result["disagreement"].item() == pytest.approx(expected_disagreement, rel=1e-6)
    full = np.arange(0, 10)
    assert metric.ensemble_total.item() == len(full)
    ensemble_top = p[:, full].mean(0).argmax(-1)
    assert result["ensemble_accuracy"].item() == pytest.approx((ensemble_top == y[full]).mean())
    jsd = (np_entropy(p[:, full].mean(0)) - np_entropy(p[:, full]).mean(0)).mean()
    assert result["ensemble_jsd"].item() == pytest.approx(jsd, rel=1e-5)
    assert result["student_accuracy"].item() == pytest.approx((s_top == y).mean())


def test_a_teacher_or_ensemble_never_measured_is_nan_and_counts_merge_exactly(data):
    student, teachers, labels, _ = data
    halves = [TeacherAgreement(num_teachers=3) for _ in range(2)]
    for metric, (start, stop), k in zip(halves, ((0, 20), (20, 50)), (0, 2), strict=True):
        metric.update(
            student[start:stop], teachers[[k], start:stop], labels[start:stop], teacher_indices=[k]
        )
    alone = copy.deepcopy(halves[0]).compute()
    assert alone["teacher_accuracy"][1:].isnan().all() and not alone["teacher_accuracy"][0].isnan()
    assert alone["ensemble_accuracy"].isnan() and alone["disagreement"].isnan()
    logged = agreement_log_dict("train", ["a", "b", "c"], alone)
    assert set(logged) == {
        "train/agreement/student_vs_a",
        "train/teacher_acc/a",
        "train/teacher_ce/a",
        "train/kl/a_to_student",
    }
    whole = TeacherAgreement(num_teachers=3)
    whole.update(student[:20], teachers[[0], :20], labels[:20], teacher_indices=[0])
    whole.update(student[20:], teachers[[2], 20:], labels[20:], teacher_indices=[2])
    halves[0].merge_state(halves[1])  # what the sum over DDP processes does
    for key, value in whole.compute().items():
        torch.testing.assert_close(halves[0].compute()[key], value, equal_nan=True, msg=key)
    with pytest.raises(ValueError, match="2 teacher_indices for 1 rows"):
        whole.update(student, teachers[[0]], labels, teacher_indices=[0, 1])
    with pytest.raises(ValueError, match="pass teacher_indices when only some teachers ran"):
        whole.update(student, teachers[[0]], labels)


def test_cross_entropies_match_numpy_over_real_tokens_only():
    """Token-level logits (B, L, V): each teacher's CE, −log p_k(label), and the ensemble's,
    −log mean_k p_k(label), averaged over the real tokens; padded ones (mask false, label -100)
    change nothing, however garbage their logits."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 7, generator=generator)
    teachers = torch.randn(3, 2, 5, 7, generator=generator) * 2
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    labels[~mask] = -100
    teachers[:, ~mask] = 1e4  # padding: must not reach any statistic
    metric = TeacherAgreement(num_teachers=3)
    metric.update(student[:1], teachers[:, :1], labels[:1], mask=mask[:1])
    metric.update(student[1:], teachers[:, 1:], labels[1:], mask=mask[1:])
    result = metric.compute()

    real = mask.numpy()
    p = np_softmax(teachers.double().numpy()[:, real])  # (3, 8 real tokens, 7)
    y = labels.numpy()[real]
    label_p = p[:, np.arange(len(y)), y]  # (3, 8)
    np.testing.assert_allclose(result["teacher_ce"], -np.log(label_p).mean(1), rtol=1e-5)
    ensemble = -np.log(label_p.mean(0)).mean()
    assert result["ensemble_ce"].item() == pytest.approx(ensemble, rel=1e-5)
    logged = agreement_log_dict("val", ["a", "b", "c"], result)
    assert logged["val/teacher_ce/b"] == pytest.approx(-np.log(label_p[1]).mean(), rel=1e-5)
    assert logged["val/ensemble/ce"] == pytest.approx(ensemble, rel=1e-5)


def test_cross_entropy_by_hand_and_for_the_teachers_that_ran():
    # One sample, label 0. Teacher 0 gives p(0) = 1/2, teacher 1 gives p(0) = 1/4:
    # CEs log 2 and log 4; the ensemble's p(0) = 3/8, CE log(8/3).
    teachers = torch.log(torch.tensor([[[0.5, 0.5]], [[0.25, 0.75]]]))
    metric = TeacherAgreement(num_teachers=2)
    metric.update(torch.zeros(1, 2), teachers, torch.tensor([0]))
    result = metric.compute()
    torch.testing.assert_close(result["teacher_ce"], torch.tensor([math.log(2), math.log(4)]))
    assert result["ensemble_ce"].item() == pytest.approx(math.log(8 / 3))
    # A second sample where only teacher 1 ran, p(1) = 3/4: its CE averages over both samples,
    # teacher 0's and the ensemble's stay as they were.
    metric.update(torch.zeros(1, 2), teachers[1:], torch.tensor([1]), teacher_indices=[1])
    result = metric.compute()
    expected = (math.log(4) + math.log(4 / 3)) / 2
    torch.testing.assert_close(result["teacher_ce"], torch.tensor([math.log(2), expected]))
    assert result["ensemble_ce"].item() == pytest.approx(math.log(8 / 3))


@pytest.mark.parametrize("masked", [True, False])
def test_top_k_teachers_count_as_their_dense_expansion_read_in_chunks(masked):
    """Every statistic from top-k teachers, expanded 4 real tokens at a time, equals the one from
    their whole expansion: a batch of all three teachers, then one of teachers 2 and 0."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 9, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 9), generator=generator)
    mask = None
    if masked:
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[0, :2] = mask[2, 5:] = False  # 21 real tokens: 6 chunks
        labels[~mask] = -100
    dense, sparse = TeacherAgreement(3), TeacherAgreement(3, chunk_tokens=4)
    for teacher_indices in (None, [2, 0]):
        ran = 3 if teacher_indices is None else len(teacher_indices)
        topk = compress_topk(2 * torch.randn(ran, 3, 9, 11, generator=generator), k=4)
        weights = torch.softmax(torch.randn(3, 9, ran, generator=generator), -1)
        for metric, teachers in ((dense, expand_topk(topk)), (sparse, topk)):
            metric.update(
                student, teachers, labels, weights, mask=mask, teacher_indices=teacher_indices
            )
    expected, got = dense.compute(), sparse.compute()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(sparse.teacher_total, dense.teacher_total)
    assert dense.teacher_total.tolist() == ([42, 21, 42] if masked else [54, 27, 54])
