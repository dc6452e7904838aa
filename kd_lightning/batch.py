"""Turn a DataModule's batches into ``(inputs, targets)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kd_lightning.errors import BatchFormatError


class BatchAdapter:
    """Unpack ``(inputs, targets, ...)`` tuples and ``{input_key: ..., target_key: ...}`` dicts.

    Extra tuple items (e.g. sample indices) and extra dict keys are ignored, so an existing
    project's DataModule can feed a distillation module unchanged.

    Args:
        input_key: the dict key holding the model inputs.
        target_key: the dict key holding the class labels.

    Example:
        >>> adapter = BatchAdapter(input_key="x", target_key="label")
        >>> adapter({"x": 1, "label": 2, "id": 3})
        (1, 2)
        >>> adapter((1, 2))
        (1, 2)
    """

    def __init__(self, input_key: str = "input", target_key: str = "target") -> None:
        self.input_key = input_key
        self.target_key = target_key

    def __call__(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, Mapping):
            missing = [key for key in (self.input_key, self.target_key) if key not in batch]
            if missing:
                raise BatchFormatError(
                    f"batch dict has keys {sorted(map(str, batch))} but no {missing}: set "
                    f"BatchAdapter(input_key=..., target_key=...) to the keys of your DataModule"
                )
            return batch[self.input_key], batch[self.target_key]
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
            return batch[0], batch[1]
        raise BatchFormatError(
            f"cannot unpack a batch of type {type(batch).__name__}: expected an (inputs, targets) "
            f"tuple or a dict with keys '{self.input_key}' and '{self.target_key}'"
        )

    def __repr__(self) -> str:
        return f"BatchAdapter(input_key={self.input_key!r}, target_key={self.target_key!r})"
