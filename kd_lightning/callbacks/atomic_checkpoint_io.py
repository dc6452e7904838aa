"""Checkpoints written beside their target, flushed to disk, then renamed into place."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to ``.<name>.partial`` in its own directory, flush it to disk and
    rename it over the target, so that a kill or a full disk never leaves a truncated checkpoint,
    wherever the system's temporary directory is.

    Lightning's own writer stages a checkpoint in the system temporary directory (through
    fsspec) and moves it into place: a rename on the same file system, but a copy onto the target
    when the temporary directory lies elsewhere (a tmpfs, another disk), which a kill can cut
    short, losing the last good ``last.ckpt`` too. ``kd-train`` uses this writer for the student's
    checkpoints (not under FSDP, which writes its own). Remote paths (``s3://`` ...) are left to
    Lightning.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> AtomicCheckpointIO().save_checkpoint({"epoch": 3}, folder / "checkpoints" / "last.ckpt")
        >>> [path.name for path in (folder / "checkpoints").iterdir()]
        ['last.ckpt']
        >>> torch.load(folder / "checkpoints" / "last.ckpt")["epoch"]
        3
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        buffer = io.BytesIO()  # serialised first, so that a failed write is an OSError
        torch.save(checkpoint, buffer)
        try:
            with open(partial, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
