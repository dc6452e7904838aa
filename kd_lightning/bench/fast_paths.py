"""``kd-bench --fast-paths``: milliseconds per ensemble forward under each teacher fast path.

For a few ensembles (3 and 8 MLP or CNN teachers of MNIST-1D), times one forward of the whole
:class:`~kd_lightning.teachers.TeacherEnsemble` on a batch of random inputs under each runtime
option: the plain loop, ``inference_mode``, the stacked ``torch.func`` forward, bf16 autocast (and
fp16 on a GPU), and with ``compile=True`` ``torch.compile``. Every configuration runs in turn,
``repeats`` rounds of ``calls`` forwards each (round-robin, so machine noise spreads over all of
them); the median round gives the figure. On a GPU each round ends with a synchronisation.

Examples:
    >>> table = time_fast_paths(torch.device("cpu"), calls=1, repeats=1, sizes=(2,), kinds=("mlp",))
    >>> sorted(table["2 × mlp"])
    ['bf16 autocast', 'inference mode', 'loop', 'stacked']
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from kd_lightning.models import CNN1D, MLP
from kd_lightning.teachers import TeacherEnsemble

KINDS: dict[str, Callable[[], nn.Module]] = {
    "mlp": partial(MLP, hidden=512),
    "cnn": CNN1D,
}
IN_FEATURES = 40  # an MNIST-1D sample
CALLS = 200  # forwards per round
ROUNDS = 5


def fast_path_options(device: torch.device, compile: bool = False) -> dict[str, dict[str, Any]]:
    """Column label → ``TeacherEnsemble`` options, for ``device``.

    Examples:
        >>> list(fast_path_options(torch.device("cpu")))
        ['loop', 'inference mode', 'stacked', 'bf16 autocast']
    """
    options: dict[str, dict[str, Any]] = {
        "loop": {},
        "inference mode": {"inference_mode": True},
        "stacked": {"stacked": True},
        "bf16 autocast": {"autocast_dtype": "bf16", "inference_mode": True},
    }
    if device.type == "cuda":
        options["fp16 autocast"] = {"autocast_dtype": "fp16", "inference_mode": True}
    if compile:
        options["compiled"] = {"compile_teachers": True, "inference_mode": True}
    return options


def time_fast_paths(
    device: torch.device,
    batch_size: int = 100,
    calls: int = CALLS,
    repeats: int = ROUNDS,
    sizes: Sequence[int] = (3, 8),
    kinds: Sequence[str] = ("mlp", "cnn"),
    compile: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{"3 × mlp": {"loop": ms, ...}, ...}``: median milliseconds per ensemble forward."""
    table: dict[str, dict[str, float]] = {}
    inputs = torch.randn(batch_size, IN_FEATURES, generator=torch.Generator().manual_seed(seed))
    inputs = inputs.to(device)
    for kind in kinds:
        for size in sizes:
            torch.manual_seed(seed)
            teachers = {f"{kind}{k}": KINDS[kind]() for k in range(size)}
            ensembles = {
                label: TeacherEnsemble(teachers, **options).to(device)
                for label, options in fast_path_options(device, compile).items()
            }
            for ensemble in ensembles.values():  # warm-up: compiles, allocates, stacks weights
                ensemble(inputs)
            rounds: dict[str, list[float]] = {label: [] for label in ensembles}
            for _ in range(repeats):
                for label, ensemble in ensembles.items():
                    rounds[label].append(_round_ms(ensemble, inputs, calls, device))
            table[f"{size} × {kind}"] = {
                label: statistics.median(times) for label, times in rounds.items()
            }
    return table


def _round_ms(
    ensemble: TeacherEnsemble, inputs: torch.Tensor, calls: int, device: torch.device
) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        ensemble(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e3


def format_fast_paths(table: dict[str, dict[str, float]]) -> str:
    """The table as Markdown, one row per ensemble.

    Examples:
        >>> print(format_fast_paths({"3 × mlp": {"loop": 4.25, "stacked": 5.5}}))
        | teachers | loop | stacked |
        |---|---|---|
        | 3 × mlp | 4.2 | 5.5 |
    """
    columns = list(next(iter(table.values())))
    lines = [
        "| teachers | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for row, times in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{times[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)
