"""Ready-made input transforms for teachers trained on preprocessed sequences (MNIST-1D-like).

Give them to :class:`~kd_lightning.teachers.TeacherEnsemble` as ``input_transforms``, or in a
teacher config as ``input_transform: {_target_: kd_lightning.teachers.ReverseSequence}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Standardize(nn.Module):
    """``(x − mean) / std``, for a teacher trained on standardised inputs.

    ``mean`` and ``std`` are scalars or anything broadcasting against the inputs (e.g. one value
    per position of a ``(B, L)`` sequence). They are buffers: they follow ``.to(device)``.

    Args:
        mean: value(s) to subtract.
        std: positive value(s) to divide by.

    Examples:
        >>> Standardize(mean=1.0, std=2.0)(torch.tensor([[1.0, 3.0, -1.0]]))
        tensor([[ 0.,  1., -1.]])
        >>> x = torch.randn(100, 40) * 3 + 5
        >>> z = Standardize.from_data(x)(x)
        >>> bool(z.mean(0).abs().max() < 1e-5), bool((z.std(0) - 1).abs().max() < 1e-5)
        (True, True)
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        mean: float | Sequence[float] | Tensor = 0.0,
        std: float | Sequence[float] | Tensor = 1.0,
    ) -> None:
        super().__init__()
        mean_tensor = torch.as_tensor(mean, dtype=torch.float32)
        std_tensor = torch.as_tensor(std, dtype=torch.float32)
        if not torch.isfinite(mean_tensor).all():
            raise ValueError("Standardize: mean must be finite")
        if not (torch.isfinite(std_tensor).all() and (std_tensor > 0).all()):
            raise ValueError("Standardize: std must be finite and positive")
        self.register_buffer("mean", mean_tensor.clone())
        self.register_buffer("std", std_tensor.clone())

    @classmethod
    def from_data(
        cls, data: Tensor, dim: int | tuple[int, ...] = 0, eps: float = 1e-8
    ) -> Standardize:
        """Mean and standard deviation of ``data`` over ``dim`` (default: per feature)."""
        data = data.float()
        return cls(data.mean(dim), data.std(dim).clamp_min(eps))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        if self.mean.numel() == 1 and self.std.numel() == 1:
            return f"mean={self.mean.item():g}, std={self.std.item():g}"
        return f"mean: {tuple(self.mean.shape)}, std: {tuple(self.std.shape)}"


class ReverseSequence(nn.Module):
    """Reverse the inputs along ``dim`` (the time axis), for a teacher trained on reversed sequences.

    Args:
        dim: the axis to flip; ``-1`` is the sequence axis of ``(B, L)`` and ``(B, 1, L)`` inputs.

    Examples:
        >>> ReverseSequence()(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        tensor([[3, 2, 1],
                [6, 5, 4]])
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flip(self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
