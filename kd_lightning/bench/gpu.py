"""``make bench-gpu``: the benchmarks that need a GPU to mean much, in one run, written as one JSON.

Three parts, each timed on ``--device`` (CUDA by default):

* ``fast_paths``: one ensemble forward under each teacher fast path
  (:func:`~kd_lightning.bench.fast_paths.time_fast_paths`, with ``torch.compile`` on CUDA);
* ``lm``: the ``kd-bench --lm`` workloads (:mod:`kd_lightning.bench.lm`) at 4× the width and
  batch of the CPU defaults (peak device memory per workload on CUDA);
* ``offload``: K = 3 teacher LMs run as a :class:`~kd_lightning.teachers.TeacherEnsemble` with
  and without ``offload=True``: milliseconds per forward, the teacher bytes lent to the device at
  the peak, and on CUDA the peak device memory.

Run ``python -m kd_lightning.bench.gpu --json bench-gpu.json`` (under 8 minutes on one GPU), or
``--device cpu --quick`` to check the plumbing in seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kd_lightning.bench.fast_paths import time_fast_paths
from kd_lightning.bench.lm import (
    QUICK,
    LMSize,
    format_lm_report,
    run_lm_benchmark,
    scaled,
    teacher_lms,
)
from kd_lightning.bench.run import machine
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.offload import peak_weight_bytes

GPU_SIZE = scaled(LMSize(teacher_layers=4, steps=16), 4)
"""The LM workloads on a GPU: student d256×2, teachers d384×4, batch 32 of 128 tokens."""


def time_offload(
    size: LMSize, device: torch.device, calls: int, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Median ms per forward of K teacher LMs, kept on the device or offloaded, with the teacher
    bytes on the device at the peak and, on CUDA, the peak memory allocated."""
    vocab_size = 258  # byte tokens
    tokens = torch.randint(0, vocab_size, (size.batch_size, size.block_size), device=device)
    table: dict[str, dict[str, Any]] = {}
    for offload in (False, True):
        teachers = teacher_lms(size, vocab_size, seed)
        ensemble = TeacherEnsemble(teachers, offload=offload).to(device)
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(calls + 1):  # the first call warms up
            start = time.perf_counter()
            ensemble(tokens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(1000 * (time.perf_counter() - start))
        table["offload" if offload else "on_device"] = {
            "ms_per_forward": statistics.median(times[1:]),
            "teacher_bytes_at_peak": peak_weight_bytes(teachers.values(), offload),
            "peak_memory_bytes": (
                torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            ),
        }
        del ensemble
    return table


def run_gpu_benchmark(device: torch.device, quick: bool, seed: int = 0) -> dict[str, Any]:
    """The three parts on ``device``; ``quick`` shrinks every one to seconds on a CPU."""
    size = QUICK if quick else GPU_SIZE
    fast_paths = time_fast_paths(
        device,
        batch_size=16 if quick else 500,
        calls=2 if quick else 20,
        repeats=2 if quick else 5,
        compile=device.type == "cuda" and not quick,
        seed=seed,
    )
    lm = run_lm_benchmark(size, epochs=2 if quick else 8, warmup=1, seed=seed, device=device)
    offload = time_offload(size, device, calls=2 if quick else 20, seed=seed)
    return {
        "machine": machine(torch.get_num_threads(), device),
        "quick": quick,
        "fast_paths_ms_per_forward": fast_paths,
        "lm": lm,
        "offload": offload,
    }


def format_offload(table: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'teachers':<10} {'ms/forward':>11} {'weights MiB':>12} {'peak MiB':>9}"]
    for name, entry in table.items():
        peak = entry["peak_memory_bytes"]
        lines.append(
            f"{name:<10} {entry['ms_per_forward']:>11.2f} "
            f"{entry['teacher_bytes_at_peak'] / 2**20:>12.2f} "
            f"{'-' if peak is None else f'{peak / 2**20:.1f}':>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kd_lightning.bench.gpu",
        description="Fast paths, LM workloads and teacher offloading on one device, as one JSON.",
    )
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="write the results there")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    report = run_gpu_benchmark(device, args.quick, args.seed)
    print(format_lm_report(report["lm"]))
    print(format_offload(report["offload"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
