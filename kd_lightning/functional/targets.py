"""Corrections of a teacher's soft target before it is distilled."""

from __future__ import annotations

from torch import Tensor


def probability_shift(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Swap each teacher's top logit with the true class's wherever the teacher is wrong.

    Knowledge adjustment by probability shift (Wen, Lai & Qian, "Preparing Lessons: Improve
    Knowledge Distillation with Better Supervision", Neurocomputing 2021, arXiv 2019): when a
    teacher's argmax ``a`` differs from the label ``y``, the values at ``a`` and ``y`` trade
    places, so the target's top-1 is always the true class while the rest of the distribution
    (the "dark knowledge") stays. Softmax commutes with permuting classes, so swapping the logits
    swaps the probabilities at every temperature, as the paper swaps them in its softened target.
    The paper corrects its single teacher; here each teacher is corrected on its own, before any
    fusion.

    Args:
        teacher_logits: ``(*teachers, *batch, C)``, e.g. ``(K, B, C)``.
        labels: Integer class indices ``(*batch)``, broadcast over the leading teacher dims.

    Returns:
        The corrected logits, same shape and dtype.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]]])  # K = 1, B = 2, C = 3
        >>> probability_shift(z, torch.tensor([0, 1])).tolist()  # wrong on sample 0 only
        [[[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]]]
    """
    predicted = teacher_logits.argmax(-1, keepdim=True)
    label = labels.long().unsqueeze(-1).expand_as(predicted)
    at_predicted = teacher_logits.gather(-1, predicted)
    at_label = teacher_logits.gather(-1, label)
    return teacher_logits.scatter(-1, predicted, at_label).scatter(-1, label, at_predicted)
