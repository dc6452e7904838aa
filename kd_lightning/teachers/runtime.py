"""How a frozen ensemble runs its teachers: autocast precision, a stacked ``torch.func`` forward
and the check of their logits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from kd_lightning.errors import TeacherOutputError

#: The :class:`~kd_lightning.teachers.TeacherEnsemble` options that say how teachers run (the
#: ``teacher_runtime`` node of the ``kd-train`` config).
RUNTIME_OPTIONS = (
    "autocast_dtype",
    "inference_mode",
    "compile_teachers",
    "stacked",
    "offload",
    "check_finite",
)

#: When a :class:`~kd_lightning.teachers.TeacherEnsemble` checks that its logits are finite.
CheckFinite = Literal["first_step", "always", "never"]
CHECK_FINITE: tuple[CheckFinite, ...] = get_args(CheckFinite)

AUTOCAST_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def autocast_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``autocast_dtype`` as a torch dtype: ``None``, ``torch.bfloat16``/``torch.float16`` or a name.

    Examples:
        >>> autocast_dtype("bf16"), autocast_dtype(None)
        (torch.bfloat16, None)
    """
    if value is None or value in AUTOCAST_DTYPES.values():
        return value  # type: ignore[return-value]
    if isinstance(value, str) and value.lower() in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value.lower()]
    raise ValueError(
        f"autocast_dtype (teacher_runtime.autocast_dtype in kd-train) must be null, bfloat16 or "
        f"float16 (or bf16, fp16), got {value!r}"
    )


@contextlib.contextmanager
def teacher_context(
    device: torch.device, dtype: torch.dtype | None, inference: bool
) -> Iterator[None]:
    """``inference_mode`` (or ``no_grad``), and autocast to ``dtype`` on ``device`` when given."""
    grad_mode = torch.inference_mode() if inference else torch.no_grad()
    with grad_mode:
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def check_finite_logits(names: Sequence[str], logits: Tensor) -> None:
    """Raise :class:`~kd_lightning.errors.TeacherOutputError` naming the first teacher whose row of
    ``logits`` ``(K, ...)`` holds NaN or inf: one reduction, read once (one device sync).

    Examples:
        >>> check_finite_logits(["a", "b"], torch.tensor([[0.0], [float("nan")]]))
        Traceback (most recent call last):
        ...
        kd_lightning.errors.TeacherOutputError: teacher 'b' produced NaN or inf logits
    """
    if not torch.isfinite(logits).all():
        culprit = next(n for n, z in zip(names, logits, strict=True) if not z.isfinite().all())
        raise TeacherOutputError(f"teacher '{culprit}' produced NaN or inf logits")


class StackedForward:
    """Same-architecture teachers run as one ``vmap`` of ``functional_call`` over stacked weights.

    ``torch.func.stack_module_state`` stacks each parameter and buffer of the K teachers along a
    new first dimension; one vectorised call then replaces K calls. The stack is a copy, rebuilt
    whenever a teacher's tensors change (new storage after ``.to()``, or an in-place update such
    as ``load_state_dict``), so it never goes stale.

    Measured on a 2-core CPU it is slower than the loop (see the README); it is off by default
    and meant for many small teachers on a GPU.

    Args:
        teachers: name → model, all of the same class with the same parameter and buffer shapes.

    Examples:
        >>> torch.manual_seed(0) and None
        >>> teachers = {"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}
        >>> x = torch.randn(5, 4)
        >>> stacked = StackedForward(teachers)(x)
        >>> torch.allclose(stacked, torch.stack([teachers["a"](x), teachers["b"](x)]))
        True
    """

    def __init__(self, teachers: Mapping[str, nn.Module]) -> None:
        models = list(teachers.values())
        first_name, first = next(iter(teachers.items()))
        signature = _shapes(first)
        for name, model in teachers.items():
            if type(model) is not type(first) or _shapes(model) != signature:
                raise ValueError(
                    f"stacked=True needs teachers of one architecture: '{name}' "
                    f"({type(model).__name__}) differs from '{first_name}' "
                    f"({type(first).__name__}) in its class or parameter shapes"
                )
        self.models = models
        self._key: tuple[tuple[int, int], ...] | None = None
        self._state: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self._base = first

    def __call__(self, inputs: Tensor) -> Tensor:
        params, buffers = self._stacked_state()

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            return functional_call(self._base, (params, buffers), (inputs,))

        return vmap(one)(params, buffers)

    def _stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        tensors = [t for m in self.models for t in (*m.parameters(), *m.buffers())]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._state is None or key != self._key:
            with torch.no_grad():
                params, buffers = stack_module_state(self.models)  # type: ignore[arg-type]
            self._state = (
                {k: v.detach() for k, v in params.items()},
                {k: v.detach() for k, v in buffers.items()},
            )
            self._key = key
        return self._state


def _shapes(model: nn.Module) -> Sequence[tuple[str, tuple[int, ...]]]:
    return [
        (name, tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers())
    ]
