"""Peak memory of one ``kd-bench`` workload, measured alone in a fresh process.

A process's maximum RSS only grows, so in the benchmark's single process it says nothing about one
workload. Each workload is therefore run again, one epoch, in its own ``python -m
kd_lightning.bench.memory`` process, which reports:

* ``peak_rss_growth_bytes``: the peak resident memory during the epoch minus the resident memory
  just before it, with the models already built (Linux: the kernel's high-water mark is reset
  through ``/proc/self/clear_refs``; elsewhere ``null``). Activations, gradients, optimizer state,
  teacher activations and allocator slack: the training's own memory;
* ``peak_cuda_growth_bytes``: the same from ``torch.cuda.max_memory_allocated`` on a GPU;
* ``autograd_saved_bytes_per_step``: bytes of the tensors autograd saved for backward, per step
  (counted by ``torch.autograd.graph.saved_tensors_hooks``): teachers that run under ``no_grad``
  add nothing here;
* ``student_weight_bytes`` and ``teacher_weight_bytes``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from kd_lightning.bench.workloads import Workload, build_workload, make_teachers, training_data
from kd_lightning.models import MLP
from kd_lightning.teachers.offload import weight_bytes

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def _reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark; return the resident bytes now, or ``None`` if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None


def probe(
    name: str,
    teachers: Sequence[str],
    batch_size: int,
    num_samples: int,
    limit_batches: int | None,
    seed: int,
) -> dict[str, Any]:
    """Build workload ``name`` as ``kd-bench`` does, train it one epoch here, report its memory."""
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodule = training_data(batch_size, num_samples)
    workload = Workload(name, device, total_epochs=1)
    workload.turns = _NoTurns()  # type: ignore[assignment]
    train = build_workload(
        name, workload, teachers, datamodule.train_dataloader(), limit_batches, seed
    )
    torch.manual_seed(seed)
    student_bytes = weight_bytes(MLP())
    live = name in ("live", "handwritten", "aekd")
    teacher_bytes = sum(weight_bytes(model) for model in make_teachers(teachers).values())

    saved = {"bytes": 0, "steps": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    def count_step(*_: Any) -> None:
        saved["steps"] += 1

    hook = register_optimizer_step_post_hook(count_step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        cuda_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _reset_peak_rss()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            train()
    finally:
        hook.remove()
    peak_rss = _status_bytes("VmHWM") if rss_before is not None else None
    return {
        "workload": name,
        "peak_rss_growth_bytes": (
            None if peak_rss is None or rss_before is None else peak_rss - rss_before
        ),
        "peak_cuda_growth_bytes": (
            torch.cuda.max_memory_allocated() - cuda_before if device.type == "cuda" else None
        ),
        "autograd_saved_bytes_per_step": saved["bytes"] / max(1, saved["steps"]),
        "student_weight_bytes": student_bytes,
        "teacher_weight_bytes": teacher_bytes if live else 0,
    }


class _NoTurns:
    """Alone in its process, a workload never waits for a turn."""

    def wait_turn(self) -> None:
        pass

    def end_turn(self) -> None:
        pass


def memory_table(probes: dict[str, dict[str, Any]]) -> list[str]:
    """The lines of a table of :func:`probe` reports, one row per workload."""
    header = (
        f"{'workload':<18} {'peak MiB':>9} {'saved KiB/step':>15} {'student MiB':>12} "
        f"{'teachers MiB':>13}"
    )
    lines = [
        "memory, each workload alone for one epoch in a fresh process: peak growth over the "
        "built models (RSS, or CUDA allocated), autograd's saved tensors per step, weights",
        header,
        "-" * len(header),
    ]
    for name, probe in probes.items():
        peak = probe["peak_cuda_growth_bytes"] or probe["peak_rss_growth_bytes"]
        peak_text = "n/a" if peak is None else f"{peak / 2**20:.1f}"
        lines.append(
            f"{name:<18} {peak_text:>9} {probe['autograd_saved_bytes_per_step'] / 2**10:>15.1f} "
            f"{probe['student_weight_bytes'] / 2**20:>12.2f} "
            f"{probe['teacher_weight_bytes'] / 2**20:>13.2f}"
        )
    return lines


def probe_in_subprocess(name: str, **settings: Any) -> dict[str, Any]:
    """Run :func:`probe` in a fresh Python process and return its report."""
    command = [
        sys.executable,
        "-m",
        "kd_lightning.bench.memory",
        json.dumps({"name": name, **settings}),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of workload {name!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(json.dumps(probe(**json.loads(sys.argv[1]))))
