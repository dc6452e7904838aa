"""Every phase killed with SIGKILL and relaunched ends as an uninterrupted run.

A killed student epoch is `tests/test_resume.py` (the epoch is replayed from its start); a killed
sweep `tests/test_sweep_resume.py`; a killed DDP run `tests/test_resume_ddp.py`. Here: teacher
training, an output-cache build, a Pro-KD stage, a checkpoint write and an LM sequence-cache build,
each through the real command.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from .test_lm_cache_app import TINY_LM

pytestmark = pytest.mark.slow  # real subprocesses, killed and relaunched

SYNTHETIC = [
    "experiment=smoke",
    "data=synthetic",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.deterministic=true",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The command, with a SIGKILL of itself halfway through writing the epoch-1 checkpoint.
KILLED_IN_CHECKPOINT_WRITE = """
import os, runpy, signal, sys

fsync = os.fsync

def die_half_written(fd):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".epoch001.ckpt.partial"):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)

os.fsync = die_half_written
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def launch(args: list[str], cwd: Path, script: str | None = None) -> subprocess.Popen:
    """``python -m <args>`` (or ``script`` given ``args``) in ``cwd``, its output in ``cwd/log``."""
    env = {
        **os.environ,
        **ONE_THREAD,
        "KD_LIGHTNING_CACHE": str(cwd / "cache"),
        "KD_LIGHTNING_LOGS": str(cwd / "logs"),
    }
    command = (
        [sys.executable, "-m", *args] if script is None else [sys.executable, "-c", script, *args]
    )
    log = open(cwd / "log", "w")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(args: list[str], cwd: Path) -> None:
    process = launch(args, cwd)
    assert process.wait(timeout=600) == 0, (cwd / "log").read_text()[-3000:]


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], cwd: Path) -> None:
    """SIGKILL ``process`` as soon as ``ready()``; fail if it ends first."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"ended before the kill: {(cwd / 'log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "not ready after 300 s"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


def same_tree(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same file names with the same contents: the same bytes, or for
    safetensors files (whose header orders its metadata at random) the same tensors and metadata."""
    assert [p.relative_to(a) for p in files(a)] == [p.relative_to(b) for p in files(b)]
    for path in files(a):
        other = b / path.relative_to(a)
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as first, safe_open(other, "pt") as second:
                assert first.metadata() == second.metadata(), path
                names = sorted(first.keys())
                assert names == sorted(second.keys()), path
                for key in names:
                    assert torch.equal(first.get_tensor(key), second.get_tensor(key)), (path, key)
        else:
            assert filecmp.cmp(path, other, shallow=False), path


def same_weights(a: Path, b: Path) -> None:
    """The checkpoints ``a`` and ``b`` hold identical weights, at the same step."""
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first["global_step"] == second["global_step"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][key], value, rtol=0, atol=0, msg=key)


def summary(run_dir: Path) -> dict:
    """The run's ``summary.json`` without its wall time."""
    written = json.loads((run_dir / "summary.json").read_text())
    written.pop("wall_time_s")
    return written


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    return clean, killed


def test_killed_teacher_training_leaves_no_teacher_and_trains_it_again(tmp_path):
    clean, killed = dirs(tmp_path)
    args = [
        "kd_lightning.cli.teachers",
        *SYNTHETIC,
        "teachers=[mlp]",
        "teacher_epochs=3",
        "trainer.enable_progress_bar=true",  # the teacher's bar says which epoch it trains
    ]
    finish(args, clean)
    process = launch(args, killed)
    kill_when(process, lambda: "teacher mlp · epoch 2/3" in (killed / "log").read_text(), killed)
    assert files(killed / "cache") == []  # no teacher file, whole or partial
    finish(args, killed)
    same_tree(clean / "cache", killed / "cache")  # the same teacher, bit for bit


def test_killed_output_cache_build_is_removed_and_built_again(tmp_path):
    clean, killed = dirs(tmp_path)
    mnist1d = [*SYNTHETIC[:1], *SYNTHETIC[2:]]
    args = ["kd_lightning.cli.cache", *mnist1d, "teachers=[cnn,gru]"]
    finish(["kd_lightning.cli.teachers", *mnist1d, "teachers=[cnn,gru]"], clean)
    for kept in ("teachers", "data"):
        shutil.copytree(clean / "cache" / kept, killed / "cache" / kept)
    outputs = killed / "cache" / "outputs"
    process = launch(args, killed)
    kill_when(process, lambda: any(outputs.glob(".partial-*/*.npy")), killed)
    (partial,) = outputs.iterdir()
    assert partial.name.startswith(".partial-") and not (partial / "manifest.json").exists()
    finish(args, killed)
    assert "teacher-output cache: " in (killed / "log").read_text()
    finish(args, clean)
    same_tree(clean / "cache" / "outputs", outputs)  # the partial build is gone


def test_killed_prokd_stage_is_trained_again_to_the_same_student(tmp_path):
    clean, killed = dirs(tmp_path)
    args = [
        "kd_lightning.cli.train",
        *SYNTHETIC,
        "method=prokd",
        "teachers=[mlp]",
        "teacher_epochs=20",  # the trajectory stage: 80 steps, a state kept every 20
        "baseline=false",
        "~callbacks.heatmap",
    ]
    finish([*args, f"hydra.run.dir={clean / 'run'}"], clean)
    stages = killed / "run" / "stages"
    process = launch([*args, f"hydra.run.dir={killed / 'run'}"], killed)
    kill_when(process, lambda: (stages / "prokd-mlp-0.safetensors").exists(), killed)
    assert not (stages / "prokd-mlp-3.safetensors").exists()  # killed inside the stage
    finish([*args, f"hydra.run.dir={killed / 'run'}"], killed)
    same_tree(clean / "run" / "stages", stages)
    same_weights(
        clean / "run" / "checkpoints" / "last.ckpt", stages.parent / "checkpoints" / "last.ckpt"
    )
    assert summary(clean / "run") == summary(killed / "run")


def test_killed_checkpoint_write_resumes_from_the_last_whole_checkpoint(tmp_path):
    clean, killed = dirs(tmp_path)
    args = [
        "kd_lightning.cli.train",
        *SYNTHETIC,
        "teachers=[mlp]",
        "trainer.max_epochs=3",
        "baseline=false",
        "~callbacks.heatmap",
        "+student.dropout=0.1",
    ]
    finish([*args, f"hydra.run.dir={clean / 'run'}"], clean)
    shutil.copytree(clean / "cache" / "teachers", killed / "cache" / "teachers")
    run_dir = killed / "run"
    process = launch([*args, f"hydra.run.dir={run_dir}"], killed, KILLED_IN_CHECKPOINT_WRITE)
    assert process.wait(timeout=600) == -signal.SIGKILL, (killed / "log").read_text()[-3000:]
    checkpoints = run_dir / "checkpoints"
    names = sorted(path.name for path in checkpoints.iterdir())
    assert names == [".epoch001.ckpt.partial", "epoch000.ckpt", "last.ckpt"]  # never read
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0
    finish([*args, f"hydra.run.dir={run_dir}"], killed)
    assert not (checkpoints / ".epoch001.ckpt.partial").exists()
    assert "resuming from" in (killed / "log").read_text()
    same_weights(clean / "run" / "checkpoints" / "last.ckpt", checkpoints / "last.ckpt")


def test_killed_lm_cache_build_keeps_its_chunks_and_resumes_to_the_clean_cache(tmp_path):
    clean, killed = dirs(tmp_path)
    args = ["kd_lightning.cli.cache", *TINY_LM, "cache_top_k=16", "data.max_bytes=60000"]
    finish(args, clean)  # trains the two teachers, then caches
    # The text's cache_dir enters the teachers' keys: train them here too.
    finish(["kd_lightning.cli.teachers", *args[1:]], killed)
    outputs = killed / "cache" / "outputs"
    process = launch(args, killed)
    kill_when(process, lambda: any(outputs.glob(".partial-*/train.00001.npy")), killed)
    (partial,) = outputs.iterdir()
    kept = {path.name: path.stat().st_mtime_ns for path in partial.glob("*.npy")}
    assert "train.00000.npy" in kept and not (partial / "manifest.json").exists()
    finish(args, killed)
    (cache,) = outputs.iterdir()
    assert cache.name == partial.name.removeprefix(".partial-")
    assert {name: (cache / name).stat().st_mtime_ns for name in kept} == kept  # reused, not rerun
    same_tree(clean / "cache" / "outputs", outputs)
