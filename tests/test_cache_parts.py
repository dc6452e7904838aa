"""Rank-sharded cache builds: each rank runs the teachers over its own rows, one rank merges."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.cli import logit_cache as app_output_cache
from kd_lightning.data import SyntheticDataModule
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.build import (
    PARTIAL_PREFIX,
    CachedTeachers,
    build_output_cache,
    cache_fingerprint,
    remove_partial_builds,
)
from kd_lightning.teachers.cache.parts import (
    PART_MANIFEST,
    PARTS_PREFIX,
    MissingPartsError,
    row_range,
)

from .app_helpers import FAST, compose_config
from .test_output_cache import ensemble

BATCH = 8
# With 37 train and 9 val samples in batches of 8, rank 0 of 2 gets train batches 0-1 and val
# batch 0; rank 1 the train batches 2-4 and val batch 1. Val rows carry ids 100 + row.
RANK_ROWS = {0: [*range(0, 16), *range(100, 108)], 1: [*range(16, 37), 108]}


def splits() -> dict[str, Dataset]:
    """Column 0 of each input is its row id (train ``row``, val ``100 + row``)."""
    generator = torch.Generator().manual_seed(0)
    train, val = torch.randn(37, 6, generator=generator), torch.randn(9, 6, generator=generator)
    train[:, 0], val[:, 0] = torch.arange(37.0), 100 + torch.arange(9.0)
    return {
        "train": TensorDataset(train, torch.zeros(37)),
        "val": TensorDataset(val, torch.zeros(9)),
    }


def recording(teachers: TeacherEnsemble) -> list[int]:
    """The row ids teacher ``wide`` runs over, in order, from now on."""
    seen: list[int] = []
    teachers.teachers["wide"].register_forward_pre_hook(
        lambda module, args: seen.extend(args[0][:, 0].round().long().tolist())
    )
    return seen


def run_ranks(
    root: Path, ranks: list[int], top_k: int | None = None, wait_s: float = 60.0
) -> tuple[dict[int, CachedTeachers], dict[int, list[int]]]:
    """Ranks ``ranks`` of 2 building concurrently (threads); their caches and the rows each ran."""
    teachers = {rank: ensemble() for rank in ranks}  # before the threads: seeding is global
    seen = {rank: recording(teachers[rank]) for rank in ranks}
    data = splits()
    with ThreadPoolExecutor(len(ranks)) as pool:
        futures = {
            rank: pool.submit(
                build_output_cache,
                teachers[rank],
                data,
                root,
                top_k=top_k,
                batch_size=BATCH,
                rank=rank,
                world_size=2,
                wait_s=wait_s,
            )
            for rank in ranks
        }
        return {rank: future.result() for rank, future in futures.items()}, seen


def files_of(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in path.iterdir()}


def single_process_files(root: Path, top_k: int | None = None) -> dict[str, bytes]:
    return files_of(
        build_output_cache(ensemble(), splits(), root, top_k=top_k, batch_size=BATCH).path
    )


@pytest.mark.parametrize("top_k", [None, 2])
def test_two_ranks_build_the_single_process_cache_each_over_its_own_rows(tmp_path, top_k):
    caches, seen = run_ranks(tmp_path / "ranks", [0, 1], top_k=top_k)
    assert seen == RANK_ROWS
    assert caches[0].path == caches[1].path
    expected = single_process_files(tmp_path / "single", top_k)
    assert files_of(caches[0].path) == expected  # arrays and manifest, byte for byte
    assert len(expected) == 1 + 2 * 3 * (1 if top_k is None else 3)  # manifest, split×teacher
    # The parts directory is gone: only the cache is left.
    assert [path.name for path in (tmp_path / "ranks").iterdir()] == [caches[0].path.name]


def test_a_rank_alone_times_out_naming_the_missing_part_and_its_part_is_reused(tmp_path):
    with pytest.raises(MissingPartsError, match=r"rank 0 of 2: after 0.3 s, parts part1of2 are "):
        run_ranks(tmp_path, [0], wait_s=0.3)
    key, _ = cache_fingerprint(ensemble(), splits(), batch_size=BATCH)
    parts = tmp_path / f"{PARTS_PREFIX}{key}"
    assert [path.name for path in parts.iterdir()] == ["part0of2"]
    assert not (tmp_path / key).exists()

    caches, seen = run_ranks(tmp_path, [0, 1])  # a relaunch
    assert seen == {0: [], 1: RANK_ROWS[1]}  # rank 0's part was reused, not run again
    assert files_of(caches[0].path) == single_process_files(tmp_path / "single")


def test_a_part_without_its_manifest_is_never_merged_but_rebuilt(tmp_path):
    with pytest.raises(MissingPartsError):
        run_ranks(tmp_path, [0], wait_s=0.0)
    key, _ = cache_fingerprint(ensemble(), splits(), batch_size=BATCH)
    killed = tmp_path / f"{PARTS_PREFIX}{key}" / "part0of2"
    (killed / PART_MANIFEST).unlink()  # as if killed after its arrays, before its manifest
    for array_file in killed.glob("*.npy"):
        np.load(array_file, mmap_mode="r+")[:] = 0

    with pytest.raises(MissingPartsError, match=rf"parts part0of2 are still missing in .*{key}"):
        run_ranks(tmp_path, [1], wait_s=0.3)
    caches, seen = run_ranks(tmp_path, [0])
    assert seen == {0: RANK_ROWS[0]}
    assert files_of(caches[0].path) == single_process_files(tmp_path / "single")


def test_only_dead_processes_partial_parts_are_removed(tmp_path):
    with pytest.raises(MissingPartsError):
        run_ranks(tmp_path, [0], wait_s=0.0)
    (parts,) = tmp_path.glob(f"{PARTS_PREFIX}*")
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    host = socket.gethostname()
    dead = parts / f"{PARTIAL_PREFIX}part1of2-{host}-{finished.stdout.strip()}-0123abcd"
    live = parts / f"{PARTIAL_PREFIX}part1of2-{host}-{os.getpid()}-4567cdef"
    dead_cache = (
        tmp_path
        / f"{PARTIAL_PREFIX}{parts.name.removeprefix(PARTS_PREFIX)}-{host}-{finished.stdout.strip()}-89abcdef"
    )
    for path in (dead, live, dead_cache):
        path.mkdir()
    assert remove_partial_builds(tmp_path) == sorted([dead_cache, dead])
    assert sorted(path.name for path in parts.iterdir()) == sorted([live.name, "part0of2"])
    shutil.rmtree(live)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 2, "world_size": 2}, r"rank must lie in \[0, world_size=2\), got rank=2"),
        ({"rank": -1, "world_size": 2}, r"rank must lie in \[0, world_size=2\), got rank=-1"),
        ({"rank": 0, "world_size": 0}, "world_size must be at least 1, got world_size=0"),
        ({"rank": True, "world_size": 2}, "rank must be an integer, got True"),
        ({"rank": 0, "world_size": 2.0}, "world_size must be an integer, got 2.0"),
        ({"rank": 0, "world_size": 2, "wait_s": -1}, "wait_s must be a non-negative number"),
    ],
)
def test_bad_rank_or_world_size_is_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        build_output_cache(ensemble(), splits(), tmp_path / "root", **options)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(("size", "batch_size"), [(37, 8), (9, 8), (5, 1), (3, 4), (100, 7)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_rows_split_whole_batches_in_order(size, batch_size, world_size):
    ranges = [row_range(size, rank, world_size, batch_size) for rank in range(world_size)]
    assert [row for rows in ranges for row in rows] == list(range(size))
    batches = -(-size // batch_size)
    for rows in ranges:
        assert rows.start % batch_size == 0 and (rows.stop % batch_size == 0 or rows.stop == size)
        assert -(-len(rows) // batch_size) in (batches // world_size, -(-batches // world_size))


TORCHRUN_BUILD = """
import json, sys
from pathlib import Path
import torch
from kd_lightning.cli.logit_cache import build_ranks
from kd_lightning.teachers.cache.build import build_output_cache
from tests.test_cache_parts import BATCH, ensemble, recording, splits

torch.set_num_threads(1)
rank, world_size, _ = build_ranks()
teachers = ensemble()
seen = recording(teachers)
build_output_cache(
    teachers, splits(), sys.argv[1], batch_size=BATCH, rank=rank, world_size=world_size, wait_s=120
)
Path(sys.argv[2], f"seen{rank}.json").write_text(json.dumps(seen))
"""


@pytest.mark.slow  # two real processes launched by torchrun
def test_torchrun_ranks_share_the_build(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(TORCHRUN_BUILD)
    repo = Path(__file__).resolve().parents[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*launch, str(script), str(tmp_path / "root"), str(tmp_path)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {rank: json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in range(2)}
    assert seen == RANK_ROWS
    (cache_dir,) = (tmp_path / "root").iterdir()
    assert files_of(cache_dir) == single_process_files(tmp_path / "single")


TORCHRUN_RANK_1 = {
    "TORCHELASTIC_RUN_ID": "job",
    "RANK": "1",
    "GROUP_RANK": "0",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "WORLD_SIZE": "2",
}
LIGHTNING_DDP_RANK_1 = {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}


def test_open_output_cache_shares_the_build_under_torchrun_only(tmp_path, monkeypatch):
    cfg = compose_config(tmp_path, [*FAST, "cache=true", "cache_wait_s=90"])
    calls: list[dict] = []

    def capture(teachers, datasets, root, **options):
        calls.append(options)
        return SimpleNamespace(path=Path(root) / "key")

    monkeypatch.setattr(app_output_cache, "build_output_cache", capture)
    data = SyntheticDataModule(num_samples=64, in_features=6, num_classes=5, batch_size=16)
    teachers = TeacherEnsemble({"a": nn.Linear(6, 5)})
    for name in {*TORCHRUN_RANK_1, *LIGHTNING_DDP_RANK_1}:
        monkeypatch.delenv(name, raising=False)
    for environment in ({}, LIGHTNING_DDP_RANK_1, TORCHRUN_RANK_1):
        with monkeypatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            app_output_cache.open_output_cache(cfg, teachers, data)
    assert [(call["rank"], call["world_size"]) for call in calls] == [(0, 1), (0, 1), (1, 2)]
    assert all(call["device"] == torch.device("cpu") for call in calls)
    assert all(call["wait_s"] == 90.0 for call in calls)
