"""Probability shift (Wen et al. 2019) pinned to a hand computation and a NumPy reference, and
usable under every fusion rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning import DistillationLoss
from kd_lightning.functional.targets import probability_shift
from kd_lightning.fusion import FUSION_RULES, LearnedGate, LearnedWeights, StaticWeights

from .reference import library_rules_on_logits


def numpy_shift(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Loop over every teacher and position: swap the top value with the label's if they differ."""
    out = logits.copy()
    for index in np.ndindex(*logits.shape[:-1]):
        row, label = out[index], labels[index[1:]]
        top = int(row.argmax())
        if top != label:
            row[top], row[label] = row[label], row[top]
    return out


def test_hand_computed_swaps():
    z = torch.tensor(
        [
            [[0.5, 2.0, 1.0], [3.0, 0.0, 1.0]],  # teacher 0: wrong on sample 0, right on 1
            [[4.0, 1.0, 0.0], [0.0, 1.0, 5.0]],  # teacher 1: right on 0, wrong on 1
        ]
    )
    shifted = probability_shift(z, torch.tensor([0, 0]))
    assert shifted.tolist() == [
        [[2.0, 0.5, 1.0], [3.0, 0.0, 1.0]],
        [[4.0, 1.0, 0.0], [5.0, 1.0, 0.0]],
    ]


@pytest.mark.parametrize("shape", [(3, 16, 7), (2, 4, 5, 11)])
def test_matches_numpy_and_every_teacher_ends_right(shape):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=generator)
    labels = torch.randint(0, shape[-1], shape[1:-1], generator=generator)
    shifted = probability_shift(z, labels)
    np.testing.assert_array_equal(shifted.numpy(), numpy_shift(z.numpy(), labels.numpy()))
    assert (shifted.argmax(-1) == labels).all()
    torch.testing.assert_close(shifted.sort(-1).values, z.sort(-1).values)  # a permutation


def test_the_loss_equals_distilling_from_shifted_teachers():
    generator = torch.Generator().manual_seed(1)
    student, teachers = (
        torch.randn(8, 5, generator=generator),
        torch.randn(3, 8, 5, generator=generator),
    )
    labels = torch.randint(0, 5, (8,), generator=generator)
    for aggregation in ("target", "loss"):
        shifted = DistillationLoss("entropy", aggregation=aggregation, probability_shift=True)
        plain = DistillationLoss("entropy", aggregation=aggregation)
        expected = plain(student, probability_shift(teachers, labels), labels)
        torch.testing.assert_close(shifted(student, teachers, labels).loss, expected.loss)


def test_padding_is_untouched_by_the_shift():
    student, teachers = torch.randn(2, 4, 6), torch.randn(3, 2, 4, 6)
    labels = torch.tensor([[1, 2, 3, 4], [5, 0, -100, -100]])
    loss = DistillationLoss(probability_shift=True)
    real = labels != -100
    flat = loss(student[real], teachers[:, real], labels[real])
    torch.testing.assert_close(loss(student, teachers, labels).loss, flat.loss)


def rule_named(name: str, k: int):
    special = {
        "static": lambda: StaticWeights([1.0, 2.0, 3.0]),
        "learned": lambda: LearnedWeights(num_teachers=k),
        "learned_gate": lambda: LearnedGate(num_teachers=k),
    }
    return special.get(name, FUSION_RULES[name])()


@pytest.mark.parametrize("name", library_rules_on_logits())
def test_every_rule_accepts_the_shift(name):
    torch.manual_seed(2)
    student = torch.randn(6, 4, requires_grad=True)
    teachers, labels = torch.randn(3, 6, 4), torch.randint(0, 4, (6,))
    out = DistillationLoss(rule_named(name, 3), probability_shift=True)(student, teachers, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and student.grad is not None
