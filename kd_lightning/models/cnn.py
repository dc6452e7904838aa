"""Small 1-D convolutional network of the MNIST-1D benchmark.

Reference: S. Greydanus, "Scaling down deep learning", arXiv:2011.14439, 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.models.checks import check_positive

_STRIDE = 2
_PADDING = 1


def _conv_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Strided ``Conv1d`` followed by ReLU."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=_STRIDE, padding=_PADDING)
    return nn.Sequential(conv, nn.ReLU())


def _output_length(length: int, kernel_size: int) -> int:
    """Output length of a strided convolution over ``length`` steps."""
    return (length + 2 * _PADDING - kernel_size) // _STRIDE + 1


class CNN1D(nn.Module):
    """Three strided ``Conv1d`` + ReLU layers, flattened into a linear head (Greydanus 2020).

    Accepts sequences shaped ``(B, L)`` or ``(B, 1, L)`` with ``L == in_features``. Submodules,
    for feature hooks: ``conv1``, ``conv2``, ``conv3`` (each convolution + ReLU) and ``head``.

    Args:
        in_features: Sequence length ``L``.
        num_classes: Number of output logits.
        channels: Channels of every convolution.

    Examples:
        >>> model = CNN1D()
        >>> model(torch.zeros(8, 40)).shape, model(torch.zeros(8, 1, 40)).shape
        (torch.Size([8, 10]), torch.Size([8, 10]))
        >>> sum(p.numel() for p in model.parameters())
        5210
    """

    def __init__(self, in_features: int = 40, num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, channels=channels)
        self.in_features = in_features
        self.conv1 = _conv_relu(1, channels, kernel_size=5)
        self.conv2 = _conv_relu(channels, channels, kernel_size=3)
        self.conv3 = _conv_relu(channels, channels, kernel_size=3)
        length = _output_length(_output_length(_output_length(in_features, 5), 3), 3)
        if length < 1:
            raise ValueError(
                f"in_features={in_features} is too short for three stride-2 convolutions"
            )
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map sequences ``(B, L)`` or ``(B, 1, L)`` to logits ``(B, num_classes)``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.in_features:
            raise ValueError(
                f"CNN1D expects input of shape (B, {self.in_features}) or (B, 1, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        features = self.conv3(self.conv2(self.conv1(x)))
        return self.head(torch.flatten(features, start_dim=1))
