"""Weighted means of a few scalars over an epoch, kept on the device with no sync per step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


class RunningMeans:
    """Weighted sums and total weights of named scalars, divided once at the end.

    A step costs two small tensor ops and no host-device sync, unlike one ``LightningModule.log``
    call per value (whose result bookkeeping costs about a millisecond of Python per call on a CPU).
    :meth:`compute` takes a ``reduce`` function, e.g. a sum over DDP processes, applied to the sums
    and weights together before dividing: means over N processes equal those of one process on the
    same data (counts are summed, not per-process ratios averaged).

    Sums are float64 (float32 on MPS, which lacks float64), so token counts stay exact.

    Args:
        names: the scalars, in a fixed order.

    Examples:
        >>> means = RunningMeans(["loss", "acc"])
        >>> means.update([torch.tensor(2.0), torch.tensor(1.0)], [3, torch.tensor(3)])
        >>> means.update([torch.tensor(4.0), torch.tensor(0.0)], [1, torch.tensor(1)])
        >>> {name: round(value.item(), 3) for name, value in means.compute().items()}
        {'loss': 2.5, 'acc': 0.75}
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"RunningMeans needs distinct names, got {list(names)}")
        self.names = tuple(names)
        self._totals: Tensor | None = None  # (2, N): weighted sums, then total weights

    def reset(self) -> None:
        """Forget every update."""
        self._totals = None

    def update(self, values: Sequence[Tensor], weights: Sequence[Tensor | float]) -> None:
        """Add ``weight · value`` for each name (in :attr:`names` order); scalars, any dtype."""
        if len(values) != len(self.names) or len(weights) != len(self.names):
            raise ValueError(
                f"RunningMeans.update needs {len(self.names)} values and weights "
                f"({', '.join(self.names)}), got {len(values)} and {len(weights)}"
            )
        device = values[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        with torch.no_grad():  # a handful of kernels per step, none recorded by autograd
            value = torch.stack([v.reshape(()) if v.ndim else v for v in values]).to(dtype)
            if any(isinstance(w, Tensor) for w in weights):
                weight = torch.stack(
                    [torch.as_tensor(w, device=device).reshape(()).to(dtype) for w in weights]
                )
            else:
                weight = torch.tensor(weights, dtype=dtype, device=device)
            step = torch.stack([value * weight, weight])
            self._totals = step if self._totals is None else self._totals.add_(step)

    def compute(
        self, reduce: Reduce | None = None, device: torch.device | None = None
    ) -> dict[str, Tensor]:
        """The float32 weighted mean of each name whose total weight is positive.

        Args:
            reduce: applied to the ``(2, N)`` sums and weights before dividing (e.g. a sum over
                processes). Called even without updates (with zeros), so every process joins.
            device: where the zeros live when nothing was added.
        """
        totals = self._totals
        if totals is None:
            dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64
            totals = torch.zeros(2, len(self.names), dtype=dtype, device=device)
        if reduce is not None:
            totals = reduce(totals)
        sums, weights = totals
        return {
            name: (sums[index] / weights[index]).float()
            for index, name in enumerate(self.names)
            if weights[index] > 0
        }
