"""A method module under a process group destroys the group at exit (a gloo group left to the
interpreter's finalisation sometimes aborts a rank that trained well)."""

from __future__ import annotations

import atexit

import torch.distributed as dist
from torch import nn

from kd_lightning.modules.base import MethodModule
from kd_lightning.modules.process_group import destroy_process_group_at_exit


class Plain(MethodModule):
    def __init__(self) -> None:
        super().__init__(["loss"])
        self.student = nn.Linear(4, 3)


def test_setup_under_a_group_registers_its_destruction_at_exit_once(tmp_path, monkeypatch):
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    destroy_process_group_at_exit.cache_clear()
    module = Plain()
    try:
        module.setup("fit")  # no group: nothing to destroy
        assert registered == []
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )
        module.setup("fit")
        module.setup("validate")
        Plain().setup("fit")
        assert len(registered) == 1
        registered[0]()  # what the interpreter runs at exit
        assert not dist.is_initialized()
        registered[0]()  # and again, with no group left: nothing to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        destroy_process_group_at_exit.cache_clear()
