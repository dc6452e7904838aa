"""ChunkedDistillationLoss: equal to DistillationLoss, with memory that hardly grows with K."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from kd_lightning.fusion import (
    FUSION_RULES,
    FusionRule,
    GradientSpaceWeights,
    LearnedGate,
    LearnedWeights,
    StaticWeights,
)
from kd_lightning.losses import DistillationLoss
from kd_lightning.losses.chunked import ChunkedDistillationLoss
from kd_lightning.models.taps import FeatureTaps

from .reference import library_rules_on_logits

LIBRARY_RULES = library_rules_on_logits()
DIVERGENCES = ("kl", "reverse_kl", "js", "soft_ce", "mse")
K, B, L, V = 3, 2, 5, 13


def make_rule(name: str) -> FusionRule:
    special = {
        "static": lambda: StaticWeights([1.0, 2.0, 3.0]),
        "learned": lambda: LearnedWeights(weights=[1.0, 2.0, 3.0]),
        "learned_gate": lambda: LearnedGate(num_teachers=K, feature_dim=V),
        "aekd": lambda: GradientSpaceWeights(),
    }
    return special.get(name, FUSION_RULES[name])()


def problem(padded: bool, seed: int = 0, shape: tuple[int, ...] = (B, L)):
    generator = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(*shape, V, generator=generator)).requires_grad_(True)
    teachers = 3 * torch.randn(K, *shape, V, generator=generator)
    labels = torch.randint(0, V, shape, generator=generator)
    if padded:
        labels.view(-1)[-4:] = -100
        labels.view(-1)[1] = -100
    return student, teachers, labels


def evaluate(loss, rule, student, teachers, labels, seed=0, **kwargs):
    """The output and the gradients w.r.t. the student and the rule's parameters."""
    torch.manual_seed(seed)  # the random rule draws from the global generator
    out = loss(student, teachers, labels, **kwargs)
    parameters = [p for p in rule.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, [student, *parameters])
    return out, grads


def assert_same(chunked, plain):
    (out_c, grads_c), (out_p, grads_p) = chunked, plain
    for name in ("loss", "hard", "soft"):
        torch.testing.assert_close(getattr(out_c, name), getattr(out_p, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_c.weights, out_p.weights.detach(), rtol=1e-5, atol=1e-6)
    assert (out_c.real is None) == (out_p.real is None)
    if out_c.real is not None:
        assert torch.equal(out_c.real, out_p.real)
    for grad_c, grad_p in zip(grads_c, grads_p, strict=True):
        torch.testing.assert_close(grad_c, grad_p, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["target", "loss"])
@pytest.mark.parametrize("name", LIBRARY_RULES)
def test_equal_to_the_unchunked_loss(name, aggregation):
    rule = make_rule(name)
    for divergence in DIVERGENCES:
        for padded in (False, True):
            options = dict(
                alpha=0.7, temperature=2.0, divergence=divergence, aggregation=aggregation
            )
            plain = DistillationLoss(rule, **options)
            chunked = ChunkedDistillationLoss(rule, chunk_tokens=3, **options)
            student, teachers, labels = problem(padded)
            assert_same(
                evaluate(chunked, rule, student, teachers, labels),
                evaluate(plain, rule, student, teachers, labels),
            )


@pytest.mark.parametrize("chunk_tokens", [1, 4, 10, 64, None])
@pytest.mark.parametrize("shift", [False, True])
def test_any_chunk_size_and_the_probability_shift(chunk_tokens, shift):
    rule = make_rule("confidence")
    options = dict(divergence="js", probability_shift=shift)
    student, teachers, labels = problem(padded=True, seed=1)
    assert_same(
        evaluate(
            ChunkedDistillationLoss(rule, chunk_tokens=chunk_tokens, **options),
            rule,
            student,
            teachers,
            labels,
        ),
        evaluate(DistillationLoss(rule, **options), rule, student, teachers, labels),
    )


@pytest.mark.parametrize("gram", ["batch_mean", "flattened"])
@pytest.mark.parametrize("padded", [False, True])
def test_aekd_accumulates_its_gram_matrix_over_the_chunks(gram, padded):
    rule = GradientSpaceWeights(max_weight=0.6, gram=gram)
    student, teachers, labels = problem(padded, seed=2)
    teachers[0] = student.detach() + 0.1 * teachers[0]  # a teacher close to the student
    chunked = evaluate(
        ChunkedDistillationLoss(rule, aggregation="loss", chunk_tokens=2),
        rule,
        student,
        teachers,
        labels,
    )
    plain = evaluate(DistillationLoss(rule, aggregation="loss"), rule, student, teachers, labels)
    assert_same(chunked, plain)
    assert chunked[0].weights.amax() == pytest.approx(0.6)  # the cap binds: weights are not uniform


def test_the_random_teacher_is_drawn_once_per_call():
    rule = make_rule("random")
    loss = ChunkedDistillationLoss(rule, chunk_tokens=1)
    student, teachers, labels = problem(padded=False)
    for seed in range(4):
        out, _ = evaluate(loss, rule, student, teachers, labels, seed=seed)
        assert (out.weights == out.weights[0, 0]).all()  # the same teacher at every position


@pytest.mark.parametrize("name", ["learned", "learned_gate"])
def test_learned_rules_receive_their_gradients_through_backward(name):
    rule = make_rule(name)
    student, teachers, labels = problem(padded=True)
    out = ChunkedDistillationLoss(rule, chunk_tokens=2)(student, teachers, labels)
    out.loss.backward()
    plain_rule = make_rule(name)
    plain_rule.load_state_dict(rule.state_dict())
    DistillationLoss(plain_rule)(student.detach(), teachers, labels).loss.backward()
    for chunked, plain in zip(rule.parameters(), plain_rule.parameters(), strict=True):
        assert chunked.grad is not None and chunked.grad.abs().amax() > 0
        torch.testing.assert_close(chunked.grad, plain.grad, rtol=1e-4, atol=1e-7)
    assert not out.weights.requires_grad  # returned detached


def test_a_lazy_gate_is_created_before_the_chunks_and_trained():
    torch.manual_seed(3)
    rule = LearnedGate(num_teachers=K)  # feature_dim inferred from the student's logits
    student, teachers, labels = problem(padded=False)
    ChunkedDistillationLoss(rule, chunk_tokens=4)(student, teachers, labels).loss.backward()
    assert rule.theta.shape == (K, V) and rule.theta.grad is not None


def test_a_gate_on_student_features_chunks_them_with_the_samples():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, V))
    rule = LearnedGate(num_teachers=K, feature_dim=8, student_layer="1")
    inputs, teachers = torch.randn(10, 6), torch.randn(K, 10, V)
    labels = torch.randint(0, V, (10,))
    results = []
    for loss in (ChunkedDistillationLoss(rule, chunk_tokens=3), DistillationLoss(rule)):
        with FeatureTaps(net, rule.student_layers) as taps:
            logits = net(inputs)
        out = loss(logits, teachers, labels, student_features=taps.features)
        params = [*net.parameters(), *rule.parameters()]
        results.append((out, torch.autograd.grad(out.loss, params)))
    assert_same(*results)


def test_a_gate_on_student_features_is_refused_at_token_level():
    rule = LearnedGate(num_teachers=K, feature_dim=4, student_layer="hidden")
    student, teachers, labels = problem(padded=False)
    features = {"hidden": torch.randn(B, L, 4)}
    with pytest.raises(ValueError, match="cannot chunk LearnedGate"):
        ChunkedDistillationLoss(rule)(student, teachers, labels, student_features=features)


def test_teacher_logits_that_require_grad_receive_it():
    rule = make_rule("entropy")
    student, teachers, labels = problem(padded=True)
    teachers.requires_grad_(True)
    grads = []
    for loss in (ChunkedDistillationLoss(rule, chunk_tokens=3), DistillationLoss(rule)):
        grads.append(torch.autograd.grad(loss(student, teachers, labels).loss, [student, teachers]))
    for chunked, plain in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=1e-7)


def test_a_chunk_that_wants_no_gradient_leaves_zeros():
    """A vote's one-hot target carries no gradient to the teachers, and the student wants none."""
    student, teachers, labels = problem(padded=False)
    teachers.requires_grad_(True)
    loss = ChunkedDistillationLoss("vote", alpha=1.0, chunk_tokens=4)
    loss(student.detach(), teachers, labels).loss.backward()
    assert teachers.grad is not None and not teachers.grad.any()


def test_low_precision_logits_get_gradients_of_their_dtype():
    student, teachers, labels = problem(padded=True)
    student = student.detach().bfloat16().requires_grad_(True)
    teachers = teachers.bfloat16()
    grads = []
    for loss in (ChunkedDistillationLoss(chunk_tokens=3), DistillationLoss()):
        out = loss(student, teachers, labels)
        assert out.loss.dtype == torch.float32
        grads.append(torch.autograd.grad(out.loss, student)[0])
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0], grads[1])


def test_without_grad_and_with_classification_logits():
    student, teachers, labels = problem(padded=False, shape=(7,))
    with torch.no_grad():
        chunked = ChunkedDistillationLoss(chunk_tokens=2)(student, teachers, labels)
    torch.testing.assert_close(chunked.loss, DistillationLoss()(student, teachers, labels).loss)
    assert chunked.weights.shape == (7, K)


def test_bad_chunk_tokens_are_named():
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkedDistillationLoss(chunk_tokens=0)


def peak_bytes(step) -> int:
    """The most bytes that ``step`` held allocated at once, beyond what existed before it.

    The profiler records every allocation and free of torch's CPU allocator (``[memory]`` events,
    signed sizes); their running sum in time order is the memory ``step`` added, its maximum the
    peak. Sizes are exact and the order deterministic, unlike RSS.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def kd_peak(num_teachers: int, tokens: int, loss: nn.Module, vocab: int = 8192) -> int:
    """Peak extra memory of a forward and backward pass on logits the caller already holds."""
    generator = torch.Generator().manual_seed(num_teachers)
    student = torch.randn(tokens, vocab, generator=generator).requires_grad_(True)
    teachers = torch.randn(num_teachers, tokens, vocab, generator=generator)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[-7:] = -100

    def step() -> None:
        loss(student, teachers, labels).loss.backward()

    return peak_bytes(step)


def test_memory_for_three_teachers_is_within_1_2_times_one_teachers():
    """V = 8192 and N = 1024 positions in 32-token chunks: the gradient (N·V floats, 32 MiB)
    dominates, and three teachers add little to it."""
    loss = ChunkedDistillationLoss("mean_probs", chunk_tokens=32)
    one, three = kd_peak(1, 1024, loss), kd_peak(3, 1024, loss)
    gradient = 1024 * 8192 * 4
    assert gradient <= one < 1.5 * gradient
    assert three <= 1.2 * one, (one / 2**20, three / 2**20)


@pytest.mark.slow
def test_memory_at_sixteen_sequences_of_256_tokens():
    """N = 16·256, V = 8192, automatic chunks: the bound of the issue, and far below the
    unchunked loss (which materialises several K·N·V tensors)."""
    tokens = 16 * 256
    one = kd_peak(1, tokens, ChunkedDistillationLoss("mean_probs"))
    three = kd_peak(3, tokens, ChunkedDistillationLoss("mean_probs"))
    assert three <= 1.2 * one, (one / 2**20, three / 2**20)
    plain = kd_peak(3, tokens, DistillationLoss("mean_probs"))
    assert three < plain / 4, (three / 2**20, plain / 2**20)
