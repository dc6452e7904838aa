"""A write that finds no room (a full disk, simulated by a file-size limit) stops the command with
an error naming the config key and the file, and leaves nothing a later run would read; relaunched
with room, the command ends as a clean run does."""

from __future__ import annotations

import filecmp
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from .app_helpers import run_command
from .test_lm_cache_app import TINY_LM

pytestmark = pytest.mark.slow  # real subprocesses, each training or caching

MNIST1D = ["experiment=smoke", "logger=none", "trainer.enable_progress_bar=false"]
SYNTHETIC = [*MNIST1D, "data=synthetic"]  # generated in memory: no data file to carry over
TEXT = [*TINY_LM, "cache_top_k=16"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NO_ROOM = "File too large (the disk is full or a file-size limit was hit)"


def run(args: list[str], cwd: Path, file_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m <args>`` in ``cwd``; with ``file_limit``, no file it writes may exceed that
    many bytes (writes past it fail with ``EFBIG``, as on a full disk)."""
    if file_limit is None:
        return run_command(["-m", *args], cwd, ONE_THREAD)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a signal that kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return run_command(["-m", *args], cwd, ONE_THREAD, preexec_fn=limit)


def files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


def weights(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors (its header orders the metadata at random)."""
    with safe_open(path, "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def same_tree(a: Path, b: Path) -> None:
    """``a`` and ``b`` hold the same file names with the same bytes."""
    assert [p.relative_to(a) for p in files(a)] == [p.relative_to(b) for p in files(b)]
    for path in files(a):
        assert filecmp.cmp(path, b / path.relative_to(a), shallow=False), path


def test_teacher_weights_on_a_full_disk(tmp_path):
    clean, full = tmp_path / "clean", tmp_path / "full"
    clean.mkdir(), full.mkdir()
    teachers = ["kd_lightning.cli.teachers", *SYNTHETIC, "teachers=[mlp]"]
    assert run(teachers, clean).returncode == 0
    (teacher,) = files(clean / "cache" / "teachers")  # 1.1 MB

    failed = run(teachers, full, file_limit=500_000)
    assert failed.returncode == 1
    path = full / "cache" / "teachers" / teacher.name
    assert (
        f"teachers.mlp: paths.cache_dir={full / 'cache'}: could not write {path}" in failed.stderr
    )
    assert "File too large" in failed.stderr
    assert files(full / "cache") == []  # not even a partial file
    assert run(teachers, full).returncode == 0
    (metadata, tensors), (clean_metadata, clean_tensors) = weights(path), weights(teacher)
    assert metadata == clean_metadata and tensors.keys() == clean_tensors.keys()
    assert all(torch.equal(tensors[key], clean_tensors[key]) for key in tensors)


def test_output_cache_on_a_full_disk(tmp_path):
    clean, full = tmp_path / "clean", tmp_path / "full"
    clean.mkdir(), full.mkdir()
    assert run(["kd_lightning.cli.teachers", *MNIST1D, "teachers=[mlp]"], clean).returncode == 0
    for kept in ("teachers", "data"):  # the teacher and the generated data, as the clean run's
        shutil.copytree(clean / "cache" / kept, full / "cache" / kept)

    cache = ["kd_lightning.cli.cache", *MNIST1D, "teachers=[mlp]"]
    failed = run(cache, full, file_limit=100_000)  # the train split's logits take 140 kB
    assert failed.returncode == 1
    outputs = full / "cache" / "outputs"
    assert f"paths.cache_dir={full / 'cache'}: could not write {outputs}/.partial-" in failed.stderr
    assert f"train.teacher0.logits.npy: {NO_ROOM}; the partial build was removed" in failed.stderr
    assert list(outputs.iterdir()) == []
    assert run(cache, full).returncode == 0
    assert run(cache, clean).returncode == 0
    same_tree(clean / "cache" / "outputs", outputs)


def test_lm_sequence_cache_on_a_full_disk(tmp_path):
    clean, full = tmp_path / "clean", tmp_path / "full"
    clean.mkdir(), full.mkdir()
    cache = ["kd_lightning.cli.cache", *TEXT]
    assert run(cache, clean).returncode == 0  # trains the two teachers, then caches
    # The text's cache_dir enters the teachers' keys: train them here too (0.4 MB, over the limit).
    assert run(["kd_lightning.cli.teachers", *TEXT], full).returncode == 0

    failed = run(cache, full, file_limit=100_000)  # a chunk of 64 training blocks takes 169 kB
    assert failed.returncode == 1
    outputs = full / "cache" / "outputs"
    (partial,) = outputs.iterdir()
    assert partial.name.startswith(".partial-")
    assert files(partial) == []  # the chunk being written was removed
    # NumPy reports the short write ("64 requested and 37 written"), not its errno.
    assert (
        f"paths.cache_dir={full / 'cache'}: could not write {partial / 'train.00000.npy'}: "
    ) in failed.stderr
    assert f"; the finished chunks stay in {partial}, which no reader opens" in failed.stderr
    assert run(cache, full).returncode == 0
    same_tree(clean / "cache" / "outputs", outputs)


def test_a_student_checkpoint_that_cannot_be_written_leaves_none(tmp_path):
    clean, full = tmp_path / "clean", tmp_path / "full"
    clean.mkdir(), full.mkdir()
    train = ["kd_lightning.cli.train", *SYNTHETIC, "teachers=[mlp]", "baseline=false"]
    assert run([*train, f"hydra.run.dir={clean / 'run'}"], clean).returncode == 0
    shutil.copytree(clean / "cache" / "teachers", full / "cache" / "teachers")

    run_dir = full / "run"
    failed = run([*train, f"hydra.run.dir={run_dir}"], full, file_limit=150_000)  # a ckpt: 210 kB
    assert failed.returncode == 1
    assert (
        f"while training the student (checkpoints go to {run_dir / 'checkpoints'})" in failed.stderr
    )
    assert "File too large" in failed.stderr
    assert files(run_dir / "checkpoints") == []  # no part of a checkpoint to resume from
    assert run([*train, f"hydra.run.dir={run_dir}"], full).returncode == 0
    reference = torch.load(clean / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    relaunched = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(relaunched["state_dict"][key], value, rtol=0, atol=0, msg=key)
