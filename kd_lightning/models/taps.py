"""Capture the outputs of named submodules with forward hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn


class FeatureTaps:
    """Forward hooks on the named submodules of ``module``, keeping each one's latest output.

    ``taps[name]`` (or ``taps.features``) holds the output of the latest forward of
    ``module.get_submodule(name)``. A module returning a tuple or list (e.g. ``nn.GRU``, which
    returns ``(output, h_n)``) is tapped at element 0, one returning a mapping (e.g. a Hugging
    Face ``ModelOutput``) at its first value (``last_hidden_state``). Outputs are stored as they
    are, with their autograd graph (under ``no_grad`` they carry none).

    Args:
        module: the network to tap.
        layers: dotted submodule names, as in :meth:`torch.nn.Module.get_submodule`.

    Examples:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with FeatureTaps(net, ["0"]) as taps:
        ...     _ = net(torch.zeros(5, 4))
        >>> taps["0"].shape
        torch.Size([5, 3])
    """

    def __init__(self, module: nn.Module, layers: Sequence[str]) -> None:
        if isinstance(layers, str):
            layers = [layers]
        self.features: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        targets = {}
        for name in layers:
            try:
                targets[name] = module.get_submodule(name)
            except AttributeError:
                available = [n for n, _ in module.named_modules() if n][:12]
                raise ValueError(
                    f"{type(module).__name__} has no submodule {name!r}; available submodules "
                    f"include {available}"
                ) from None
        for name, target in targets.items():
            self._handles.append(target.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Mapping):
                output = next(iter(output.values()))
            elif isinstance(output, tuple | list):
                output = output[0]
            self.features[name] = output

        return capture

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.features:
            raise KeyError(f"no output captured for {name!r}: run a forward pass first")
        return self.features[name]

    def clear(self) -> None:
        """Forget the captured outputs."""
        self.features.clear()

    def remove(self) -> None:
        """Remove the hooks (captured outputs stay until :meth:`clear`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
