"""``kd-bench --profile WORKLOAD``: where a training step's time goes, by ``torch.profiler``.

The workload (one of :data:`~kd_lightning.bench.workloads.LIGHTNING_WORKLOADS`) trains for a few
warm-up steps, then ``steps`` steps under :class:`torch.profiler.profile`. The table lists the
library's named ranges (``kd/student_forward``, ``kd/teachers``, ``kd/loss``, ``kd/fusion``),
Lightning's hooks (``[LightningModule]...``, ``[Strategy]...``, ``[Callback]...``, recorded by
Lightning's ``PyTorchProfiler``) and the heaviest operators, by CPU time per step (and CUDA time
on a GPU): what to switch on, or off, to go faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.profilers import PyTorchProfiler

from kd_lightning.bench.workloads import (
    LIGHTNING_WORKLOADS,
    lightning_workload,
    make_teachers,
    training_data,
)
from kd_lightning.models import MLP


def profile_workload(
    name: str,
    batch_size: int = 100,
    steps: int = 20,
    warmup: int = 5,
    teachers: Sequence[str] = ("cnn", "gru", "mlp"),
    seed: int = 0,
    rows: int = 25,
) -> dict[str, Any]:
    """Profile ``steps`` training steps of workload ``name`` after ``warmup`` steps.

    Returns:
        ``{"workload", "steps", "rows": [{"name", "calls", "cpu_ms_per_step",
        "cuda_ms_per_step"}]}``, the ``rows`` heaviest ranges and operators by CPU time (the
        ranges a step nests overlap: ``kd/loss`` includes ``kd/fusion``).
    """
    if name not in LIGHTNING_WORKLOADS:
        raise ValueError(f"--profile takes one of {list(LIGHTNING_WORKLOADS)}, got {name!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    make_teachers(teachers)  # unknown names fail before any work
    data = training_data(batch_size, num_samples=max(5000, 2 * batch_size * (steps + warmup)))
    torch.manual_seed(seed)
    module, loader = lightning_workload(name, MLP(), teachers, data.train_dataloader())
    device = "gpu" if torch.cuda.is_available() else "cpu"
    common: dict[str, Any] = {
        "accelerator": device,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    if warmup:
        L.Trainer(max_steps=warmup, **common).fit(module, train_dataloaders=loader)
    profiler = PyTorchProfiler(
        record_module_names=False,
        export_to_chrome=False,
        schedule=torch.profiler.schedule(wait=0, warmup=0, active=steps),
    )
    trainer = L.Trainer(max_steps=steps, profiler=profiler, **common)
    trainer.fit(module, train_dataloaders=loader)
    table = profiler.function_events
    assert table is not None, "the profiler recorded nothing"
    averages = sorted(table.key_averages(), key=lambda event: -event.cpu_time_total)
    recorded = next(
        (event.count for event in averages if event.key.endswith("run_training_batch")), steps
    )
    cuda = torch.cuda.is_available()
    heaviest = [
        {
            "name": event.key,
            "calls": event.count,
            "cpu_ms_per_step": event.cpu_time_total / 1000 / recorded,
            "cuda_ms_per_step": (event.device_time_total / 1000 / recorded) if cuda else None,
        }
        for event in averages
        if not event.key.startswith("ProfilerStep")
    ][:rows]
    return {"workload": name, "steps": recorded, "batch_size": batch_size, "rows": heaviest}


def format_profile(report: dict[str, Any]) -> str:
    """The profile as an aligned table, heaviest first."""
    cuda = report["rows"] and report["rows"][0]["cuda_ms_per_step"] is not None
    width = max(len(row["name"][:70]) for row in report["rows"])
    header = f"{'range or operator':<{width}}  {'calls':>6}  {'cpu ms/step':>11}" + (
        f"  {'cuda ms/step':>12}" if cuda else ""
    )
    lines = [
        f"workload {report['workload']}: {report['steps']} steps of batch {report['batch_size']}",
        header,
        "-" * len(header),
    ]
    for row in report["rows"]:
        line = f"{row['name'][:70]:<{width}}  {row['calls']:>6}  {row['cpu_ms_per_step']:>11.3f}"
        if cuda:
            line += f"  {row['cuda_ms_per_step']:>12.3f}"
        lines.append(line)
    return "\n".join(lines)
