"""A named, frozen ensemble of teachers that returns stacked logits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import TeacherOutputError
from kd_lightning.teachers.loading import load_teacher

OutputAdapter = Callable[[Any], Tensor]


def attribute_adapter(name: str) -> OutputAdapter:
    """Adapter reading logits from an attribute or mapping key of a model output (e.g. ``"logits"``).

    Example:
        >>> attribute_adapter("logits")({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """

    def adapt(output: Any) -> Tensor:
        return output[name] if isinstance(output, Mapping) else getattr(output, name)

    adapt.__name__ = f"attribute_adapter({name!r})"
    return adapt


class TeacherEnsemble(nn.Module):
    """Frozen teachers, run together under ``no_grad``, returning logits stacked as ``(K, B, C)``.

    The ensemble stays in eval mode whatever its parent does: ``.train()`` on a parent module (as
    Lightning calls it each epoch) leaves BatchNorm statistics and dropout of the teachers untouched.
    Parameters have ``requires_grad=False``, so no optimizer or DDP gradient reducer ever sees them.
    Outputs are checked: every teacher must give finite logits of the same shape.

    Args:
        teachers: name → model. Names become log keys (``val/agreement/student_vs_<name>``).
        output_adapters: name → attribute/key name (e.g. ``"logits"``) or a callable turning the
            model's output into logits. Teachers without an adapter must return a tensor.

    Example:
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> ensemble(torch.randn(5, 4)).shape
        torch.Size([2, 5, 3])
        >>> _ = ensemble.train()
        >>> ensemble.training, ensemble.teachers["a"].training
        (False, False)
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        output_adapters: Mapping[str, str | OutputAdapter] | None = None,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        for name in teachers:
            if not name or "." in name or "/" in name or hasattr(nn.ModuleDict, name):
                raise ValueError(
                    f"invalid teacher name {name!r}: use a non-empty name without '.' or '/' that is "
                    f"not an nn.Module attribute"
                )
        unknown = set(output_adapters or {}) - set(teachers)
        if unknown:
            raise ValueError(
                f"output_adapters name unknown teachers {sorted(unknown)}; teachers are {list(teachers)}"
            )
        self.teachers = nn.ModuleDict(teachers)
        self.output_adapters: dict[str, OutputAdapter] = {
            name: attribute_adapter(adapter) if isinstance(adapter, str) else adapter
            for name, adapter in (output_adapters or {}).items()
        }
        self.requires_grad_(False)
        self.train(False)
        self._register_load_state_dict_pre_hook(
            self._keep_missing_teacher_weights, with_module=True
        )

    @classmethod
    def from_checkpoints(
        cls,
        teachers: Mapping[str, nn.Module],
        checkpoints: Mapping[str, str | os.PathLike[str]],
        output_adapters: Mapping[str, str | OutputAdapter] | None = None,
    ) -> TeacherEnsemble:
        """Build the ensemble after loading each teacher's weights safely from its file.

        Every teacher needs a checkpoint; files are read with :func:`load_teacher`.
        """
        missing = set(teachers) - set(checkpoints)
        if missing:
            raise ValueError(f"no checkpoint given for teachers {sorted(missing)}")
        for name, model in teachers.items():
            load_teacher(model, checkpoints[name], name=name)
        return cls(teachers, output_adapters)

    @property
    def names(self) -> list[str]:
        """Teacher names, in the order of the stacked outputs."""
        return list(self.teachers.keys())

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.teachers.values())

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers are locked in eval mode: ``mode`` is ignored."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: Any) -> Tensor:
        """Run every teacher on ``inputs`` and return float32 logits of shape ``(K, B, C)``."""
        logits = [
            self._teacher_logits(name, teacher, inputs) for name, teacher in self.teachers.items()
        ]
        first_name, first = self.names[0], logits[0]
        for name, output in zip(self.names, logits, strict=True):
            if output.shape != first.shape:
                raise TeacherOutputError(
                    f"teachers disagree on output shape: '{first_name}' gives {tuple(first.shape)}, "
                    f"'{name}' gives {tuple(output.shape)} (the last dimension is the number of classes)"
                )
        return torch.stack(logits)

    def _teacher_logits(self, name: str, teacher: nn.Module, inputs: Any) -> Tensor:
        output = teacher(inputs)
        adapter = self.output_adapters.get(name)
        if adapter is not None:
            output = adapter(output)
        if not isinstance(output, Tensor):
            raise TeacherOutputError(
                f"teacher '{name}' returned {type(output).__name__}, not a tensor: "
                f"give it an output adapter, e.g. output_adapters={{'{name}': 'logits'}}"
            )
        output = output.float()
        if not torch.isfinite(output).all():
            raise TeacherOutputError(f"teacher '{name}' produced NaN or inf logits")
        return output

    def _keep_missing_teacher_weights(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
    ) -> None:
        # Student checkpoints leave the teachers out; loading one keeps the teachers' weights.
        for key, value in module.state_dict(prefix=prefix).items():
            state_dict.setdefault(key, value)
