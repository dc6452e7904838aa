"""Bidirectional GRU classifier of the MNIST-1D benchmark.

Reference: S. Greydanus, "Scaling down deep learning", arXiv:2011.14439, 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.models.checks import check_positive


class GRUClassifier(nn.Module):
    """Bidirectional one-layer GRU whose outputs at all steps feed a linear head (Greydanus 2020).

    Each of the ``in_features`` time steps is a scalar input; the ``(L, 2 * hidden)`` outputs
    are flattened into ``head``. Submodules, for feature hooks: ``gru`` and ``head``.

    Args:
        in_features: Sequence length ``L``.
        num_classes: Number of output logits.
        hidden: Hidden size of each GRU direction.

    Examples:
        >>> model = GRUClassifier()
        >>> model(torch.zeros(8, 40)).shape
        torch.Size([8, 10])
        >>> sum(p.numel() for p in model.parameters())
        5134
    """

    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: int = 6) -> None:
        super().__init__()
        check_positive(in_features=in_features, num_classes=num_classes, hidden=hidden)
        self.in_features = in_features
        self.gru = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(in_features * 2 * hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map sequences ``(B, L)`` to logits ``(B, num_classes)``."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"GRUClassifier expects input of shape (B, {self.in_features}), got {tuple(x.shape)}"
            )
        outputs, _ = self.gru(x.unsqueeze(-1))
        return self.head(torch.flatten(outputs, start_dim=1))
