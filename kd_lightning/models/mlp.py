"""Residual multilayer perceptron of the MNIST-1D benchmark.

Reference: S. Greydanus, "Scaling down deep learning", arXiv:2011.14439, 2020.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models.checks import check_positive


class _ResidualLayer(nn.Module):
    """Hidden layer ``h + dropout(ReLU(Linear(h)))``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), *_activation(dropout))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.branch(h)


def _activation(dropout: float) -> list[nn.Module]:
    """ReLU, followed by dropout when ``dropout > 0``."""
    return [nn.ReLU(), nn.Dropout(dropout)] if dropout > 0 else [nn.ReLU()]


class MLP(nn.Module):
    """Two-hidden-layer MLP whose second hidden layer is residual (Greydanus 2020).

    ``MLP()`` is the paper's 15 k-parameter student; ``MLP(hidden=512, dropout=0.2)`` the
    289 k-parameter wide teacher. Submodules, for feature hooks: ``input`` outputs the first
    hidden activation, ``hidden`` the penultimate features, ``head`` the logits.

    Args:
        in_features: Length of the input vectors.
        num_classes: Number of output logits.
        hidden: Width of both hidden layers.
        dropout: Dropout probability after each hidden activation; 0 disables dropout.

    Examples:
        >>> import torch
        >>> model = MLP()
        >>> model(torch.zeros(8, 40)).shape
        torch.Size([8, 10])
        >>> sum(p.numel() for p in model.parameters())
        15210
    """

    def __init__(
        self,
        in_features: int = 40,
        num_classes: int = 10,
        hidden: int = 100,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(in_features=in_features, num_classes=num_classes, hidden=hidden)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.input = nn.Sequential(nn.Linear(in_features, hidden), *_activation(dropout))
        self.hidden = _ResidualLayer(hidden, dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map inputs ``(B, in_features)`` to logits ``(B, num_classes)``."""
        return self.head(self.hidden(self.input(x)))
