"""Token-level distillation: logits (B, L, V), padded positions labelled ignore_index."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import Tensor

from kd_lightning import DistillationLoss, DistillationModule, TeacherAgreementCallback
from kd_lightning.data import SequenceDataModule
from kd_lightning.fusion import GradientSpaceWeights, LearnedWeights
from kd_lightning.metrics import TeacherAgreement
from kd_lightning.models import TinyTransformerTagger

from .conftest import make_trainer
from .reference import FUSIONS_BY_NAME, np_kl, np_log_softmax

IGNORE = -100
B, L, V, K = 3, 5, 6, 3
LENGTHS = (5, 3, 1)  # real tokens per sequence; the rest is padding

FUSIONS = (*FUSIONS_BY_NAME, "learned", "aekd")


def build_rule(name: str):
    if name == "learned":
        return LearnedWeights(num_teachers=K)
    if name == "aekd":
        return GradientSpaceWeights()
    return name


@pytest.fixture
def padded_batch() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(B, L, V, generator=generator) * 2
    teachers = torch.randn(K, B, L, V, generator=generator) * 3
    labels = torch.randint(0, V, (B, L), generator=generator)
    for row, length in enumerate(LENGTHS):
        labels[row, length:] = IGNORE
    return student, teachers, labels


def np_reference(student, teachers, labels, fusion, aggregation, alpha, t):
    """Per-token NumPy objective, averaged over real tokens only; also the per-token weights."""
    s, z, y = student.double().numpy(), teachers.double().numpy(), labels.numpy()
    real = y != IGNORE
    y_safe = np.where(real, y, 0)
    gather = partial(np.take_along_axis, indices=y_safe[..., None], axis=-1)
    ce = -gather(np_log_softmax(s))[..., 0]  # (B, L)
    if fusion == "mean_probs":
        weights = np.full((*y.shape, K), 1 / K)
    else:  # confidence: w_k = (1 − softmax_k CE_k) / (K − 1), CE at T = 1
        teacher_ce = np.stack([-gather(np_log_softmax(z[k]))[..., 0] for k in range(K)], -1)
        soft = np.exp(teacher_ce - teacher_ce.max(-1, keepdims=True))
        weights = (1 - soft / soft.sum(-1, keepdims=True)) / (K - 1)
    probs = np.exp(np_log_softmax(z, t))  # (K, B, L, V)
    if aggregation == "target":
        target = np.einsum("blk,kblv->blv", weights, probs)
        kd = np_kl(target, s, t)
    else:
        kd = sum(weights[..., k] * np_kl(probs[k], s, t) for k in range(K))

    def real_mean(values: np.ndarray) -> float:
        return float(np.where(real, values, 0).sum() / real.sum())

    hard, soft_term = real_mean(ce), real_mean(kd)
    return (1 - alpha) * hard + alpha * soft_term, hard, soft_term, weights * real[..., None]


# (a) per-token values against NumPy -------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["mean_probs", "confidence"])
@pytest.mark.parametrize("aggregation", ["target", "loss"])
def test_per_token_values_match_numpy_over_real_tokens(padded_batch, fusion, aggregation):
    student, teachers, labels = padded_batch
    alpha, t = 0.7, 2.5
    expected, hard, soft, weights = np_reference(
        student, teachers, labels, fusion, aggregation, alpha, t
    )
    loss = DistillationLoss(fusion, alpha=alpha, temperature=t, aggregation=aggregation)
    out = loss(student, teachers, labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.hard.item() == pytest.approx(hard, rel=1e-5)
    assert out.soft.item() == pytest.approx(soft, rel=1e-5)
    assert out.weights.shape == (B, L, K)
    torch.testing.assert_close(out.weights, torch.from_numpy(weights).float())


# (b) padding changes neither the loss nor any gradient ------------------------------------------


def loss_and_grad(loss, student, teachers, labels, seed=0):
    student = student.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the random teacher draws the same teacher in both calls
    out = loss(student, teachers, labels)
    out.loss.backward()
    return out, student.grad


def garbage_at_padding(student, teachers, labels, fill=None):
    padded = labels == IGNORE
    generator = torch.Generator().manual_seed(99)
    noise_s = torch.randn(student.shape, generator=generator) * 50
    noise_t = torch.randn(teachers.shape, generator=generator) * 50
    if fill is not None:
        noise_s, noise_t = torch.full_like(noise_s, fill), torch.full_like(noise_t, fill)
    return (
        torch.where(padded[..., None], noise_s, student),
        torch.where(padded[..., None], noise_t, teachers),
    )


def assert_padding_is_inert(loss, student, teachers, labels):
    clean, clean_grad = loss_and_grad(loss, student, teachers, labels)
    padded = labels == IGNORE
    for fill in (None, float("nan")):
        dirty_student, dirty_teachers = garbage_at_padding(student, teachers, labels, fill)
        dirty, dirty_grad = loss_and_grad(loss, dirty_student, dirty_teachers, labels)
        assert torch.isfinite(dirty.loss)
        assert torch.equal(dirty.loss, clean.loss)
        assert torch.equal(dirty.weights, clean.weights)
        assert torch.equal(dirty_grad[~padded], clean_grad[~padded])
        assert torch.equal(dirty_grad[padded], torch.zeros_like(dirty_grad[padded]))
        assert dirty_grad[~padded].abs().sum() > 0
    assert torch.equal(clean.weights[padded], torch.zeros(int(padded.sum()), K))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("aggregation", ["target", "loss"])
def test_padded_positions_change_neither_loss_nor_gradients(padded_batch, fusion, aggregation):
    loss = DistillationLoss(build_rule(fusion), alpha=0.6, temperature=3.0, aggregation=aggregation)
    assert_padding_is_inert(loss, *padded_batch)


@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "soft_ce", "mse"])
@pytest.mark.parametrize("aggregation", ["target", "loss"])
def test_padding_is_inert_for_every_divergence(padded_batch, divergence, aggregation):
    loss = DistillationLoss(
        "confidence", temperature=3.0, divergence=divergence, aggregation=aggregation
    )
    assert_padding_is_inert(loss, *padded_batch)


def test_learnable_fusion_parameters_get_no_gradient_from_padding(padded_batch):
    student, teachers, labels = padded_batch
    grads = []
    for s, z in ((student, teachers), garbage_at_padding(student, teachers, labels)):
        loss = DistillationLoss(LearnedWeights(num_teachers=K), aggregation="loss")
        loss(s, z, labels).loss.backward()
        grads.append(next(loss.parameters()).grad)
    assert torch.equal(grads[0], grads[1])


def test_padded_tokens_change_nothing_through_a_transformer(padded_batch):
    _, _, labels = padded_batch
    padding = labels == IGNORE
    tokens = torch.where(padding, 0, torch.randint(1, 32, (B, L)))  # 0 = pad_id
    garbage = torch.where(padding, torch.randint(1, 32, (B, L)), tokens)  # real-looking padding
    student = TinyTransformerTagger(num_classes=V, d_model=16, nhead=2)
    teachers = [TinyTransformerTagger(num_classes=V, d_model=w).eval() for w in (16, 32)]
    loss = DistillationLoss("confidence", alpha=0.5, temperature=2.0)
    results = []
    for x in (tokens, garbage):
        student.zero_grad()
        with torch.no_grad():
            z = torch.stack([teacher(x, padding_mask=padding) for teacher in teachers])
        out = loss(student(x, padding_mask=padding), z, labels)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for clean, dirty in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(clean, dirty, rtol=1e-5, atol=1e-7)


# (c) an all-real (B, L, V) batch is the flattened (B·L, V) batch --------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("aggregation", ["target", "loss"])
def test_all_real_sequences_equal_the_flattened_batch(padded_batch, fusion, aggregation):
    student, teachers, _ = padded_batch
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    loss = DistillationLoss(build_rule(fusion), alpha=0.8, temperature=4.0, aggregation=aggregation)
    seq, seq_grad = loss_and_grad(loss, student, teachers, labels)
    flat, flat_grad = loss_and_grad(
        loss, student.reshape(B * L, V), teachers.reshape(K, B * L, V), labels.reshape(-1)
    )
    for name in ("loss", "hard", "soft"):
        torch.testing.assert_close(getattr(seq, name), getattr(flat, name), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seq.weights.reshape(B * L, K), flat.weights)
    torch.testing.assert_close(seq_grad.reshape(B * L, V), flat_grad, rtol=1e-5, atol=1e-8)


def test_padded_sequences_equal_their_real_tokens_alone(padded_batch):
    student, teachers, labels = padded_batch
    real = labels != IGNORE
    loss = DistillationLoss("entropy", alpha=0.5, temperature=2.0, aggregation="loss")
    out = loss(student, teachers, labels)
    alone = loss(student[real], teachers[:, real], labels[real])
    torch.testing.assert_close(out.loss, alone.loss)
    torch.testing.assert_close(out.weights[real], alone.weights)


def test_a_batch_of_padding_only_gives_zero(padded_batch):
    student, teachers, labels = padded_batch
    out, grad = loss_and_grad(
        DistillationLoss(), student, teachers, torch.full_like(labels, IGNORE)
    )
    assert out.loss.item() == 0.0 and out.hard.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


# (e) the label-range check skips ignore_index ---------------------------------------------------


def test_ignore_index_labels_pass_the_range_check_but_real_ones_do_not(padded_batch):
    student, teachers, labels = padded_batch
    DistillationLoss()(student, teachers, labels)  # -100 at padding: accepted
    bad = torch.where(labels == IGNORE, IGNORE, 2)
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\).*from 2 to 6$"):
        DistillationLoss()(student, teachers, bad)
    bad[0, 0] = -3
    with pytest.raises(ValueError, match=r"from -3 to"):
        DistillationLoss()(student, teachers, bad)
    custom = torch.where(labels == IGNORE, -1, labels)
    DistillationLoss(ignore_index=-1)(student, teachers, custom)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        DistillationLoss()(student, teachers, custom)  # -1 is not padding by default


# the pieces: metric mask, model, data -----------------------------------------------------------


def test_agreement_metric_counts_only_real_tokens(padded_batch):
    student, teachers, labels = padded_batch
    real = labels != IGNORE
    weights = torch.rand(B, L, K)
    masked, flat = TeacherAgreement(K), TeacherAgreement(K)
    dirty_student, dirty_teachers = garbage_at_padding(student, teachers, labels)
    masked.update(dirty_student, dirty_teachers, labels, weights, mask=real)
    flat.update(student[real], teachers[:, real], labels[real], weights[real])
    for key, value in flat.compute().items():
        torch.testing.assert_close(masked.compute()[key], value, equal_nan=True)
    assert masked.total.item() == sum(LENGTHS)


def test_tagger_ignores_padding_and_refuses_bad_input():
    model = TinyTransformerTagger(vocab_size=10, num_classes=4, max_len=8)
    tokens = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
    logits = model(tokens)
    assert logits.shape == (2, 6, 4)
    longer = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(model(longer)[:, :3], logits[:1, :3])
    with pytest.raises(ValueError, match="expects integer tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="must divide"):
        TinyTransformerTagger(d_model=10, nhead=4)


def test_sequence_data_is_deterministic_and_follows_the_rule():
    dm = SequenceDataModule(num_samples=64, vocab_size=16, num_classes=5, min_len=2, max_len=9)
    tokens, labels = dm.generate()
    again, _ = SequenceDataModule(
        num_samples=64, vocab_size=16, num_classes=5, min_len=2, max_len=9
    ).generate()
    assert torch.equal(tokens, again)
    assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == (64, 9)
    real = tokens != 0
    assert torch.equal(real, labels != IGNORE)
    lengths = real.sum(1)
    assert lengths.min() >= 2 and lengths.max() <= 9
    assert torch.equal(real, torch.arange(9) < lengths[:, None])  # padding only at the end
    previous = torch.nn.functional.pad(tokens[:, :-1], (1, 0))
    assert torch.equal(labels[real], ((tokens + previous) % 5)[real])


# (d) a real Trainer distils a tiny transformer ------------------------------------------------


def test_trainer_distils_a_transformer_tagger_and_logs_token_agreement(tmp_path):
    dm = SequenceDataModule(
        num_samples=128, vocab_size=16, num_classes=8, min_len=3, max_len=10, batch_size=16
    )
    make = partial(TinyTransformerTagger, vocab_size=16, num_classes=8, max_len=10)
    teachers = {"narrow": make(d_model=16, nhead=2), "wide": make(d_model=48)}
    module = DistillationModule(
        make(d_model=16, nhead=2),
        teachers,
        DistillationLoss("confidence", alpha=0.5, temperature=2.0),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
    )
    callback = TeacherAgreementCallback()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("val/agreement/student_vs_narrow", "val/agreement/narrow_vs_wide", "val/acc"):
        assert 0.0 <= float(metrics[key]) <= 1.0
    # The logged values count real tokens only: recompute them from the validation set.
    module.eval()
    with torch.no_grad():
        batches = list(dm.val_dataloader())
        x = torch.cat([batch["input"] for batch in batches])
        y = torch.cat([batch["target"] for batch in batches])
        student, teacher_logits = module(x)[y != IGNORE], module.teachers(x)[:, y != IGNORE]
    agreement = (teacher_logits.argmax(-1) == student.argmax(-1)).float().mean(1)
    latest = callback.latest["val"]
    torch.testing.assert_close(latest["student_agreement"], agreement)
    assert latest["fusion_weight"].sum().item() == pytest.approx(1.0)
    accuracy = (student.argmax(-1) == y[y != IGNORE]).float().mean()
    assert float(metrics["val/acc"]) == pytest.approx(accuracy.item(), abs=1e-6)
    assert float(metrics["val/agreement/student_vs_wide"]) == pytest.approx(agreement[1].item())
