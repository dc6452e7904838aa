"""Divergences pinned to independent float64 NumPy references and to hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.functional import (
    js_divergence,
    kd_loss,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)

from .reference import np_log_softmax

# --- float64 NumPy references -------------------------------------------------------------------

FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_plogp(p: np.ndarray) -> np.ndarray:
    """p·log p with the convention 0·log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * np.log(safe), 0.0)


def np_kl(s: np.ndarray, p: np.ndarray, t: float) -> np.ndarray:
    log_q = np_log_softmax(s / t)
    return t**2 * (np_plogp(p) - p * log_q).sum(-1)


def np_reverse_kl(s: np.ndarray, p: np.ndarray, t: float) -> np.ndarray:
    log_q = np_log_softmax(s / t)
    log_p = np.log(np.maximum(p, FLOAT32_TINY))
    return t**2 * (np.exp(log_q) * (log_q - log_p)).sum(-1)


def np_js(s: np.ndarray, p: np.ndarray, t: float) -> np.ndarray:
    q = np_softmax(s / t)
    m = (p + q) / 2
    kl_p_m = (np_plogp(p) - np.where(p > 0, p * np.log(np.maximum(m, FLOAT32_TINY)), 0.0)).sum(-1)
    kl_q_m = (np_plogp(q) - np.where(q > 0, q * np.log(np.maximum(m, FLOAT32_TINY)), 0.0)).sum(-1)
    return t**2 * 0.5 * (kl_p_m + kl_q_m)


def np_soft_ce(s: np.ndarray, p: np.ndarray, t: float) -> np.ndarray:
    return -(t**2) * (p * np_log_softmax(s / t)).sum(-1)


def np_reduce(values: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        return values
    if reduction == "sum":
        return np.asarray(values.sum())
    return np.asarray(values.mean())


PROBABILITY_DIVERGENCES: list[tuple[Callable, Callable]] = [
    (kl_divergence, np_kl),
    (reverse_kl_divergence, np_reverse_kl),
    (js_divergence, np_js),
    (soft_cross_entropy, np_soft_ce),
]
PROBABILITY_IDS = ["kl", "reverse_kl", "js", "soft_ce"]
ALL_DIVERGENCES = [kl_divergence, reverse_kl_divergence, js_divergence, soft_cross_entropy]


def random_inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(shape, generator=generator)
    target = torch.softmax(2 * torch.randn(shape, generator=generator), dim=-1)
    return student, target


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("divergence", "reference"), PROBABILITY_DIVERGENCES, ids=PROBABILITY_IDS)
@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 6)], ids=["BC", "BLC"])
@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_probability_divergences_match_numpy(
    divergence, reference, shape, reduction, temperature
) -> None:
    student, target = random_inputs(shape)
    result = divergence(student, target, temperature, reduction)
    expected = np_reduce(
        reference(student.double().numpy(), target.double().numpy(), temperature), reduction
    )
    assert result.dtype == torch.float32
    assert result.shape == expected.shape == (shape[:-1] if reduction == "none" else ())
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum"])
def test_logit_mse_matches_numpy(reduction) -> None:
    student, _ = random_inputs((3, 2, 6))
    target = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(1))
    result = logit_mse(student, target, reduction)
    per_position = ((student.double().numpy() - target.double().numpy()) ** 2).mean(-1)
    np.testing.assert_allclose(result.numpy(), np_reduce(per_position, reduction), rtol=1e-6)


def test_kl_hand_computed() -> None:
    # s = (0, 0) at T = 2 is still uniform: log q = (log ½, log ½).
    # p = (¾, ¼): KL = ¾(log ¾ - log ½) + ¼(log ¼ - log ½) = ¾ log(3/2) + ¼ log(1/2)
    #   = 0.75·0.405465 - 0.25·0.693147 = 0.130812; times T² = 4 → 0.523248.
    student = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([[0.75, 0.25]])
    assert kl_divergence(student, target, temperature=2.0).item() == pytest.approx(
        0.523248, abs=1e-6
    )


def test_kd_loss_hand_computed() -> None:
    # Teacher (2 ln 3, 0) at T = 2 → softmax(ln 3, 0) = (¾, ¼); student (0, 0) → (½, ½).
    # Same numbers as test_kl_hand_computed: 4 · 0.130812 = 0.523248.
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(0.523248, abs=1e-6)


def test_reverse_kl_js_soft_ce_hand_computed() -> None:
    student = torch.tensor([[0.0, 0.0]])  # q = (½, ½)
    target = torch.tensor([[0.75, 0.25]])
    # reverse KL = ½ log(½ / ¾) + ½ log(½ / ¼) = ½(-0.405465) + ½(0.693147) = 0.143841
    assert reverse_kl_divergence(student, target).item() == pytest.approx(0.143841, abs=1e-6)
    # m = (⅝, ⅜); KL(p‖m) = ¾ log(6/5) + ¼ log(2/3) = 0.136741 - 0.101366 = 0.035375
    # KL(q‖m) = ½ log(4/5) + ½ log(4/3) = -0.111572 + 0.143841 = 0.032269; JS = 0.033822
    assert js_divergence(student, target).item() == pytest.approx(0.033822, abs=1e-6)
    # soft CE = -(¾ + ¼) log ½ = 0.693147
    assert soft_cross_entropy(student, target).item() == pytest.approx(0.693147, abs=1e-6)


def test_batchmean_is_torchs_batchmean_and_mse_loss() -> None:
    student, target = random_inputs((6, 5))
    torch_kl = F.kl_div(F.log_softmax(student, -1), target, reduction="batchmean")
    torch.testing.assert_close(kl_divergence(student, target), torch_kl)
    teacher = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logit_mse(student, teacher), F.mse_loss(student, teacher))


def test_kd_loss_is_kl_to_the_tempered_teacher() -> None:
    student, _ = random_inputs((4, 7))
    teacher = torch.randn(4, 7, generator=torch.Generator().manual_seed(5))
    expected = np_kl(
        student.double().numpy(), np_softmax(teacher.double().numpy() / 4.0), 4.0
    ).mean()
    assert kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_batchmean_over_sequences_is_the_mean_over_all_positions() -> None:
    student, target = random_inputs((3, 4, 5))
    per_position = kl_divergence(student, target, reduction="none")
    assert per_position.shape == (3, 4)
    torch.testing.assert_close(kl_divergence(student, target), per_position.sum() / 12)
    flat = kl_divergence(student.reshape(12, 5), target.reshape(12, 5))
    torch.testing.assert_close(kl_divergence(student, target), flat)


# --- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "divergence", [kl_divergence, reverse_kl_divergence, js_divergence], ids=PROBABILITY_IDS[:3]
)
def test_zero_when_the_student_matches_the_target(divergence) -> None:
    student, _ = random_inputs((4, 6))
    target = torch.softmax(student / 3.0, dim=-1)
    assert divergence(student, target, 3.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=PROBABILITY_IDS)
def test_one_hot_targets_are_finite(divergence) -> None:
    student, _ = random_inputs((4, 6))
    one_hot = F.one_hot(torch.tensor([0, 1, 2, 5]), 6).float()
    value = divergence(student, one_hot, 2.0, "none")
    assert torch.isfinite(value).all()
    student_leaf = student.clone().requires_grad_()
    divergence(student_leaf, one_hot, 2.0).backward()
    assert torch.isfinite(student_leaf.grad).all()


def test_reverse_kl_of_a_one_hot_target_is_large_but_finite() -> None:
    # q = (½, ½), p = (1, 0): ½ log ½ + ½ (log ½ - log tiny) = log ½ + ½·87.3365 ≈ 42.975
    value = reverse_kl_divergence(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item()
    assert value == pytest.approx(math.log(0.5) - 0.5 * math.log(FLOAT32_TINY), rel=1e-5)


def test_js_is_symmetric_and_bounded_by_t_squared_log_2() -> None:
    logits_a, _ = random_inputs((8, 5), seed=1)
    logits_b, _ = random_inputs((8, 5), seed=2)
    temperature = 2.0
    js_ab = js_divergence(logits_a, torch.softmax(logits_b / temperature, -1), temperature, "none")
    js_ba = js_divergence(logits_b, torch.softmax(logits_a / temperature, -1), temperature, "none")
    torch.testing.assert_close(js_ab, js_ba)
    assert (js_ab <= temperature**2 * math.log(2) + 1e-6).all()
    assert (js_ab >= 0).all()


def test_soft_ce_and_kl_have_the_same_gradient() -> None:
    student, target = random_inputs((4, 6))
    grads = []
    for divergence in (kl_divergence, soft_cross_entropy):
        leaf = student.clone().requires_grad_()
        divergence(leaf, target, 3.0).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=PROBABILITY_IDS)
def test_half_precision_inputs_give_float32_results(divergence, dtype) -> None:
    student, target = random_inputs((4, 6))
    result = divergence(student.to(dtype), target.to(dtype), 2.0)
    assert result.dtype == torch.float32
    reference = divergence(student.to(dtype).float(), target.to(dtype).float(), 2.0)
    torch.testing.assert_close(result, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logit_mse_and_kd_loss_give_float32(dtype) -> None:
    student, _ = random_inputs((4, 6))
    teacher = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    assert logit_mse(student.to(dtype), teacher.to(dtype)).dtype == torch.float32
    assert kd_loss(student.to(dtype), teacher.to(dtype)).dtype == torch.float32


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=PROBABILITY_IDS)
def test_bad_reduction_is_refused(divergence) -> None:
    student, target = random_inputs((2, 3))
    with pytest.raises(ValueError, match=r"reduction must be one of .*'mean'"):
        divergence(student, target, 1.0, "mean")


def test_bad_reduction_is_refused_by_logit_mse_and_kd_loss() -> None:
    student, _ = random_inputs((2, 3))
    with pytest.raises(ValueError, match="reduction"):
        logit_mse(student, student, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(student, student, reduction="avg")


@pytest.mark.parametrize("temperature", [0.0, -1.0])
@pytest.mark.parametrize("divergence", [*ALL_DIVERGENCES, kd_loss])
def test_non_positive_temperature_is_refused(divergence, temperature) -> None:
    student, target = random_inputs((2, 3))
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        divergence(student, target, temperature)


@pytest.mark.parametrize("divergence", [*ALL_DIVERGENCES, logit_mse, kd_loss])
def test_shape_mismatch_names_both_shapes(divergence) -> None:
    student = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        divergence(student, torch.zeros(2, 4))
