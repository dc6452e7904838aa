"""The KD term from top-k teacher outputs equals the one from their dense expansion, unexpanded."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.callbacks import TeacherAgreementCallback
from kd_lightning.fusion import LearnedWeights, StaticWeights, build_fusion
from kd_lightning.losses import ChunkedDistillationLoss
from kd_lightning.losses import chunked as chunked_module
from kd_lightning.losses import distillation as distillation_module
from kd_lightning.losses import sparse as sparse_module
from kd_lightning.metrics import agreement as agreement_module
from kd_lightning.teachers.cache import sequence_store
from kd_lightning.teachers.cache import topk as topk_module
from kd_lightning.teachers.cache.sequence_store import SequenceCachedTeachers
from kd_lightning.teachers.cache.topk import (
    TopKLogits,
    TopKTeacherOutputs,
    compress_topk,
    expand_topk,
)

from .conftest import make_trainer
from .test_sequence_cache import L, blocks, build, ensemble, lm

K, B, SEQ, V = 3, 2, 7, 40


def teachers_topk(top_k: int, seed: int = 0, scale: float = 3.0) -> TopKLogits:
    """K teachers' top-k outputs over (B, SEQ) positions, each teacher with its own top-k ids."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(K, B, SEQ, V, generator=generator)
    return compress_topk(logits, top_k)


def batch(seed: int = 1, padded: bool = True) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(B, SEQ, V, generator=generator)
    labels = torch.randint(0, V, (B, SEQ), generator=generator)
    if padded:
        labels[0, :2] = -100
        labels[1, 5:] = -100
    return student, labels


RULES = {
    "mean_probs": lambda: build_fusion("mean_probs"),
    "static": lambda: StaticWeights([3.0, 1.0, 2.0]),
    "learned": lambda: LearnedWeights(num_teachers=K),
    "entropy": lambda: build_fusion("entropy"),
    "entropy_tau": lambda: build_fusion("entropy", tau=0.5),
    "confidence": lambda: build_fusion("confidence"),
}


def compare(loss: DistillationLoss, topk: TopKLogits, student: Tensor, labels: Tensor) -> None:
    """The loss and its parts, the weights and every gradient agree to 1e-5, sparse and dense."""
    outputs, grads = [], []
    for teachers in (topk, expand_topk(topk)):
        leaf = student.clone().requires_grad_()
        out = loss(leaf, teachers, labels)
        wanted = [leaf, *(p for p in loss.parameters() if p.requires_grad)]
        grads.append(torch.autograd.grad(out.loss, wanted))
        outputs.append(out)
    sparse, dense = outputs
    for name in ("loss", "hard", "soft", "weights"):
        torch.testing.assert_close(
            getattr(sparse, name), getattr(dense, name), atol=1e-5, rtol=1e-5, msg=name
        )
    assert (sparse.real is None) == (dense.real is None)
    if dense.real is not None:
        assert torch.equal(sparse.real, dense.real)
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("divergence", ["kl", "soft_ce"])
@pytest.mark.parametrize("aggregation", ["target", "loss"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_sparse_term_equals_the_dense_expansion(rule, divergence, aggregation, temperature):
    topk = teachers_topk(top_k=6)
    assert not torch.equal(topk.indices[0], topk.indices[1])  # different id sets per teacher
    loss = DistillationLoss(
        RULES[rule](),
        alpha=0.7,
        temperature=temperature,
        divergence=divergence,
        aggregation=aggregation,
    )
    assert loss.accepts_topk
    compare(loss, topk, *batch())


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("top_k", [1, 13, V])
def test_every_k_with_and_without_padding(top_k, padded):
    loss = DistillationLoss("mean_probs", alpha=0.5, temperature=4.0)
    compare(loss, teachers_topk(top_k, seed=top_k), *batch(padded=padded))


def test_a_tail_of_no_mass_and_ids_in_any_order():
    topk = teachers_topk(top_k=5)
    order = torch.randperm(5)  # the store reads ids ascending, compress_topk by value
    topk = TopKLogits(
        topk.values[..., order],
        topk.indices[..., order],
        torch.full_like(topk.tail_logsumexp, -math.inf),  # every other logit at -inf
        V,
    )
    for divergence in ("kl", "soft_ce"):
        loss = DistillationLoss("entropy", alpha=0.5, temperature=2.0, divergence=divergence)
        compare(loss, topk, *batch())


@pytest.mark.parametrize(
    "options",
    [
        {"fusion": "mean_logits"},
        {"fusion": "vote"},
        {"fusion": "mean_probs", "divergence": "js"},
        {"fusion": "mean_probs", "divergence": "reverse_kl"},
        {"fusion": "mean_probs", "divergence": "mse"},
        {"fusion": "mean_probs", "probability_shift": True},
    ],
)
def test_other_rules_and_divergences_expand_to_the_dense_path(options):
    loss = DistillationLoss(alpha=0.5, temperature=2.0, **options)
    assert not loss.accepts_topk
    compare(loss, teachers_topk(top_k=6), *batch())


def test_a_subclass_of_a_sparse_rule_keeps_the_dense_path():
    class Sharper(type(build_fusion("mean_probs"))):
        pass

    assert not DistillationLoss(Sharper()).accepts_topk


def test_the_chunked_loss_takes_the_sparse_path_or_expands():
    topk, (student, labels) = teachers_topk(top_k=6), batch()
    for fusion in ("entropy", "mean_logits"):
        chunked = ChunkedDistillationLoss(fusion, alpha=0.6, temperature=2.0, chunk_tokens=5)
        plain = DistillationLoss(fusion, alpha=0.6, temperature=2.0)
        leaf = student.clone().requires_grad_()
        got = chunked(leaf, topk, labels)
        (grad,) = torch.autograd.grad(got.loss, leaf)
        reference = student.clone().requires_grad_()
        expected = plain(reference, expand_topk(topk), labels)
        (expected_grad,) = torch.autograd.grad(expected.loss, reference)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_the_sparse_path_never_expands(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("expanded")

    monkeypatch.setattr(distillation_module, "expand_topk", refuse)
    DistillationLoss("confidence")(*batch()[:1], teachers_topk(4), batch()[1])
    with pytest.raises(AssertionError, match="expanded"):
        DistillationLoss("mean_logits")(*batch()[:1], teachers_topk(4), batch()[1])


def test_top_k_outputs_of_another_shape_are_refused():
    student, labels = batch()
    topk = teachers_topk(top_k=6)
    with pytest.raises(ValueError, match="41 classes but the teachers' top-k outputs 40"):
        DistillationLoss()(torch.zeros(B, SEQ, V + 1), topk, labels)
    short = TopKLogits(topk.values[:, :1], topk.indices[:, :1], topk.tail_logsumexp[:, :1], V)
    with pytest.raises(ValueError, match=r"got values \(3, 1, 7, 6\)"):
        DistillationLoss()(student, short, labels)
    with pytest.raises(ValueError, match="labels must lie in"):
        DistillationLoss()(student, topk, labels.clamp_min(0) + V)


def test_a_module_reading_the_cache_trains_the_same_sparse_or_dense(tmp_path):
    data = blocks(40, 4)
    built = build(ensemble(40), {"train": data}, tmp_path, top_k=8)
    tokens = torch.stack([block["input_ids"] for block in data[:3]])
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = -100
    step_batch = {"input_ids": tokens, "labels": labels, "index": torch.tensor([0, 1, 2])}
    results = []
    for sparse in (True, False):
        cache = SequenceCachedTeachers(built.path, sparse=sparse)
        outputs = cache.outputs(tokens, step_batch, "train")
        assert isinstance(outputs, TopKTeacherOutputs) == sparse
        student = lm(40, seed=7, sharp=False)
        module = DistillationModule(student, cache, DistillationLoss("mean_probs", temperature=2.0))
        step = module.training_step(step_batch, 0)
        step["loss"].backward()
        results.append((step, [p.grad.clone() for p in student.parameters()]))
    (sparse_step, sparse_grads), (dense_step, dense_grads) = results
    assert "teacher_logits" not in sparse_step and "teacher_topk" not in dense_step
    assert torch.equal(expand_topk(sparse_step["teacher_topk"]), dense_step["teacher_logits"])
    torch.testing.assert_close(sparse_step["loss"], dense_step["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_step["fusion_weights"], dense_step["fusion_weights"])
    for got, expected in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_sparse_training_with_the_agreement_callback_expands_one_chunk_at_most(
    tmp_path, monkeypatch
):
    """Two training steps from the cache with the sparse loss: the loss reads the top k, the
    step outputs carry them, and the agreement callback expands 16 tokens of them at a time."""
    data = blocks(40, 8)
    built = build(ensemble(40), {"train": data}, tmp_path / "cache", top_k=8)
    rows = []
    for index, block in enumerate(data):
        labels = block["input_ids"].roll(-1)
        labels[-1] = -100
        rows.append({"input_ids": block["input_ids"], "labels": labels, "index": index})
    expanded: list[int] = []

    def recording_expand_topk(packed: TopKLogits) -> Tensor:
        logits = expand_topk(packed)
        expanded.append(logits.numel())
        return logits

    for module in (
        sequence_store,
        topk_module,
        distillation_module,
        chunked_module,
        agreement_module,
    ):
        monkeypatch.setattr(module, "expand_topk", recording_expand_topk)
    loss = DistillationLoss("entropy", temperature=2.0)
    assert loss.accepts_topk
    module = DistillationModule(
        lm(40, seed=7, sharp=False), SequenceCachedTeachers(built.path), loss
    )
    callback = TeacherAgreementCallback(stages=("train",), chunk_tokens=16)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=4))
    assert trainer.global_step == 2
    chunk, batch = 16, 4
    assert len(expanded) == 2 * math.ceil(batch * (L - 1) / chunk)  # 60 real tokens a step
    assert max(expanded) <= K * chunk * V < K * batch * L * V
    latest = callback.latest["train"]
    assert torch.isfinite(latest["student_kl"]).all() and torch.isfinite(latest["ensemble_ce"])


def student_tail_reference(
    loss: DistillationLoss, topk: TopKLogits, student: Tensor, labels: Tensor
) -> Tensor:
    """The loss written out densely over the real positions, in float64: each teacher's softmax
    at T keeps its top-k probabilities, and its tail mass goes to the other ids in proportion to
    the student's (detached) tempered probabilities there."""
    temperature, real = loss.temperature, labels != -100
    student, labels = student[real], labels[real]
    expanded = expand_topk(topk)[:, real]
    teachers = torch.softmax(expanded.double() / temperature, -1)
    top = torch.zeros_like(teachers, dtype=torch.bool).scatter(
        -1, topk.indices[:, real].long(), True
    )
    mass = torch.where(top, 0.0, teachers).sum(-1, keepdim=True)
    q = torch.softmax(student.detach().double() / temperature, -1)
    spread = mass * q / torch.where(top, 0.0, q).sum(-1, keepdim=True)
    shaped = torch.where(top, teachers, spread)  # (K, M, V)
    weights = loss.fusion(expanded, labels, temperature, student_logits=student).weights.double()
    log_q = torch.log_softmax(student.double() / temperature, -1)
    if loss.aggregation == "target":
        shaped = torch.einsum("mk,kmv->mv", weights / weights.sum(-1, keepdim=True), shaped)
    kl = torch.xlogy(shaped, shaped) - shaped * log_q
    per = (kl if loss.divergence == "kl" else -shaped * log_q).sum(-1)
    if loss.aggregation == "loss":
        per = (weights * per.T).sum(-1)
    hard = torch.nn.functional.cross_entropy(student.double(), labels)
    soft = temperature**2 * per.mean()
    return (1 - loss.alpha) * hard + loss.alpha * soft + loss.fusion.penalty()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("divergence", ["kl", "soft_ce"])
@pytest.mark.parametrize("aggregation", ["target", "loss"])
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 6), (2.5, 1), (1.0, V)])
def test_a_student_shaped_tail_equals_its_dense_construction(
    rule, divergence, aggregation, temperature, top_k
):
    loss = DistillationLoss(
        RULES[rule](),
        alpha=0.7,
        temperature=temperature,
        divergence=divergence,
        aggregation=aggregation,
        topk_tail="student",
    )
    topk, (student, labels) = teachers_topk(top_k, seed=top_k), batch()
    results = []
    for compute in (
        lambda leaf: loss(leaf, topk, labels).loss,
        lambda leaf: student_tail_reference(loss, topk, leaf, labels),
    ):
        leaf = student.clone().requires_grad_()
        value = compute(leaf)
        wanted = [leaf, *(p for p in loss.parameters() if p.requires_grad)]
        results.append((value, *torch.autograd.grad(value, wanted)))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=1e-4)


def test_a_student_shaped_tail_at_k_equal_v_is_the_uniform_one():
    topk, (student, labels) = teachers_topk(V), batch()
    uniform = DistillationLoss("entropy", temperature=2.0)(student, topk, labels)
    shaped = DistillationLoss("entropy", temperature=2.0, topk_tail="student")(
        student, topk, labels
    )
    torch.testing.assert_close(shaped.loss, uniform.loss)


def test_one_teacher_with_a_student_tail_is_the_kl_of_the_merged_distributions():
    """KL(p ‖ q) over the teacher's top-k ids plus one bin for every other id, in NumPy."""
    generator = torch.Generator().manual_seed(3)
    logits, student = 2 * torch.randn(1, 5, V, generator=generator), torch.randn(5, V)
    topk = compress_topk(logits, 4)
    labels = torch.zeros(5, dtype=torch.long)
    loss = DistillationLoss("mean_probs", alpha=1.0, temperature=1.0, topk_tail="student")
    got = loss(student, topk, labels).soft.item()
    p, q = (
        np.exp(x - x.max(-1, keepdims=True))
        for x in (logits[0].double().numpy(), student.double().numpy())
    )
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    expected = []
    for row, ids in enumerate(topk.indices[0].long().numpy()):
        p_bins = np.append(p[row, ids], 1 - p[row, ids].sum())
        q_bins = np.append(q[row, ids], 1 - q[row, ids].sum())
        expected.append(np.sum(p_bins * np.log(p_bins / q_bins)))
    assert got == pytest.approx(np.mean(expected), rel=1e-5)
    uniform = DistillationLoss("mean_probs", alpha=1.0, temperature=1.0)(student, topk, labels)
    assert uniform.soft.item() > got  # the flat tail also asks the student to flatten its own


def test_a_student_tail_below_float32s_range_stays_exact():
    """A student sure of the teacher's top ids (its other ids at e^-150, below float32's
    smallest number) gets the merged KL: its tail mass is read in log space."""
    logits = torch.tensor([[[4.0, 3.0] + [0.0] * (V - 2)]])
    student = torch.tensor([[0.0, 0.0] + [-150.0] * (V - 2)])
    loss = DistillationLoss("mean_probs", alpha=1.0, temperature=1.0, topk_tail="student")
    got = loss(student, compress_topk(logits, 2), torch.zeros(1, dtype=torch.long)).soft
    p = torch.softmax(logits[0, 0].double(), -1)
    r, tail = 1 - p[:2].sum(), math.log(V - 2) - 150.0  # the student's tail mass, in log
    expected = (p[:2] * (p[:2] / 0.5).log()).sum() + r * (r.log() - (tail - math.log(2)))
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ({"fusion": "aekd"}, "fusion='aekd'"),
        ({"divergence": "js"}, "divergence='js'"),
        ({"probability_shift": True}, "probability_shift=True"),
        ({"topk_tail": "flat"}, "'flat'"),
    ],
)
def test_a_student_tail_off_the_sparse_path_is_refused_naming_why(options, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        DistillationLoss(**{"topk_tail": "student", **options})


def test_student_shaped_tails_built_a_few_positions_at_a_time_are_the_same(monkeypatch):
    topk, (student, labels) = teachers_topk(6), batch()
    loss = DistillationLoss(LearnedWeights(num_teachers=K), aggregation="loss", topk_tail="student")
    results = []
    for elements in (sparse_module.TAIL_CHUNK_ELEMENTS, 3 * K * V):  # all at once, then 3 at a time
        monkeypatch.setattr(sparse_module, "TAIL_CHUNK_ELEMENTS", elements)
        leaf = student.clone().requires_grad_()
        out = loss(leaf, topk, labels)
        results.append((out.loss, *torch.autograd.grad(out.loss, [leaf, *loss.parameters()])))
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole)
