"""Teacher offloading: teachers live in host memory and visit the compute device one at a time.

With ``TeacherEnsemble(..., offload=True)`` each teacher's weights and buffers are copied to the
compute device just before its forward and the copies dropped just after it, so the device holds
the student and the largest teacher, never the sum of the teachers. Teachers are frozen, so
nothing is copied back: the host tensors stay the teachers' only lasting state.

Swaps go through ``tensor.data``, as ``module.cuda()`` does: the parameter and buffer objects stay
the same (weight ties, RNNs' lists of their weights, hooks and ``torch.compile``'s view of the
module keep working), and so do the state dict keys. On CUDA the host tensors are pinned once, at
their first copy, and copied without blocking the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, a shared (tied) tensor counted once.

    Examples:
        >>> weight_bytes(nn.Linear(3, 2))  # 6 weights and 2 biases, float32
        32
    """
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def peak_weight_bytes(teachers: Iterable[nn.Module], offload: bool) -> int:
    """Bytes of teacher weights on the compute device at the peak of a forward: every teacher's,
    or with ``offload`` the largest teacher's.

    Examples:
        >>> teachers = [nn.Linear(3, 2), nn.Linear(30, 2)]  # 32 and 248 bytes
        >>> peak_weight_bytes(teachers, offload=False), peak_weight_bytes(teachers, offload=True)
        (280, 248)
    """
    sizes = [weight_bytes(teacher) for teacher in teachers]
    return max(sizes, default=0) if offload else sum(sizes)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """The device copy of one host tensor (asynchronous when the host tensor is pinned)."""
    return host.to(device, non_blocking=host.is_pinned())


class TeacherOffload:
    """Where offloaded teachers run, and the lending of one teacher at a time to that device.

    Attributes:
        device: the compute device: where the ensemble was last moved (``.to()``, ``.cuda()``,
            as Lightning moves a module), its teachers staying on the host.
        peak_bytes: the most bytes of teacher tensors lent to the device at once so far.

    Examples:
        >>> offload = TeacherOffload()
        >>> teacher = nn.Linear(3, 2)
        >>> with offload.lent(teacher):
        ...     teacher.weight.device.type
        'cpu'
        >>> offload.peak_bytes
        32
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.peak_bytes = 0
        self._lent_bytes = 0

    def moved(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow a ``Module._apply`` function: teachers run where it moves tensors from now on."""
        self.device = fn(torch.empty(0, device=self.device)).device

    @contextlib.contextmanager
    def lent(self, teacher: nn.Module) -> Iterator[None]:
        """``teacher``'s parameters and buffers on :attr:`device` inside the block, then its host
        tensors back and the device copies dropped."""
        swapped: list[tuple[Tensor, Tensor]] = []  # (parameter or buffer, its host tensor)
        try:
            # Outside inference mode: copies and pinned host tensors are ordinary tensors, as
            # the weights were (an inference tensor could not be loaded into later).
            with torch.inference_mode(False):
                self._lend(teacher, swapped)
            yield
        finally:
            with torch.inference_mode(False):
                for tensor, host in swapped:
                    tensor.data = host
                    self._lent_bytes -= host.numel() * host.element_size()

    def _lend(self, teacher: nn.Module, swapped: list[tuple[Tensor, Tensor]]) -> None:
        for tensor in (*teacher.parameters(), *teacher.buffers()):  # a tied weight once
            host = tensor.data
            if self.device.type == "cuda" and host.device.type == "cpu" and not host.is_pinned():
                host = tensor.data = host.pin_memory()  # once: it stays pinned
            tensor.data = to_device(host, self.device)
            swapped.append((tensor, host))
            self._lent_bytes += host.numel() * host.element_size()
        self.peak_bytes = max(self.peak_bytes, self._lent_bytes)


def on_host(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn`` (a ``Module._apply`` function) for a tensor that stays on its device: a move
    becomes its dtype change alone; any other function applies as it is.

    Examples:
        >>> to_double_on_meta = on_host(lambda t: t.to("meta", torch.float64))
        >>> moved = to_double_on_meta(torch.zeros(2))
        >>> moved.device, moved.dtype
        (device(type='cpu'), torch.float64)
    """

    def apply(tensor: Tensor) -> Tensor:
        target = fn(tensor.new_empty(0))  # where and in which dtype fn puts it, copying nothing
        if target.device == tensor.device:
            return fn(tensor)
        return tensor.to(dtype=target.dtype)

    return apply
