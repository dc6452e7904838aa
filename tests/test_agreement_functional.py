"""Agreement statistics pinned to independent NumPy references and hand-counted cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning.functional import (
    disagreement,
    ensemble_jsd,
    pairwise_agreement,
    per_teacher_accuracy,
    student_teacher_agreement,
    top1_agreement,
)

# --- float64 NumPy references -------------------------------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def np_pairwise(teachers: np.ndarray) -> np.ndarray:
    predictions = teachers.argmax(-1).reshape(teachers.shape[0], -1)
    k = len(predictions)
    return np.array(
        [[np.mean(predictions[a] == predictions[b]) for b in range(k)] for a in range(k)]
    )


def np_disagreement(teachers: np.ndarray) -> float:
    predictions = teachers.argmax(-1).reshape(teachers.shape[0], -1)
    pairs = [(a, b) for a in range(len(predictions)) for b in range(a + 1, len(predictions))]
    return float(np.mean([np.mean(predictions[a] != predictions[b]) for a, b in pairs]))


def np_ensemble_jsd(teachers: np.ndarray, temperature: float) -> np.ndarray:
    probs = np_softmax(teachers / temperature)
    return np_entropy(probs.mean(0)) - np_entropy(probs).mean(0)


def random_teachers(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    # Few classes so that predictions agree often enough to be interesting.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- hand-counted cases -------------------------------------------------------------------------

# Three teachers, four samples, three classes; argmax per teacher:
#   teacher 0: 0, 1, 2, 0
#   teacher 1: 0, 1, 0, 1
#   teacher 2: 2, 1, 2, 0
HAND_TEACHERS = torch.tensor(
    [
        [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]],
        [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]],
        [[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]],
    ]
)
HAND_LABELS = torch.tensor([0, 1, 2, 1])


def test_pairwise_agreement_hand_counted() -> None:
    # (0,1): samples 0, 1 agree → 2/4; (0,2): samples 1, 2, 3 → 3/4; (1,2): sample 1 → 1/4.
    expected = torch.tensor([[1.0, 0.5, 0.75], [0.5, 1.0, 0.25], [0.75, 0.25, 1.0]])
    torch.testing.assert_close(pairwise_agreement(HAND_TEACHERS), expected)


def test_disagreement_hand_counted() -> None:
    # 2/(3·2) · [(1 - ½) + (1 - ¾) + (1 - ¼)] = ⅓ · 1.5 = 0.5
    assert disagreement(HAND_TEACHERS).item() == pytest.approx(0.5)


def test_per_teacher_accuracy_hand_counted() -> None:
    # labels 0, 1, 2, 1: teacher 0 right on 3, teacher 1 on 3 (0, 1, 3), teacher 2 on 2 (1, 2).
    accuracy = per_teacher_accuracy(HAND_TEACHERS, HAND_LABELS)
    torch.testing.assert_close(accuracy, torch.tensor([0.75, 0.75, 0.5]))


def test_student_teacher_agreement_hand_counted() -> None:
    student = HAND_TEACHERS[0]
    torch.testing.assert_close(
        student_teacher_agreement(student, HAND_TEACHERS), torch.tensor([1.0, 0.5, 0.75])
    )
    assert top1_agreement(student, HAND_TEACHERS[2]).item() == pytest.approx(0.75)


def test_ensemble_jsd_hand_computed() -> None:
    # Teacher a is certain of class 0, teacher b uniform over 2 classes: p̄ = (¾, ¼).
    # H(p̄) = -¾ log ¾ - ¼ log ¼ = 0.215762 + 0.346574 = 0.562335
    # mean H = (0 + log 2) / 2 = 0.346574; JSD = 0.215762
    teachers = torch.tensor([[[0.0, -1e4]], [[0.0, 0.0]]])
    assert ensemble_jsd(teachers).item() == pytest.approx(0.215762, abs=1e-6)


# --- against NumPy ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 16, 3), (3, 4, 5, 3)], ids=["KBC", "KBLC"])
def test_agreements_match_numpy(shape) -> None:
    teachers = random_teachers(shape)
    student = random_teachers(shape[1:], seed=1)
    labels = torch.randint(0, shape[-1], shape[1:-1], generator=torch.Generator().manual_seed(2))
    t, s, y = teachers.double().numpy(), student.double().numpy(), labels.numpy()
    np.testing.assert_allclose(pairwise_agreement(teachers).numpy(), np_pairwise(t), rtol=1e-6)
    assert disagreement(teachers).item() == pytest.approx(np_disagreement(t))
    expected_student = [np.mean(tk.argmax(-1) == s.argmax(-1)) for tk in t]
    np.testing.assert_allclose(
        student_teacher_agreement(student, teachers).numpy(), expected_student, rtol=1e-6
    )
    expected_accuracy = [np.mean(tk.argmax(-1) == y) for tk in t]
    np.testing.assert_allclose(
        per_teacher_accuracy(teachers, labels).numpy(), expected_accuracy, rtol=1e-6
    )
    assert top1_agreement(student, teachers[0]).item() == pytest.approx(expected_student[0])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ensemble_jsd_matches_numpy(temperature, reduction) -> None:
    teachers = 3 * random_teachers((3, 2, 4, 5))
    per_position = np_ensemble_jsd(teachers.double().numpy(), temperature)
    expected = {"none": per_position, "mean": per_position.mean(), "sum": per_position.sum()}[
        reduction
    ]
    result = ensemble_jsd(teachers, temperature, reduction)
    assert result.dtype == torch.float32
    assert result.shape == ((2, 4) if reduction == "none" else ())
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


# --- properties ---------------------------------------------------------------------------------


def test_pairwise_agreement_is_symmetric_with_unit_diagonal() -> None:
    agreement = pairwise_agreement(random_teachers((5, 32, 3)))
    torch.testing.assert_close(agreement, agreement.T)
    torch.testing.assert_close(agreement.diagonal(), torch.ones(5))


def test_disagreement_is_zero_for_one_teacher_and_identical_teachers() -> None:
    assert disagreement(random_teachers((1, 8, 3))).item() == 0.0
    same = random_teachers((1, 8, 3)).expand(4, 8, 3)
    assert disagreement(same).item() == 0.0


def test_ensemble_jsd_is_non_negative_zero_for_identical_teachers_and_below_log_k() -> None:
    teachers = 5 * random_teachers((4, 64, 6))
    values = ensemble_jsd(teachers, reduction="none")
    assert (values >= 0).all()
    assert (values <= math.log(4) + 1e-6).all()
    same = teachers[:1].expand(4, 64, 6)
    assert ensemble_jsd(same).item() == pytest.approx(0.0, abs=1e-6)


def test_half_precision_inputs_give_float32() -> None:
    teachers = random_teachers((3, 8, 4)).to(torch.bfloat16)
    assert ensemble_jsd(teachers).dtype == torch.float32
    assert pairwise_agreement(teachers).dtype == torch.float32
    assert disagreement(teachers).dtype == torch.float32


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_culprit() -> None:
    teachers = random_teachers((3, 4, 5))
    with pytest.raises(ValueError, match=r"logits_a shape \(4, 5\) and logits_b shape \(4, 6\)"):
        top1_agreement(teachers[0], torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"student_logits shape \(4, 6\)"):
        student_teacher_agreement(torch.zeros(4, 6), teachers)
    with pytest.raises(ValueError, match=r"\(K, \*batch, C\).*\(4, 5\)"):
        pairwise_agreement(teachers[0])
    with pytest.raises(ValueError, match=r"labels shape \(3,\) must equal the batch shape \(4,\)"):
        per_teacher_accuracy(teachers, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        per_teacher_accuracy(teachers, torch.zeros(4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ensemble_jsd(teachers, reduction="batchmean")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ensemble_jsd(teachers, temperature=0.0)
