"""Fusion rules pinned to independent float64 NumPy references, hand-computed cases and E1-E3."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.functional import kl_divergence
from kd_lightning.fusion import (
    FUSION_RULES,
    ConfidenceAware,
    CorrectTeachersOnly,
    EntropyWeighted,
    Fusion,
    FusionRule,
    GradientSpaceWeights,
    LearnedGate,
    LearnedWeights,
    MajorityVote,
    MeanLogits,
    MeanProbabilities,
    RandomTeacher,
    RoutedTeachers,
    StaticWeights,
    build_fusion,
)
from kd_lightning.losses import DistillationLoss

# --- float64 NumPy references -------------------------------------------------------------------
# Teacher logits z: (K, *batch, C); labels y: (*batch); weights returned as (*batch, K).


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_entropy(p: np.ndarray) -> np.ndarray:
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def np_mix(z: np.ndarray, w: np.ndarray, temperature: float) -> np.ndarray:
    """Σ_k ŵ_k softmax(z_k / T) with ŵ = w / Σ w."""
    w_hat = w / w.sum(-1, keepdims=True)
    probs = np_softmax(z / temperature)
    return sum(w_hat[..., k, None] * probs[k] for k in range(z.shape[0]))


def np_uniform(z: np.ndarray) -> np.ndarray:
    return np.full((*z.shape[1:-1], z.shape[0]), 1.0 / z.shape[0])


def np_entropy_weights(z: np.ndarray, tau: float | None, normalize: bool) -> np.ndarray:
    h = np.moveaxis(np_entropy(np_softmax(z)), 0, -1)
    k = z.shape[0]
    if tau is not None:
        return np_softmax(-h / tau)
    w = 1 - h / h.sum(-1, keepdims=True)
    return w / (k - 1) if normalize else w


def np_confidence_weights(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    log_probs = np.log(np_softmax(z))
    ce = -np.take_along_axis(log_probs, np.broadcast_to(y, z.shape[:-1])[..., None], -1)[..., 0]
    ce = np.moveaxis(ce, 0, -1)
    return (1 - np_softmax(ce)) / (z.shape[0] - 1)


def np_correct_weights(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    correct = np.moveaxis(z.argmax(-1) == y, 0, -1).astype(np.float64)
    none_right = correct.sum(-1, keepdims=True) == 0
    correct = np.where(none_right, 1.0, correct)
    return correct / correct.sum(-1, keepdims=True)


def np_vote(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = z.shape[-1]
    predictions = z.argmax(-1)  # (K, *batch)
    votes = np.stack([(predictions == cls).sum(0) for cls in range(c)], -1)
    mean_probs = np_softmax(z).mean(0)
    winner = np.where(votes == votes.max(-1, keepdims=True), mean_probs, -1.0).argmax(-1)
    voters = np.moveaxis(predictions == winner, 0, -1).astype(np.float64)
    return voters / voters.sum(-1, keepdims=True), np.eye(c)[winner]


def static_weights_for(num_teachers: int) -> list[float]:
    """The weights given to StaticWeights in these tests: 1, 2, ..., K."""
    return [float(k + 1) for k in range(num_teachers)]


def np_reference(
    name: str, z: np.ndarray, y: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    if name == "mean_logits":
        return np_uniform(z), np_softmax(z.mean(0) / temperature)
    if name == "vote":
        return np_vote(z)
    if name in ("mean_probs", "static_uniform", "learned"):
        w = np_uniform(z)
    elif name == "static":
        given = np.array(static_weights_for(z.shape[0]))
        w = np.broadcast_to(given / given.sum(), (*z.shape[1:-1], z.shape[0]))
    elif name == "entropy":
        w = np_entropy_weights(z, None, True)
    elif name == "entropy_raw":
        w = np_entropy_weights(z, None, False)
    elif name == "entropy_tau":
        w = np_entropy_weights(z, 0.5, True)
    elif name == "confidence":
        w = np_confidence_weights(z, y)
    elif name == "correct_only":
        w = np_correct_weights(z, y)
    else:
        raise KeyError(name)
    return w, np_mix(z, w, temperature)


# Each entry builds the rule for K teachers.
RULES: dict[str, Callable[[int], FusionRule]] = {
    "mean_probs": lambda k: MeanProbabilities(),
    "mean_logits": lambda k: MeanLogits(),
    "static": lambda k: StaticWeights(static_weights_for(k)),
    "static_uniform": lambda k: StaticWeights(),
    "learned": lambda k: LearnedWeights(num_teachers=k),
    "entropy": lambda k: EntropyWeighted(),
    "entropy_raw": lambda k: EntropyWeighted(normalize=False),
    "entropy_tau": lambda k: EntropyWeighted(tau=0.5),
    "confidence": lambda k: ConfidenceAware(),
    "correct_only": lambda k: CorrectTeachersOnly(),
    "vote": lambda k: MajorityVote(),
}
ALL_RULES: dict[str, Callable[[int], FusionRule]] = {**RULES, "random": lambda k: RandomTeacher()}


def make_batch(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits of the given (K, *batch, C) shape and matching labels."""
    generator = torch.Generator().manual_seed(seed)
    teachers = 2 * torch.randn(shape, generator=generator)
    labels = torch.randint(0, shape[-1], shape[1:-1], generator=generator)
    return teachers, labels


def student_grad(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor
) -> torch.Tensor:
    leaf = student.clone().requires_grad_()
    loss_fn(leaf).backward()
    assert leaf.grad is not None
    return leaf.grad


def per_teacher_kl(
    student: torch.Tensor, teachers: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The "loss" aggregation: mean over positions of Σ_k w_k · kl_T(p_k, s)."""
    per_teacher = torch.stack(
        [
            kl_divergence(student, torch.softmax(z / temperature, -1), temperature, "none")
            for z in teachers
        ],
        dim=-1,
    )
    return (weights * per_teacher).sum(-1).mean()


# --- values against NumPy -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("shape", [(3, 6, 4), (3, 2, 3, 4)], ids=["KBC", "KBLC"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_rule_matches_numpy(name, shape, temperature) -> None:
    teachers, labels = make_batch(shape)
    fusion = RULES[name](shape[0])(teachers, labels, temperature)
    z, y = teachers.double().numpy(), labels.numpy()
    expected_weights, expected_target = np_reference(name, z, y, temperature)
    assert isinstance(fusion, Fusion)
    assert fusion.weights.shape == (*shape[1:-1], shape[0])
    assert fusion.target.shape == shape[1:]
    np.testing.assert_allclose(
        fusion.weights.detach().numpy(), expected_weights, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        fusion.target.detach().numpy(), expected_target, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_random_teacher_returns_the_seeded_teacher(temperature) -> None:
    teachers, _ = make_batch((4, 2, 3, 5))
    for seed in range(6):
        torch.manual_seed(seed)
        expected_index = int(torch.randint(4, ()))
        torch.manual_seed(seed)
        fusion = RandomTeacher()(teachers, temperature=temperature)
        expected_target = np_softmax(teachers[expected_index].double().numpy() / temperature)
        np.testing.assert_allclose(fusion.target.numpy(), expected_target, rtol=1e-5, atol=1e-7)
        expected_weights = np.zeros((2, 3, 4))
        expected_weights[..., expected_index] = 1.0
        np.testing.assert_array_equal(fusion.weights.numpy(), expected_weights)


def test_random_teacher_is_reproducible_and_draws_every_teacher() -> None:
    teachers, _ = make_batch((3, 4, 5))
    rule = RandomTeacher()
    torch.manual_seed(123)
    first = [int(rule(teachers).weights[0].argmax()) for _ in range(30)]
    torch.manual_seed(123)
    second = [int(rule(teachers).weights[0].argmax()) for _ in range(30)]
    assert first == second
    assert set(first) == {0, 1, 2}


# --- hand-computed cases ------------------------------------------------------------------------


def test_entropy_weighted_hand_computed() -> None:
    # Teacher 0 uniform over 4 classes: H = log 4 = 2 log 2. Teacher 1 uniform over 2: H = log 2.
    # Σ H = 3 log 2, so w = (1 - 2/3, 1 - 1/3) = (1/3, 2/3); K - 1 = 1: normalising changes nothing.
    # Target at T = 1: ⅓·(¼, ¼, ¼, ¼) + ⅔·(½, ½, 0, 0) = (5/12, 5/12, 1/12, 1/12).
    teachers = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, -1e4, -1e4]]])
    fusion = EntropyWeighted()(teachers)
    torch.testing.assert_close(fusion.weights, torch.tensor([[1 / 3, 2 / 3]]))
    torch.testing.assert_close(fusion.target, torch.tensor([[5 / 12, 5 / 12, 1 / 12, 1 / 12]]))


def test_entropy_weighted_three_teachers_hand_computed() -> None:
    # H = (log 4, log 2, 0) = (2, 1, 0)·log 2, Σ H = 3 log 2:
    # paper weights (1 - 2/3, 1 - 1/3, 1 - 0) = (1/3, 2/3, 1), summing to 2 = K - 1;
    # normalised by K - 1 = 2: (1/6, 1/3, 1/2).
    teachers = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, -1e4, -1e4]], [[0.0, -1e4, -1e4, -1e4]]]
    )
    torch.testing.assert_close(
        EntropyWeighted(normalize=False)(teachers).weights, torch.tensor([[1 / 3, 2 / 3, 1.0]])
    )
    torch.testing.assert_close(
        EntropyWeighted()(teachers).weights, torch.tensor([[1 / 6, 1 / 3, 1 / 2]])
    )


def test_entropy_weighted_tau_hand_computed() -> None:
    # H = (log 4, log 2), τ = log 2: softmax(-2, -1) = (e⁻², e⁻¹) / (e⁻² + e⁻¹)
    #   = (0.268941, 0.731059).
    teachers = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, -1e4, -1e4]]])
    weights = EntropyWeighted(tau=math.log(2))(teachers).weights
    torch.testing.assert_close(weights, torch.tensor([[0.268941, 0.731059]]))


def test_entropy_weighted_zero_entropy_falls_back_to_uniform() -> None:
    teachers = torch.tensor([[[0.0, -1e4]], [[-1e4, 0.0]], [[0.0, -1e4]]])  # every H = 0
    torch.testing.assert_close(EntropyWeighted()(teachers).weights, torch.full((1, 3), 1 / 3))
    torch.testing.assert_close(
        EntropyWeighted(normalize=False)(teachers).weights, torch.full((1, 3), 2 / 3)
    )


def test_confidence_aware_hand_computed() -> None:
    # Label 0. Teacher 0 logits (0, 0): CE = log 2.
    # Teacher 1 logits (log 3, 0) → p = (¾, ¼): CE = log(4/3).
    # softmax(CE) = (2, 4/3) / (10/3) = (0.6, 0.4); w = (1 - softmax) / (K - 1) = (0.4, 0.6).
    # Target at T = 1: 0.4·(½, ½) + 0.6·(¾, ¼) = (0.65, 0.35).
    teachers = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    fusion = ConfidenceAware()(teachers, torch.tensor([0]))
    torch.testing.assert_close(fusion.weights, torch.tensor([[0.4, 0.6]]))
    torch.testing.assert_close(fusion.target, torch.tensor([[0.65, 0.35]]))


def test_correct_teachers_only_hand_computed_and_fallback() -> None:
    # Sample 0 (label 1): only teacher 1 is right. Sample 1 (label 2): nobody is right → uniform.
    teachers = torch.tensor(
        [[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0], [0.0, 3.0, 0.0]]]
    )
    fusion = CorrectTeachersOnly()(teachers, torch.tensor([1, 2]))
    torch.testing.assert_close(fusion.weights, torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    torch.testing.assert_close(fusion.target[0], torch.softmax(teachers[1, 0], -1))


def test_static_weights_hand_computed() -> None:
    # weights (3, 1) → (¾, ¼); target = ¾·(1, 0) + ¼·(½, ½) = (0.875, 0.125).
    teachers = torch.tensor([[[0.0, -1e4]], [[0.0, 0.0]]])
    fusion = StaticWeights([3, 1])(teachers)
    torch.testing.assert_close(fusion.weights, torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(fusion.target, torch.tensor([[0.875, 0.125]]))


def test_mean_logits_hand_computed() -> None:
    # mean logits = ((2 + 0)/2, (0 + 4)/2) = (1, 2);
    # at T = 2: softmax(0.5, 1) = (1, e^0.5) / (1 + e^0.5) = (0.377541, 0.622459).
    teachers = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]]])
    torch.testing.assert_close(
        MeanLogits()(teachers, temperature=2.0).target, torch.tensor([[0.377541, 0.622459]])
    )


def test_majority_vote_breaks_ties_by_mean_probability() -> None:
    # Two teachers, one vote each for classes 0 and 1; teacher 1 is far more confident,
    # so the mean probability favours class 1 whichever way the teachers are ordered.
    teachers = torch.tensor([[[0.2, 0.0, 0.0]], [[0.0, 5.0, 0.0]]])
    for order in ([0, 1], [1, 0]):
        fusion = MajorityVote()(teachers[order], temperature=4.0)
        torch.testing.assert_close(fusion.target, torch.tensor([[0.0, 1.0, 0.0]]))
        expected_weights = (
            torch.tensor([[0.0, 1.0]]) if order == [0, 1] else torch.tensor([[1.0, 0.0]])
        )
        torch.testing.assert_close(fusion.weights, expected_weights)


def test_majority_vote_agreement() -> None:
    # Votes per sample: (0, 0, 1) → 2/3; (2, 2, 2) → 1.
    teachers = torch.tensor(
        [
            [[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
            [[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
            [[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]],
        ]
    )
    torch.testing.assert_close(MajorityVote().agreement(teachers), torch.tensor([2 / 3, 1.0]))


# --- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_RULES))
def test_weights_non_negative_targets_are_distributions(name) -> None:
    teachers, labels = make_batch((3, 5, 2, 6), seed=4)
    result = ALL_RULES[name](3)(teachers, labels, 2.0)
    assert (result.weights >= 0).all()
    assert (result.target >= 0).all()
    torch.testing.assert_close(result.target.sum(-1), torch.ones(5, 2))
    expected_sum = 2.0 if name == "entropy_raw" else 1.0  # K - 1 for the paper's EBKD scale
    torch.testing.assert_close(result.weights.sum(-1), torch.full((5, 2), expected_sum))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ALL_RULES))
def test_half_precision_inputs_give_float32(name, dtype) -> None:
    teachers, labels = make_batch((3, 4, 5), seed=5)
    fusion = ALL_RULES[name](3)(teachers.to(dtype), labels, 2.0)
    assert fusion.weights.dtype == torch.float32
    assert fusion.target.dtype == torch.float32


@pytest.mark.parametrize("name", list(ALL_RULES))
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_one_teacher_is_hinton_kd(name, temperature) -> None:
    teachers, labels = make_batch((1, 4, 3, 5), seed=6)
    fusion = ALL_RULES[name](1)(teachers, labels, temperature)
    torch.testing.assert_close(fusion.weights, torch.ones(4, 3, 1))
    if name == "vote":  # a single vote is the teacher's hard prediction, by the rule's definition
        expected = F.one_hot(teachers[0].argmax(-1), 5).float()
    else:
        expected = torch.softmax(teachers[0] / temperature, -1)
    torch.testing.assert_close(fusion.target, expected)


@pytest.mark.parametrize("name", list(RULES))
def test_permuting_teachers_permutes_weights_and_keeps_the_target(name) -> None:
    teachers, labels = make_batch((3, 8, 2, 5), seed=7)
    permutation = [2, 0, 1]
    rule = RULES[name](3)
    if name == "static":  # the static weights belong to the teachers and move with them
        permuted_rule = StaticWeights([static_weights_for(3)[i] for i in permutation])
    else:
        permuted_rule = rule
    original = rule(teachers, labels, 2.0)
    permuted = permuted_rule(teachers[permutation], labels, 2.0)
    torch.testing.assert_close(permuted.weights, original.weights[..., permutation])
    torch.testing.assert_close(permuted.target, original.target)


def test_permuting_teachers_under_random_teacher_follows_the_drawn_index() -> None:
    teachers, _ = make_batch((3, 4, 5), seed=8)
    permutation = [2, 0, 1]
    torch.manual_seed(9)
    original = RandomTeacher()(teachers)
    torch.manual_seed(9)
    permuted = RandomTeacher()(teachers[permutation])
    drawn = int(original.weights[0].argmax())
    # Same draw, different teacher behind that index: the target follows the permutation.
    torch.testing.assert_close(permuted.target, torch.softmax(teachers[permutation[drawn]], -1))


# --- identities E1-E3 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mean_probs", "static", "entropy", "entropy_tau", "confidence", "correct_only"]
)
def test_e1_averaging_losses_equals_averaging_probabilities(name) -> None:
    teachers, labels = make_batch((3, 6, 5), seed=10)
    student = torch.randn(6, 5, generator=torch.Generator().manual_seed(11))
    temperature = 3.0
    fusion = RULES[name](3)(teachers, labels, temperature)
    loss_grad = student_grad(
        lambda s: per_teacher_kl(s, teachers, fusion.weights, temperature), student
    )
    target_grad = student_grad(lambda s: kl_divergence(s, fusion.target, temperature), student)
    torch.testing.assert_close(loss_grad, target_grad)


def test_e1_weights_summing_to_w_scale_the_gradient_by_w() -> None:
    teachers, _ = make_batch((3, 6, 5), seed=12)
    student = torch.randn(6, 5, generator=torch.Generator().manual_seed(13))
    fusion = EntropyWeighted(normalize=False)(teachers, temperature=2.0)  # Σ w = K - 1 = 2
    loss_grad = student_grad(lambda s: per_teacher_kl(s, teachers, fusion.weights, 2.0), student)
    target_grad = student_grad(lambda s: kl_divergence(s, fusion.target, 2.0), student)
    torch.testing.assert_close(loss_grad, 2 * target_grad)


def test_e2_mean_logits_is_the_normalised_geometric_mean() -> None:
    teachers, _ = make_batch((4, 3, 2, 6), seed=14)
    temperature = 2.0
    probs = np_softmax(teachers.double().numpy() / temperature)
    geometric = np.exp(np.log(probs).mean(0))
    geometric /= geometric.sum(-1, keepdims=True)
    target = MeanLogits()(teachers, temperature=temperature).target
    np.testing.assert_allclose(target.numpy(), geometric, rtol=1e-5, atol=1e-7)
    arithmetic = MeanProbabilities()(teachers, temperature=temperature).target
    assert not torch.allclose(target, arithmetic, atol=1e-3)  # a different target from E1


def test_e3_random_teacher_is_unbiased_for_the_mean_probabilities_gradient(monkeypatch) -> None:
    num_teachers, temperature = 4, 3.0
    teachers, _ = make_batch((num_teachers, 6, 5), seed=15)
    student = torch.randn(6, 5, generator=torch.Generator().manual_seed(16))
    rule = RandomTeacher()
    grads = []
    for index in range(num_teachers):
        draw = torch.tensor(index)
        monkeypatch.setattr(torch, "randint", lambda high, size, device=None, draw=draw: draw)
        target = rule(teachers, temperature=temperature).target
        grads.append(
            student_grad(lambda s, target=target: kl_divergence(s, target, temperature), student)
        )
    mean_target = MeanProbabilities()(teachers, temperature=temperature).target
    mean_grad = student_grad(lambda s: kl_divergence(s, mean_target, temperature), student)
    torch.testing.assert_close(torch.stack(grads).mean(0), mean_grad)


# --- StaticWeights ------------------------------------------------------------------------------


def test_learned_weights_get_a_gradient_and_live_in_state_dict() -> None:
    rule = LearnedWeights(weights=[1.0, 3.0])
    parameters = list(rule.parameters())
    assert len(parameters) == 1 and parameters[0] is rule.weight_logits
    assert "weight_logits" in rule.state_dict()
    teachers, _ = make_batch((2, 4, 3), seed=17)
    fusion = rule(teachers, temperature=2.0)
    torch.testing.assert_close(fusion.weights, torch.tensor([[0.25, 0.75]]).expand(4, 2))
    student = torch.randn(4, 3, generator=torch.Generator().manual_seed(18))
    kl_divergence(student, fusion.target, 2.0).backward()
    assert rule.weight_logits is not None and rule.weight_logits.grad is not None
    assert rule.weight_logits.grad.abs().sum() > 0


def test_fixed_static_weights_have_no_parameters_and_no_state() -> None:
    rule = StaticWeights([1.0, 1.0])
    assert list(rule.parameters()) == []
    assert rule.state_dict() == {}


def test_static_weights_without_weights_are_uniform_for_any_k() -> None:
    teachers, _ = make_batch((4, 2, 3), seed=19)
    torch.testing.assert_close(StaticWeights()(teachers).weights, torch.full((2, 4), 0.25))
    torch.testing.assert_close(
        StaticWeights(num_teachers=4)(teachers).weights, torch.full((2, 4), 0.25)
    )


# --- errors -------------------------------------------------------------------------------------


def test_wrong_number_of_static_weights_names_both_numbers() -> None:
    teachers, _ = make_batch((2, 4, 3))
    with pytest.raises(
        ValueError, match=r"StaticWeights has 3 weights but teacher_logits has K = 2"
    ):
        StaticWeights([1.0, 1.0, 1.0])(teachers)
    with pytest.raises(
        ValueError, match=r"LearnedWeights has 3 weights but teacher_logits has K = 2"
    ):
        LearnedWeights(num_teachers=3)(teachers)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0, -0.5]}, "non-negative"),
        ({"weights": [0.0, 0.0]}, "must not all be zero"),
        ({"weights": []}, "must not be empty"),
        ({"weights": [1.0, 2.0], "num_teachers": 3}, r"got 2 weights but num_teachers = 3"),
        ({"num_teachers": 0}, r"num_teachers must be >= 1"),
    ],
)
def test_bad_static_weights_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        StaticWeights(**kwargs)
    with pytest.raises(ValueError, match=message):
        LearnedWeights(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0, 0.0]}, r"every weight must be > 0"),
        ({}, r"needs `num_teachers` or starting `weights`"),
    ],
)
def test_learned_weights_need_positive_starting_weights(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LearnedWeights(**kwargs)


@pytest.mark.parametrize("rule", [ConfidenceAware, CorrectTeachersOnly])
def test_missing_labels_name_the_rule(rule) -> None:
    teachers, _ = make_batch((2, 4, 3))
    with pytest.raises(ValueError, match=rf"{rule.__name__} needs labels"):
        rule()(teachers)


def test_bad_inputs_to_forward_are_refused() -> None:
    teachers, labels = make_batch((2, 4, 3))
    with pytest.raises(
        ValueError,
        match=r"MeanProbabilities: teacher_logits must have shape \(K, \*batch, C\).*\(4, 3\)",
    ):
        MeanProbabilities()(teachers[0])
    with pytest.raises(ValueError, match=r"labels shape \(3,\) must equal the batch shape \(4,\)"):
        ConfidenceAware()(teachers, labels[:3])
    with pytest.raises(ValueError, match="integer class indices"):
        CorrectTeachersOnly()(teachers, labels.float())
    with pytest.raises(ValueError, match=r"EntropyWeighted: temperature must be > 0, got 0.0"):
        EntropyWeighted()(teachers, temperature=0.0)


def test_bad_entropy_options_are_refused() -> None:
    with pytest.raises(ValueError, match="tau must be > 0"):
        EntropyWeighted(tau=0.0)
    with pytest.raises(ValueError, match="normalize=False only applies"):
        EntropyWeighted(tau=1.0, normalize=False)


# --- registry -----------------------------------------------------------------------------------


def test_registry_holds_every_rule() -> None:
    expected = {
        "mean_probs": MeanProbabilities,
        "mean_logits": MeanLogits,
        "static": StaticWeights,
        "entropy": EntropyWeighted,
        "confidence": ConfidenceAware,
        "correct_only": CorrectTeachersOnly,
        "vote": MajorityVote,
        "random": RandomTeacher,
        "aekd": GradientSpaceWeights,
        "learned_gate": LearnedGate,
        "learned": LearnedWeights,
        "routed": RoutedTeachers,
    }
    library = {
        name: rule
        for name, rule in FUSION_RULES.items()
        if rule.__module__.startswith("kd_lightning.")
    }
    assert expected == library
    assert all(issubclass(rule, FusionRule) for rule in FUSION_RULES.values())


def test_build_fusion_passes_kwargs_and_refuses_unknown_names() -> None:
    rule = build_fusion("entropy", tau=0.5)
    assert isinstance(rule, EntropyWeighted) and rule.tau == 0.5
    assert isinstance(build_fusion("vote"), MajorityVote)
    with pytest.raises(
        ValueError, match=r"unknown fusion rule 'median'; known rules: \[.*'mean_probs'"
    ):
        build_fusion("median")


def test_fusion_rule_is_abstract() -> None:
    with pytest.raises(TypeError):
        FusionRule()  # type: ignore[abstract]


# --- teachers that ran: a subset, by index ------------------------------------------------------


def test_per_teacher_rules_read_the_teachers_that_ran() -> None:
    teachers, _ = make_batch((2, 4, 3), seed=21)  # the rows are teachers 2 and 0 of three
    static = StaticWeights([1.0, 2.0, 3.0])(teachers, teacher_indices=(2, 0)).weights
    torch.testing.assert_close(static, torch.tensor([[0.75, 0.25]]).expand(4, 2))
    learned = LearnedWeights(weights=[1.0, 2.0, 3.0])
    weights = learned(teachers, teacher_indices=(2, 0)).weights
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25]]).expand(4, 2))
    gate = LearnedGate(num_teachers=3, feature_dim=3)
    with torch.no_grad():
        gate.gate.normal_()
    student = torch.randn(4, 3)
    subset = gate(teachers, student_logits=student, teacher_indices=(2, 0)).weights
    full = gate(torch.cat([teachers[1:], teachers[:1], teachers[:1]]), student_logits=student)
    expected = full.weights[:, [2, 0]] / full.weights[:, [2, 0]].sum(-1, keepdim=True)
    torch.testing.assert_close(subset, expected)
    with pytest.raises(ValueError, match=r"teacher_indices \[1\] name 1 teachers but .* K = 2"):
        StaticWeights()(teachers, teacher_indices=(1,))


# --- penalties of learned rules ----------------------------------------------------------------


def test_learned_rules_add_their_l2_penalty_to_the_loss() -> None:
    generator = torch.Generator().manual_seed(23)
    student = torch.randn(4, 3, generator=generator)
    teachers, labels = torch.randn(2, 4, 3, generator=generator), torch.tensor([0, 1, 2, 0])
    learned = LearnedWeights(weights=[1.0, 3.0], l2=0.5)
    theta = torch.log(torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(learned.penalty(), 0.5 * (theta**2).sum())
    plain = DistillationLoss(LearnedWeights(weights=[1.0, 3.0]))(student, teachers, labels).loss
    with_penalty = DistillationLoss(learned)(student, teachers, labels).loss
    torch.testing.assert_close(with_penalty - plain, 0.5 * (theta**2).sum())
    gate = LearnedGate(num_teachers=2, l2=0.1)
    assert gate.penalty() == 0.0  # nothing to penalise before the parameters exist
    gate(teachers, student_logits=student)
    expected = 0.1 * (gate.gate.square().sum() + gate.theta.square().sum())
    torch.testing.assert_close(gate.penalty(), expected)
    penalty = gate.penalty()
    assert isinstance(penalty, torch.Tensor)
    penalty.backward()
    assert gate.theta.grad is not None and gate.theta.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        LearnedWeights(num_teachers=2, l2=-1.0)


# --- learned rules' own optimizer and training window ----------------------------------------


def test_learned_weights_take_the_gates_optimizer_and_window_options(tmp_path) -> None:
    from functools import partial

    from hydra.utils import instantiate

    from .app_helpers import compose_config

    assert LearnedWeights(num_teachers=3).own_optimizer is None  # the student's, throughout
    rule = LearnedWeights(
        num_teachers=3,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        lr_milestones=[40, 50],
        train_epochs=80,
    )
    plan = rule.own_optimizer
    assert plan is not None and plan.milestones == (40, 50) and plan.epochs == 80
    assert [plan.learning_rate_factor(e) for e in (0, 45, 60, 80)] == pytest.approx(
        [1.0, 0.1, 0.01, 0.0]
    )
    with pytest.raises(ValueError, match="LearnedWeights: lr_milestones and train_epochs need"):
        LearnedWeights(num_teachers=3, train_epochs=10)
    configured = instantiate(compose_config(tmp_path, ["fusion=learned"]).fusion)
    assert configured.l2 == 0.5 and configured.own_optimizer is not None
    assert configured.own_optimizer.epochs == 80
    assert configured.own_optimizer.milestones == (40, 50)


def test_learned_weights_train_with_their_own_optimizer_during_their_window_only(
    tmp_path, teachers, datamodule
) -> None:
    from functools import partial

    from lightning.pytorch import Callback

    from kd_lightning import DistillationModule
    from kd_lightning.modules.optim import JointOptimizer

    from .conftest import make_trainer, small_mlp

    class Snapshots(Callback):
        def __init__(self) -> None:
            self.values: list[torch.Tensor] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.values.append(pl_module.loss.fusion.weight_logits.detach().clone())

    rule = LearnedWeights(
        num_teachers=len(teachers), optimizer=partial(torch.optim.SGD, lr=0.5), train_epochs=1
    )
    module = DistillationModule(small_mlp(), teachers, DistillationLoss(rule, alpha=1.0))
    initial = rule.weight_logits.detach().clone()
    snapshots = Snapshots()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[snapshots])
    trainer.fit(module, datamodule=datamodule)
    joint = trainer.optimizers[0]
    assert isinstance(joint, JointOptimizer) and isinstance(joint.optimizers[1], torch.optim.SGD)
    assert joint.optimizers[1].param_groups[0]["params"] == [rule.weight_logits]
    after_window, after_run = snapshots.values
    assert not torch.equal(after_window, initial)  # trained during epoch 0
    torch.testing.assert_close(after_run, after_window, rtol=0, atol=0)  # frozen in epoch 1
