"""Content fingerprints of teachers and datasets, the keys of the teacher-output cache."""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.teachers.ensemble import TeacherEnsemble

#: Hex digits kept from a SHA-256 digest (80 bits).
DIGEST_CHARS = 20


class NondeterministicDataError(ValueError):
    """A dataset gave two different samples for the same index (random augmentation)."""


def _update(digest: Any, value: Any) -> None:
    """Feed ``value`` (tensors, arrays, numbers, strings, and mappings or sequences of them)."""
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"array:{value.dtype}:{value.shape}:".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"map:{len(value)}:".encode())
        for key in sorted(value, key=str):
            _update(digest, str(key))
            _update(digest, value[key])
    elif isinstance(value, str | bytes):
        encoded = value.encode() if isinstance(value, str) else value
        digest.update(f"str:{len(encoded)}:".encode() + encoded)
    elif isinstance(value, Sequence):
        digest.update(f"seq:{len(value)}:".encode())
        for item in value:
            _update(digest, item)
    elif value is None or isinstance(value, bool | numbers.Number):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


def fingerprint(value: Any) -> str:
    """A short SHA-256 hex digest of ``value``'s contents (dtype, shape and bytes of tensors).

    Examples:
        >>> fingerprint({"w": torch.zeros(2)}) == fingerprint({"w": torch.zeros(2)})
        True
        >>> fingerprint(torch.zeros(2)) == fingerprint(torch.zeros(2, dtype=torch.float64))
        False
    """
    digest = hashlib.sha256()
    _update(digest, value)
    return digest.hexdigest()[:DIGEST_CHARS]


def _callable_name(function: Any) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__qualname__)}"


def _module_description(module: nn.Module) -> dict[str, Any]:
    """Class, ``repr`` (its settings) and every parameter and buffer of ``module``."""
    kind = type(module)
    return {
        "class": f"{kind.__module__}.{kind.__qualname__}",
        "repr": repr(module),
        "state": dict(module.state_dict()),
    }


def teacher_fingerprint(ensemble: TeacherEnsemble, name: str) -> str:
    """Fingerprint of everything deciding teacher ``name``'s logits in ``ensemble``.

    Its weights and buffers (e.g. BatchNorm statistics), its class and ``repr``, its input
    transform (an ``nn.Module`` by class, settings and state; a plain callable by qualified name
    only), its output adapter (by name), its class map and the ensemble's ``num_classes``. Names
    of the other teachers do not enter it.

    Examples:
                >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3)})
        >>> before = teacher_fingerprint(ensemble, "a")
        >>> with torch.no_grad():
        ...     ensemble.teachers["a"].bias += 1
        >>> teacher_fingerprint(ensemble, "a") == before
        False
    """
    transform = ensemble.input_transform(name)
    if isinstance(transform, nn.Module):
        transform_description: Any = _module_description(transform)
    else:
        transform_description = None if transform is None else _callable_name(transform)
    adapter = ensemble.output_adapters.get(name)
    return fingerprint(
        {
            "teacher": _module_description(ensemble.teachers[name]),
            "input_transform": transform_description,
            "output_adapter": None
            if adapter is None
            else _callable_name(adapter) + f":{getattr(adapter, '__name__', '')}",
            "class_map": ensemble.class_maps.get(name),
            "num_classes": ensemble.num_classes,
        }
    )


def dataset_fingerprint(dataset: Dataset) -> str:
    """Fingerprint of a map-style dataset's samples, read in index order.

    A ``TensorDataset`` is hashed through its tensors directly; any other dataset sample by
    sample, so the hash covers what its deterministic transform produces. Sample 0 is read twice:
    a dataset that returns different samples for the same index (random augmentation) raises
    :class:`NondeterministicDataError`, since its teacher outputs could not be cached.

    Examples:
        >>> data = TensorDataset(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0]))
        >>> dataset_fingerprint(data) == dataset_fingerprint(TensorDataset(*data.tensors))
        True
    """
    if isinstance(dataset, TensorDataset):
        return fingerprint(["TensorDataset", list(dataset.tensors)])
    size = len(dataset)  # type: ignore[arg-type]
    if size and fingerprint(dataset[0]) != fingerprint(dataset[0]):
        raise NondeterministicDataError(
            f"{type(dataset).__name__} returns a different sample each time index 0 is read "
            "(random augmentation?): teacher outputs of random samples cannot be cached"
        )
    digest = hashlib.sha256(f"{type(dataset).__name__}:{size}:".encode())
    for index in range(size):
        _update(digest, dataset[index])
    return digest.hexdigest()[:DIGEST_CHARS]
