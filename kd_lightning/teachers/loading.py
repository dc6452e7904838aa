"""Safe loading of teacher weights from Lightning checkpoints, state-dict files and safetensors.

Nothing here unpickles arbitrary objects: ``.safetensors`` files hold raw tensors, and every other
file goes through ``torch.load(weights_only=True)``, which refuses any pickle that would build an
object other than tensors and plain containers.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_lightning.errors import TeacherLoadError

StateDict = dict[str, Tensor]


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a state dict from a Lightning checkpoint, a ``torch.save`` file or a safetensors file.

    A Lightning checkpoint is recognised by its ``"state_dict"`` entry; its keys keep their prefixes
    (e.g. ``"model."``), which :func:`load_teacher` strips.

    Args:
        path: the file to read.

    Raises:
        TeacherLoadError: the file is missing, unreadable, would need unsafe unpickling, or holds
            something other than a mapping of names to tensors.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.pt")
        >>> torch.save(nn.Linear(2, 3).state_dict(), path)
        >>> sorted(read_state_dict(path))
        ['bias', 'weight']
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherLoadError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: object = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TeacherLoadError(
            f"refused to load {path}: it holds objects other than tensors and plain containers, "
            f"and loading it could run arbitrary code. Re-save it as a state dict or safetensors "
            f"file from a trusted environment. ({str(error).splitlines()[0]})"
        ) from error
    except Exception as error:
        raise TeacherLoadError(f"cannot read checkpoint {path}: {error}") from error
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in content.items()
    ):
        raise TeacherLoadError(
            f"{path} is not a state dict: expected a mapping of parameter names to tensors "
            f"(or a Lightning checkpoint with a 'state_dict' entry)"
        )
    return dict(content)


def strip_prefix(state_dict: Mapping[str, Tensor], expected: set[str]) -> StateDict:
    """Find the key prefix (e.g. ``"model."``) under which ``state_dict`` holds ``expected`` keys.

    Returns ``state_dict`` unchanged when its keys already match, else the sub-dict under the
    shortest prefix whose stripped keys equal ``expected``.

    Raises:
        KeyError: no prefix makes the keys match.

    Examples:
        >>> strip_prefix({"model.w": torch.zeros(1), "loss.t": torch.ones(1)}, {"w"})
        {'w': tensor([0.])}
    """
    if set(state_dict) == expected:
        return dict(state_dict)
    prefixes = sorted(
        {key[: index + 1] for key in state_dict for index, char in enumerate(key) if char == "."},
        key=lambda prefix: (len(prefix), prefix),
    )
    for prefix in prefixes:
        sub = {
            key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
        }
        if set(sub) == expected:
            return sub
    raise KeyError(prefix_mismatch_message(set(state_dict), expected))


def prefix_mismatch_message(found: set[str], expected: set[str]) -> str:
    """Describe how two key sets differ, listing a few keys of each side."""
    missing = sorted(expected - found)[:5]
    unexpected = sorted(found - expected)[:5]
    return f"keys do not match the model: missing {missing}, unexpected {unexpected}"


def load_teacher(
    model: nn.Module,
    path: str | os.PathLike[str],
    name: str | None = None,
    prefix: str | None = None,
) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    Args:
        model: the teacher architecture, freshly built.
        path: Lightning checkpoint, ``torch.save``'d state dict or safetensors file.
        name: the teacher's name, used in error messages.
        prefix: key prefix to strip (e.g. ``"model."``); found automatically when ``None``.

    Raises:
        TeacherLoadError: naming the teacher and the file, when the file cannot be read safely or
            its keys or shapes do not fit ``model``.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "teacher.pt")
        >>> torch.save({"state_dict": {"model.weight": torch.ones(1, 2), "model.bias": torch.zeros(1)}}, path)
        >>> load_teacher(nn.Linear(2, 1), path, name="linear").weight
        Parameter containing:
        tensor([[1., 1.]], requires_grad=True)
    """
    label = f"teacher '{name}'" if name else "teacher"
    try:
        state_dict = read_state_dict(path)
    except TeacherLoadError as error:
        raise TeacherLoadError(f"{label}: {error}") from error
    expected = set(model.state_dict())
    try:
        if prefix is not None:
            state_dict = {
                key[len(prefix) :]: value
                for key, value in state_dict.items()
                if key.startswith(prefix)
            }
            if set(state_dict) != expected:
                raise KeyError(prefix_mismatch_message(set(state_dict), expected))
        else:
            state_dict = strip_prefix(state_dict, expected)
        model.load_state_dict(state_dict)
    except (KeyError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) else str(error)
        raise TeacherLoadError(f"{label}: {path} does not fit the model: {message}") from error
    return model
