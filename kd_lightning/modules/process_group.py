"""The default process group, destroyed when the interpreter exits, whatever its backend."""

from __future__ import annotations

import atexit
import functools

import torch.distributed as dist


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit, before the interpreter finalises.

    Lightning does this for NCCL only. A gloo group left to the interpreter's finalisation
    sometimes aborts its process once training is over ("terminate called without an active
    exception", SIGABRT), so a rank that trained well exits with an error and ``ddp_spawn``
    fails the whole fit. Every :class:`~kd_lightning.modules.base.MethodModule` calls this in
    ``setup`` under a process group; registering twice is a no-op.

    Examples:
        >>> destroy_process_group_at_exit()  # at exit: nothing to destroy outside a group
    """
    atexit.register(_destroy_process_group)
