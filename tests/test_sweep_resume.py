"""A multirun killed during its second job and relaunched with the same ``hydra.sweep.dir``
finishes: the finished job is skipped, the interrupted one resumes from its ``last.ckpt``, the
last one runs, and the sweep's table covers all three."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

FUSIONS = ["mean_probs", "entropy", "confidence"]
SWEEP = [
    "-m",
    "kd_lightning.cli.train",
    "-m",
    f"fusion={','.join(FUSIONS)}",
    "experiment=smoke",
    "data=synthetic",
    "teachers=[mlp]",
    "trainer.max_epochs=3",  # room to kill the second job between two epochs
    "trainer.enable_progress_bar=false",
    "logger=none",
    "baseline=false",
]


def launch(tmp_path: Path, sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "KD_LIGHTNING_CACHE": str(tmp_path / "cache"),
        "KD_LIGHTNING_LOGS": str(tmp_path / "logs"),
    }
    return subprocess.Popen(
        [sys.executable, *SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, killed whole
    )


def kill_when(process: subprocess.Popen, path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {path} existed:\n{process.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path} after {timeout_s} s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def test_a_killed_sweep_resumes_skipping_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    first = launch(tmp_path, sweep)
    kill_when(first, sweep / "1" / "checkpoints" / "last.ckpt")  # written after epoch000.ckpt
    assert (sweep / "0" / "summary.json").is_file()
    assert not (sweep / "1" / "summary.json").exists(), "the second job ended before the kill"
    finished = {
        path: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in [sweep / "0" / "summary.json", *(sweep / "0" / "checkpoints").iterdir()]
    }

    second = launch(tmp_path, sweep)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]

    assert "job 0: skipped, an earlier launch finished it" in output
    for path, (content, mtime) in finished.items():  # job 0 was not run again
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (content, mtime), path
    assert f"resuming from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in output
    for job in ("1", "2"):
        last = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["epoch"] == 2, job  # all three epochs
    summaries = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in range(3)]
    assert [summary["fusion"] for summary in summaries] == FUSIONS
    assert [job["job"] for job in json.loads((sweep / "summary.json").read_text())] == [
        "0",
        "1",
        "2",
    ]
    rows = [
        line
        for line in (sweep / "summary.md").read_text().splitlines()
        if line[:3] in ("| 0", "| 1", "| 2")
    ]
    assert [row.split(" | ")[1].split()[0] for row in rows] == [f"fusion={f}" for f in FUSIONS]


def test_a_relaunch_with_other_overrides_is_refused(tmp_path):
    sweep = tmp_path / "sweep"
    kill_when(launch(tmp_path, sweep), sweep / "0" / "job.json")

    changed = launch(tmp_path, sweep, "seed=1")
    output, _ = changed.communicate(timeout=600)
    assert changed.returncode != 0
    assert (
        f"hydra.sweep.dir={sweep}: job 0 ({sweep / '0'}) was launched with the overrides" in output
    )
    assert "relaunch the same sweep to finish it, or use a new hydra.sweep.dir" in output
