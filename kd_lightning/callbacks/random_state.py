"""Keep the random state in checkpoints, so a resumed run draws the numbers the first run would."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class RandomStateCheckpoint(Callback):
    """Store the global random states in every checkpoint and set them back when it is loaded.

    Lightning 2.x checkpoints hold the model, optimizers, schedulers, loops and callback states, but
    not the random generators: a resumed run would shuffle its next epochs and draw its dropout
    masks from whatever state the fresh process reached. This callback saves the states of
    :mod:`torch` (CPU and CUDA), :mod:`numpy` and :mod:`random` when a checkpoint is written and
    sets them back as soon as Lightning loads the checkpoint's callback states, before
    ``configure_optimizers`` and before the train ``DataLoader``'s iterator is created (which draws
    the epoch's shuffling order from the global torch generator). Whatever the relaunch did before
    (seeding, building models) does not matter, and the sanity check runs in an isolated random
    state.

    Exact for checkpoints written at the end of a training epoch, as ``ModelCheckpoint`` does by
    default: the states then saved are those the next epoch's iterator and dropout masks draw from.
    (From a mid-epoch checkpoint Lightning 2.x restarts the epoch's plain ``DataLoader`` from its
    first batch while counting on from the saved batch index, so such a resume is never exact; a
    run killed mid-epoch resumes from the last epoch end instead and replays the whole epoch.)
    Under DDP every rank's states are gathered into the checkpoint (``{"ranks": [...]}``, one
    entry per rank) and each rank resumes with its own, so ranks whose draws differ (augmentation,
    dropout on batches of different sizes, per-rank seeds) continue as an uninterrupted run
    would. Resumed in a group of another size, each rank takes the states of rank
    ``rank mod saved ranks`` and a warning says the resume is not exact. Strategies that restore
    checkpoints after setup (DeepSpeed, FSDP) create the iterator first and are not exact either.
    The states are stored as tensors and plain Python values, so the checkpoint still loads with
    ``torch.load(weights_only=True)``.

    Examples:
        >>> callback = RandomStateCheckpoint()
        >>> state = callback.state_dict()
        >>> first = torch.rand(2)
        >>> callback.load_state_dict(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """

    def state_dict(self) -> dict[str, Any]:
        states = [_random_states()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [{}] * dist.get_world_size()
            dist.all_gather_object(states, _random_states())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("ranks", [state_dict])  # one state: an earlier, rank-0-only format
        rank, world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if len(saved) != world_size:
            log.warning(
                "the checkpoint holds the random states of %d rank(s) and this run has %d: rank %d "
                "resumes with those of rank %d, so the resume is not exact",
                len(saved),
                world_size,
                rank,
                rank % len(saved),
            )
        _set_random_states(saved[rank % len(saved)])


def _random_states() -> dict[str, Any]:
    """This process's torch (CPU, and CUDA when in use), NumPy and Python random states."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (
            str(kind),
            torch.from_numpy(np.asarray(key, dtype=np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gaussian),
        ),
        "python": (int(version), torch.tensor(internal, dtype=torch.int64), gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(value) for value in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
