"""Batch-wise MNIST-1D training augmentation."""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.models.checks import check_non_negative


def augment_mnist1d(
    x: Tensor,
    max_shift: int = 4,
    scale: float = 0.1,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Randomly shift, rescale and perturb a batch of 1-D signals, independently per sample.

    Each row is shifted by an integer in ``[-max_shift, max_shift]`` without wrap-around (the
    vacated steps repeat the edge value), multiplied by a factor uniform in
    ``[1 - scale, 1 + scale]``, and added Gaussian noise of standard deviation ``noise``.

    Args:
        x: Float batch of shape ``(B, L)``; it is not modified.
        max_shift: Largest shift, in steps.
        scale: Half-width of the amplitude factor's range.
        noise: Standard deviation of the additive noise.
        generator: Random generator on ``x``'s device; the global one when None.

    Returns:
        The augmented batch, shaped like ``x``.

    Examples:
        >>> batch = torch.zeros(4, 40)
        >>> augment_mnist1d(batch, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 40])
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a float tensor of shape (B, L), got {x.dtype} {tuple(x.shape)}"
        )
    check_non_negative(max_shift=max_shift, scale=scale, noise=noise)
    batch, length = x.shape
    shifts = torch.randint(
        -max_shift, max_shift + 1, (batch, 1), generator=generator, device=x.device
    )
    source = (torch.arange(length, device=x.device) - shifts).clamp(0, length - 1)
    shifted = torch.gather(x, 1, source)
    factors = 1 + scale * (
        2 * torch.rand(batch, 1, generator=generator, device=x.device, dtype=x.dtype) - 1
    )
    gaussian = torch.randn(batch, length, generator=generator, device=x.device, dtype=x.dtype)
    return shifted * factors + noise * gaussian
