"""What goes wrong on one DDP rank ends the run on every rank, with a message, without a hang:
an exception in a training step, a NaN loss (stopped or skipped on all ranks together), and a
method whose backward passes reach only part of its parameters under a DDP strategy not told so.

Multi-process runs happen in a child process in its own session, under a timeout: a hang fails
the test instead of blocking CI, and afterwards no process of that session may be left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kd_lightning.cli.train import strategy_for
from kd_lightning.cli.validation import validate_config
from kd_lightning.errors import ConfigError
from kd_lightning.modules import DistillationModule, DMLModule

from .app_helpers import FAST, compose_config
from .conftest import small_mlp

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MESSAGE = "teacher exploded on rank 1 at step 2"
TIMEOUT_S = 120

SCRIPT = textwrap.dedent(
    f"""
    import multiprocessing
    import sys

    import lightning as L
    import torch
    from torch import nn

    from kd_lightning import DistillationModule
    from kd_lightning.data import SyntheticDataModule


    class FailingTeacher(nn.Module):
        \"\"\"A linear teacher that raises at its third training call (step 2) on rank 1.\"\"\"

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 4)
            self.calls = 0

        def forward(self, inputs):
            self.calls += 1
            if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
                if self.calls == 3:
                    raise RuntimeError({MESSAGE!r})
            return self.linear(inputs)


    def main():
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        module = DistillationModule(student, {{"ok": nn.Linear(8, 4), "bad": FailingTeacher()}})
        trainer = L.Trainer(
            strategy="ddp_spawn",
            devices=2,
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        datamodule = SyntheticDataModule(
            num_samples=256, in_features=8, num_classes=4, batch_size=8
        )
        try:
            trainer.fit(module, datamodule=datamodule)
        except BaseException as error:  # what the caller of fit sees
            print("FIT RAISED", type(error).__name__, flush=True)
            print(str(error), flush=True)
            children = multiprocessing.active_children()
            print("CHILDREN LEFT", len(children), flush=True)
            sys.exit(3)
        print("FIT RETURNED", flush=True)
        sys.exit(0)


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
@linux_only
def test_an_exception_on_one_rank_fails_fit_with_its_message(tmp_path):
    returncode, output = run_script(tmp_path, SCRIPT)
    assert returncode == 3, output[-4000:]
    raised = output[output.index("FIT RAISED") :]
    # Usually the failing rank's own error is reported; if rank 0 died of the closed connection
    # first, torch reports that one instead — the job still went down with an error, not a hang.
    assert MESSAGE in raised or "Connection closed by peer" in raised, output[-4000:]
    assert "CHILDREN LEFT 0" in raised, output[-4000:]


NAN_SCRIPT = textwrap.dedent(
    """
    import sys

    import lightning as L
    import torch
    from torch import nn

    from kd_lightning.callbacks import NonFiniteLossGuard
    from kd_lightning.data import SyntheticDataModule
    from kd_lightning.modules import ClassifierModule


    class NaNOnRank1(nn.Module):
        \"\"\"A linear network whose third training call (step 2) gives NaN on rank 1 only.\"\"\"

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 4)
            self.calls = 0

        def forward(self, inputs):
            self.calls += 1
            logits = self.linear(inputs)
            if torch.distributed.get_rank() == 1 and self.calls == 3:
                return logits * float("nan")
            return logits


    def main(mode):
        torch.manual_seed(0)
        network = NaNOnRank1()
        trainer = L.Trainer(
            strategy="ddp_spawn",
            devices=2,
            accelerator="cpu",
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[NonFiniteLossGuard(mode)],
        )
        datamodule = SyntheticDataModule(
            num_samples=256, in_features=8, num_classes=4, batch_size=8
        )
        try:
            trainer.fit(ClassifierModule(network), datamodule=datamodule)
        except BaseException as error:
            print("FIT RAISED", type(error).__name__, flush=True)
            print(str(error), flush=True)
            sys.exit(3)
        finite = all(bool(torch.isfinite(p).all()) for p in network.parameters())
        skipped = trainer.callback_metrics["train/skipped_steps"].item()
        print("FIT RETURNED skipped", skipped, "finite", finite, flush=True)


    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


@pytest.mark.slow
@linux_only
def test_a_nan_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    returncode, output = run_script(tmp_path, NAN_SCRIPT, "skip")
    assert returncode == 0, output[-4000:]
    assert "FIT RETURNED skipped 1.0 finite True" in output, output[-4000:]


@pytest.mark.slow
@linux_only
def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    returncode, output = run_script(tmp_path, NAN_SCRIPT, "stop")
    assert returncode == 3, output[-4000:]
    raised = output[output.index("FIT RAISED") :]
    # Every rank raises at step 2; whichever the launcher reports, it names the step.
    assert "non-finite loss at global step 2 (epoch 0, batch 2)" in raised, output[-4000:]


PARTIAL_BACKWARD_SCRIPT = textwrap.dedent(
    """
    import sys

    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch import nn

    from kd_lightning.data import SyntheticDataModule
    from kd_lightning.modules import DMLModule


    def main():
        trainer = L.Trainer(
            strategy=DDPStrategy(start_method="spawn", find_unused_parameters=False),
            devices=2,
            accelerator="cpu",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = DMLModule(nn.Linear(8, 4), nn.Linear(8, 4))  # sequential: one peer at a time
        datamodule = SyntheticDataModule(
            num_samples=64, in_features=8, num_classes=4, batch_size=8
        )
        try:
            trainer.fit(module, datamodule=datamodule)
        except BaseException as error:
            print("FIT RAISED", type(error).__name__, flush=True)
            print(str(error), flush=True)
            sys.exit(3)


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
@linux_only
def test_a_partial_backward_under_ddp_without_unused_parameters_is_refused(tmp_path):
    returncode, output = run_script(tmp_path, PARTIAL_BACKWARD_SCRIPT)
    assert returncode == 3, output[-4000:]
    raised = output[output.index("FIT RAISED") :]
    assert "trainer.strategy.find_unused_parameters: DMLModule back-propagates" in raised
    assert "DDPStrategy(find_unused_parameters=True)" in raised


def test_the_config_sets_find_unused_parameters_as_the_method_needs(tmp_path):
    cfg = compose_config(tmp_path, [*FAST, "method=dml", "accelerator=ddp_cpu"])
    assert cfg.trainer.strategy.find_unused_parameters is None  # as the method needs
    sequential = DMLModule(small_mlp(), small_mlp())
    simultaneous = DMLModule(small_mlp(), small_mlp(), update="simultaneous")
    distillation = DistillationModule(small_mlp(), {"a": small_mlp()})
    assert strategy_for(cfg, sequential) == {"strategy": {"find_unused_parameters": True}}
    for module in (simultaneous, distillation):
        assert strategy_for(cfg, module) == {"strategy": {"find_unused_parameters": False}}
    cfg.trainer.strategy.find_unused_parameters = True  # the user's choice stands
    assert strategy_for(cfg, distillation) == {}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (
            "trainer.strategy.find_unused_parameters=false",
            "trainer.strategy.find_unused_parameters=false: method=dml back-propagates",
        ),
        (
            "trainer.strategy=ddp_spawn",
            "trainer.strategy=ddp_spawn: method=dml back-propagates",
        ),
    ],
)
def test_a_strategy_refusing_partial_backward_is_a_config_error(tmp_path, override, key):
    cfg = compose_config(tmp_path, [*FAST, "method=dml", "accelerator=ddp_cpu", override])
    with pytest.raises(ConfigError) as raised:
        validate_config(cfg)
    assert [problem for problem in raised.value.problems if problem.startswith(key)], str(
        raised.value
    )


def run_script(tmp_path: Path, source: str, *args: str) -> tuple[int, str]:
    """Run ``source`` as a script in its own session, under :data:`TIMEOUT_S`; its exit status
    and output. Fails on a hang, and when a process of the session is left running."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    # A session of its own: every process the run starts can be found (and killed) by its group.
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    group = process.pid
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the run hung for over {TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        leftovers = wait_for_group_to_exit(group, timeout_s=15)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running: {leftovers}"
    assert time.monotonic() - start < TIMEOUT_S
    return process.returncode, output


def wait_for_group_to_exit(group: int, timeout_s: float) -> list[int]:
    """The pids still alive (not zombies) in process group ``group`` after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [pid for pid, state, pgrp in processes() if pgrp == group and state != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def processes() -> list[tuple[int, str, int]]:
    """``(pid, state, process group)`` of every process, from ``/proc/<pid>/stat``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        # The command name, in parentheses, may hold spaces: the fields follow the last ")".
        state, _parent, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        found.append((int(stat.parent.name), state, int(pgrp)))
    return found
