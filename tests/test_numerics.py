"""Property tests: the distillation objective stays finite and float32 on extreme inputs.

Every divergence is combined with every registered fusion rule and both aggregations, on logits
up to 1e4 in magnitude, near-one-hot and identical teachers, and temperatures from 0.05 to 100.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_lightning.fusion import (
    FUSION_RULES,
    EntropyWeighted,
    FusionRule,
    GradientSpaceWeights,
    LearnedGate,
    LearnedWeights,
    StaticWeights,
)
from kd_lightning.losses.distillation import DIVERGENCES, DistillationLoss

from .reference import library_rules_on_logits

AGGREGATIONS = ("target", "loss")
# Every registered rule sums its weights to one with its default arguments; the paper's EBKD
# scale (``normalize=False``) sums to K - 1 instead.
SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: with several threads, OpenMP start-up costs 10-20x the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_rule(name: str, num_teachers: int, num_classes: int) -> FusionRule:
    if name == "static":
        return StaticWeights(num_teachers=num_teachers)
    if name == "learned":
        return LearnedWeights(num_teachers=num_teachers)
    if name == "learned_gate":
        return LearnedGate(num_teachers=num_teachers, feature_dim=num_classes)
    if name == "aekd":
        # The default cap 0.6 is feasible for every K ≥ 2 (0.6·K ≥ 1); K = 1 gets weight 1.
        return GradientSpaceWeights()
    return FUSION_RULES[name]()


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """Student/teacher logits, labels and a temperature, in one of several extreme regimes."""
    num_teachers = draw(st.integers(1, 4))
    num_classes = draw(st.integers(2, 12))
    batch = draw(st.integers(1, 4))
    temperature = draw(
        st.one_of(
            st.sampled_from([0.05, 1.0, 100.0]),
            st.floats(0.05, 100.0, allow_nan=False, allow_infinity=False),
        )
    )
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e3, 1e4]))
    regime = draw(st.sampled_from(["random", "one_hot", "identical", "identical_one_hot"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def random_logits(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1) * scale

    student = random_logits(batch, num_classes)
    if draw(st.booleans()):  # a near-one-hot student too
        student = one_hot_logits(batch, num_classes, generator)
    if regime == "random":
        teachers = random_logits(num_teachers, batch, num_classes)
    elif regime == "one_hot":
        teachers = one_hot_logits(num_teachers * batch, num_classes, generator)
        teachers = teachers.reshape(num_teachers, batch, num_classes)
    elif regime == "identical":
        teachers = random_logits(1, batch, num_classes).expand(num_teachers, -1, -1).clone()
    else:
        teachers = one_hot_logits(batch, num_classes, generator).expand(num_teachers, -1, -1)
        teachers = teachers.clone()
    labels = torch.randint(num_classes, (batch,), generator=generator)
    return dict(
        student=student,
        teachers=teachers,
        labels=labels,
        temperature=temperature,
        num_teachers=num_teachers,
        num_classes=num_classes,
    )


def one_hot_logits(rows: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """One logit at +1e4, the others at 0, per row."""
    hot = torch.randint(num_classes, (rows,), generator=generator)
    return torch.nn.functional.one_hot(hot, num_classes).float() * 1e4


def every_loss(
    rule: FusionRule, temperature: float, **options: float
) -> Iterator[tuple[str, DistillationLoss]]:
    """``DistillationLoss`` of ``rule`` with every divergence and aggregation, named by both."""
    for divergence in DIVERGENCES:
        for aggregation in AGGREGATIONS:
            loss = DistillationLoss(
                rule,
                temperature=temperature,
                divergence=divergence,
                aggregation=aggregation,
                **options,
            )
            yield f"{divergence}/{aggregation}", loss


def check_weights(name: str, weights: torch.Tensor) -> None:
    assert weights.dtype == torch.float32, name
    assert torch.isfinite(weights).all(), (name, weights)
    assert (weights >= 0).all(), (name, weights)
    torch.testing.assert_close(
        weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0, msg=name
    )


@pytest.mark.parametrize("rule_name", library_rules_on_logits())
@SETTINGS
@given(problem=problems())
def test_loss_and_student_gradient_are_finite(rule_name: str, problem: dict) -> None:
    rule = make_rule(rule_name, problem["num_teachers"], problem["num_classes"])
    for name, loss in every_loss(rule, problem["temperature"], alpha=0.9):
        case = f"{rule_name}/{name} T={problem['temperature']}"
        student = problem["student"].clone().requires_grad_(True)
        out = loss(student, problem["teachers"], problem["labels"])
        for term in ("loss", "hard", "soft"):
            value = getattr(out, term)
            assert value.dtype == torch.float32, case
            assert torch.isfinite(value), (case, term, value)
        # The KD term alone: the CE gradient is finite anyway, so test what distillation adds.
        (gradient,) = torch.autograd.grad(out.soft, student)
        assert torch.isfinite(gradient).all(), (case, gradient)
        check_weights(case, out.weights)


@SETTINGS
@given(problem=problems())
def test_fusion_weights_are_non_negative_finite_and_normalised(problem: dict) -> None:
    k, c = problem["num_teachers"], problem["num_classes"]
    for name in library_rules_on_logits():
        fusion = make_rule(name, k, c)(
            problem["teachers"],
            problem["labels"],
            problem["temperature"],
            student_logits=problem["student"],
        )
        check_weights(name, fusion.weights)
        assert torch.isfinite(fusion.target).all(), name
        assert (fusion.target >= 0).all(), name
        torch.testing.assert_close(
            fusion.target.sum(-1), torch.ones(fusion.target.shape[:-1]), atol=1e-5, rtol=0
        )
    # The paper's EBKD scale: non-negative, finite, summing to K - 1 (1 for a single teacher).
    weights = EntropyWeighted(normalize=False)(problem["teachers"]).weights
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    torch.testing.assert_close(
        weights.sum(-1), torch.full(weights.shape[:-1], float(max(k - 1, 1))), atol=1e-4, rtol=0
    )
    weights = EntropyWeighted(tau=0.5)(problem["teachers"]).weights
    check_weights("entropy(tau=0.5)", weights)


def rounded_problem(problem: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The problem's logits rounded to ``dtype`` (magnitudes ≤ 1e4 fit in float16)."""
    return problem["student"].to(dtype), problem["teachers"].to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(SETTINGS, max_examples=25)
@given(
    problem=problems(),
    rule_name=st.sampled_from(library_rules_on_logits()),
    autocast=st.booleans(),
)
def test_low_precision_logits_give_the_float32_kd_term(
    dtype: torch.dtype, problem: dict, rule_name: str, autocast: bool
) -> None:
    """Half-precision logits, cast or under CPU autocast, give the float32 result on the same
    (rounded) values: the loss runs in float32 whatever the inputs' dtype."""
    student, teachers = rounded_problem(problem, dtype)
    rule = make_rule(rule_name, problem["num_teachers"], problem["num_classes"])
    for name, loss in every_loss(rule, problem["temperature"]):
        case = f"{rule_name}/{name} {dtype} T={problem['temperature']}"
        low_student = student.clone().requires_grad_(True)
        torch.manual_seed(0)  # the random-teacher rule draws the same teacher twice
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            low = loss(low_student, teachers, problem["labels"])
        torch.manual_seed(0)
        high_student = student.float().requires_grad_(True)
        high = loss(high_student, teachers.float(), problem["labels"])
        for term in ("loss", "hard", "soft"):
            assert getattr(low, term).dtype == torch.float32, (case, term)
            torch.testing.assert_close(
                getattr(low, term), getattr(high, term), rtol=1e-6, atol=1e-6, msg=case
            )
        assert low.weights.dtype == torch.float32, case
        torch.testing.assert_close(low.weights, high.weights, rtol=1e-6, atol=1e-7)
        (low_grad,) = torch.autograd.grad(low.soft, low_student)
        (high_grad,) = torch.autograd.grad(high.soft, high_student)
        assert low_grad.dtype == dtype, case
        assert torch.isfinite(low_grad).all(), case
        torch.testing.assert_close(low_grad, high_grad.to(dtype), msg=case)
