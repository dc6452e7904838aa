"""Learnable parts the online methods add around the peers, shaped by the peers' tapped features.

Features are vectors ``(B, D)`` or channel-first maps ``(B, C, L)`` (what ``Conv1d`` layers
output); a sequence layer's ``(B, L, H)`` output is read as ``C = L`` channels of length ``H``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _check_features(features: Tensor, name: str) -> None:
    if features.ndim not in (2, 3):
        raise ValueError(
            f"tapped features of {name} must be vectors (B, D) or maps (B, C, L), got shape "
            f"{tuple(features.shape)}: tap another layer (method.feature_layers)"
        )


class FusionClassifier(nn.Module):
    """FFL's fusion module: a classifier over the sub-networks' features concatenated on dim 1.

    For maps ``(B, C, L)`` (Kim et al., ICPR 2020, Fig. 2): depthwise 3-tap convolution, BN, ReLU,
    1×1 convolution, BN, ReLU, global average pooling and a linear classifier. For vectors
    ``(B, D)``: Linear, BN, ReLU, Linear.

    Args:
        features: one batch of each sub-network's features (only the shapes are used).
        num_classes: logits produced.

    Examples:
        >>> fusion = FusionClassifier([torch.zeros(2, 4, 6), torch.zeros(2, 3, 6)], num_classes=5)
        >>> fusion([torch.randn(2, 4, 6), torch.randn(2, 3, 6)]).shape
        torch.Size([2, 5])
    """

    def __init__(self, features: Sequence[Tensor], num_classes: int) -> None:
        super().__init__()
        for index, feature in enumerate(features):
            _check_features(feature, f"sub-network {index}")
        shapes = {tuple(f.shape[2:]) for f in features}
        if len({f.ndim for f in features}) > 1 or len(shapes) > 1:
            raise ValueError(
                f"FFL fuses features of one kind and length; got shapes "
                f"{[tuple(f.shape[1:]) for f in features]}: tap layers of matching shape"
            )
        width = sum(f.shape[1] for f in features)
        if features[0].ndim == 3:
            self.fuse: nn.Module = nn.Sequential(
                nn.Conv1d(width, width, 3, padding=1, groups=width, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Conv1d(width, width, 1, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.AdaptiveAvgPool1d(1),
                nn.Flatten(),
                nn.Linear(width, num_classes),
            )
        else:
            self.fuse = nn.Sequential(
                nn.Linear(width, width),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Linear(width, num_classes),
            )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Fused logits ``(B, num_classes)``."""
        return self.fuse(torch.cat(list(features), dim=1))


class FeatureDiscriminator(nn.Module):
    """AFD's discriminator: one score per sample saying how "real" a feature map looks.

    Maps ``(B, C, L)``: two 3-tap convolutions (the second strided) with LeakyReLU(0.2), global
    average pooling and a linear score; vectors ``(B, D)``: Linear, LeakyReLU(0.2), Linear. No
    sigmoid: the least-squares GAN losses take raw scores.

    Args:
        features: one batch of the features it will judge (only the shape is used).
        hidden: width of the hidden layers.

    Examples:
        >>> FeatureDiscriminator(torch.zeros(2, 4, 6))(torch.randn(2, 4, 6)).shape
        torch.Size([2, 1])
    """

    def __init__(self, features: Tensor, hidden: int = 64) -> None:
        super().__init__()
        _check_features(features, "the discriminated network")
        width = features.shape[1]
        if features.ndim == 3:
            self.score: nn.Module = nn.Sequential(
                nn.Conv1d(width, hidden, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv1d(hidden, hidden, 3, stride=2, padding=1),
                nn.LeakyReLU(0.2),
                nn.AdaptiveAvgPool1d(1),
                nn.Flatten(),
                nn.Linear(hidden, 1),
            )
        else:
            self.score = nn.Sequential(
                nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
            )

    def forward(self, features: Tensor) -> Tensor:
        """Scores ``(B, 1)``."""
        return self.score(features)


def feature_adapter(source: Tensor, target: Tensor) -> nn.Module:
    """Map features shaped like ``source`` to the shape of ``target``: identity when they match,
    else a linear layer (vectors) or a 1×1 convolution (maps of the same length).

    Examples:
        >>> feature_adapter(torch.zeros(2, 3, 5), torch.zeros(2, 4, 5))(torch.zeros(2, 3, 5)).shape
        torch.Size([2, 4, 5])
    """
    if source.shape[1:] == target.shape[1:]:
        return nn.Identity()
    if source.ndim == target.ndim == 2:
        return nn.Linear(source.shape[1], target.shape[1])
    if source.ndim == target.ndim == 3 and source.shape[2] == target.shape[2]:
        return nn.Conv1d(source.shape[1], target.shape[1], 1)
    raise ValueError(
        f"cannot match features shaped {tuple(source.shape[1:])} to {tuple(target.shape[1:])}: "
        f"tap layers whose outputs have the same kind and length (method.feature_layers)"
    )
