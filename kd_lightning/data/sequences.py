"""Synthetic padded token sequences with per-token labels: a tiny task for token-level distillation."""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.data.base import GeneratedDataModule
from kd_lightning.models.checks import check_positive

IGNORE_INDEX = -100


class SequenceDataModule(GeneratedDataModule):
    """Variable-length token sequences padded with ``pad_id``, one label per token, from ``seed``.

    Each sequence has a length drawn uniformly from ``[min_len, max_len]``, real tokens drawn
    uniformly from the ids other than ``pad_id``, and is padded with ``pad_id`` to ``max_len``.
    The label of a real token is ``(token + previous token) mod num_classes``, the previous token
    of the first one being ``pad_id``: a rule a model must look one position back to learn.
    Padded positions get the label ``-100`` (the ``ignore_index`` of
    :class:`~kd_lightning.DistillationLoss` and of ``F.cross_entropy``). Batches are dicts
    ``{"input": tokens (B, L) int64, "target": labels (B, L) int64}``, what
    :class:`~kd_lightning.BatchAdapter` reads by default. Sequences are split, in generation
    order, into train, validation and test.

    Args:
        num_samples: Total number of sequences over all splits.
        vocab_size: Number of token ids, ``pad_id`` included.
        num_classes: Number of token labels.
        min_len: Shortest sequence (real tokens).
        max_len: Longest sequence, and the padded length ``L`` of every batch.
        batch_size: Batch size of every dataloader.
        seed: Seed of the lengths and tokens.
        val_fraction: Share of sequences in the validation split.
        test_fraction: Share of sequences in the test split.
        pad_id: The padding token.

    Examples:
        >>> dm = SequenceDataModule(
        ...     num_samples=40, vocab_size=8, num_classes=4, min_len=2, max_len=6, batch_size=4
        ... )
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (20, 10, 10)
        >>> batch = next(iter(dm.val_dataloader()))
        >>> batch["input"].shape, batch["target"].dtype
        (torch.Size([4, 6]), torch.int64)
        >>> batch["input"][0].tolist()  # three real tokens, then padding
        [3, 1, 2, 0, 0, 0]
        >>> batch["target"][0].tolist()  # 3 mod 4, (1 + 3) mod 4, (2 + 1) mod 4
        [3, 0, 3, -100, -100, -100]
    """

    def __init__(
        self,
        num_samples: int = 512,
        vocab_size: int = 32,
        num_classes: int = 32,
        min_len: int = 4,
        max_len: int = 16,
        batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.25,
        test_fraction: float = 0.25,
        pad_id: int = 0,
    ) -> None:
        check_positive(
            num_samples=num_samples,
            num_classes=num_classes,
            min_len=min_len,
            max_len=max_len,
            batch_size=batch_size,
        )
        if vocab_size < 2:
            raise ValueError(
                f"vocab_size must be at least 2 (padding and one token), got {vocab_size}"
            )
        if min_len > max_len:
            raise ValueError(f"min_len={min_len} exceeds max_len={max_len}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must lie in [0, {vocab_size}), got {pad_id}")
        super().__init__(num_samples, batch_size, seed, val_fraction, test_fraction)
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.min_len = min_len
        self.max_len = max_len
        self.pad_id = pad_id

    def generate(self) -> tuple[Tensor, Tensor]:
        """All ``num_samples`` sequences: tokens and labels, both ``(num_samples, max_len)`` int64."""
        generator = torch.Generator().manual_seed(self.seed)
        lengths = torch.randint(
            self.min_len, self.max_len + 1, (self.num_samples, 1), generator=generator
        )
        real = torch.arange(self.max_len) < lengths
        # Draw from the vocab_size - 1 ids other than pad_id.
        drawn = torch.randint(
            self.vocab_size - 1, (self.num_samples, self.max_len), generator=generator
        )
        tokens = torch.where(real, drawn + (drawn >= self.pad_id).long(), self.pad_id)
        previous = torch.nn.functional.pad(tokens[:, :-1], (1, 0), value=self.pad_id)
        labels = torch.where(real, (tokens + previous) % self.num_classes, IGNORE_INDEX)
        return tokens, labels
