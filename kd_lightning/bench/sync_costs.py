"""``kd-bench --sync-costs``: the checks that read a value back from the device at every step,
against a training step.

Two checks read one value back at every distillation step, on a GPU one synchronisation each (the
host waits for every kernel queued so far):

* ``TeacherEnsemble(check_finite="always")``: are the teachers' logits finite
  (:func:`~kd_lightning.teachers.runtime.check_finite_logits`, one reduction over ``(K, B, C)``);
* ``DistillationLoss``'s label check (:func:`~kd_lightning.losses.distillation.check_shapes`: one
  ``aminmax`` of the labels, which also tells whether any position is padding).

The step is the ``live`` workload's as a plain loop (the MNIST-1D MLP student, the live teachers,
``DistillationLoss("mean_probs")``, Adam) on one fixed random batch. Every configuration runs in
turn, ``rounds`` rounds of ``steps`` steps (round-robin, so machine noise spreads over all of them,
in reverse order every other round, so that none always runs after the same one); the median round
gives the figure:

* ``step``: ms per training step with both checks at every step (``check_finite="always"``);
* ``step, check_finite='first_step'``: the same step as it runs by default, the ensemble's check
  done (at the warm-up);
* ``teacher logits finite`` and ``label range``: ms per step spent in the check, timed around it
  inside the step, where the library calls it (the ensemble's check right after its teachers ran,
  the label check just before the loss; the loss still checks its labels itself).

A check's share of a step is its time inside the step over the step's time. Timed inside the step
it pays for the caches the step's other work left cold: on a 2-core CPU about five times what the
same call costs repeated alone. On a GPU the time inside a check includes waiting for the kernels
queued before it, an upper bound of what its synchronisation costs; the difference of the two
``step`` rows shows what the step loses (on a CPU it is below the steps' own noise).

Examples:
    >>> table = time_sync_costs(torch.device("cpu"), 4, ("mlp",), steps=1, rounds=1)
    >>> list(table["ms"])
    ['step', "step, check_finite='first_step'", 'teacher logits finite', 'label range']
    >>> list(table["share_of_step"])
    ['teacher logits finite', 'label range']
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from kd_lightning.bench.fast_paths import IN_FEATURES
from kd_lightning.bench.workloads import ALPHA, LR, TEMPERATURE, make_teachers
from kd_lightning.losses.distillation import DistillationLoss, check_shapes
from kd_lightning.models import MLP
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.runtime import CheckFinite, check_finite_logits

NUM_CLASSES = 10  # MNIST-1D
STEPS = 50  # training steps per round
ROUNDS = 7
#: A check runs at every step by default only where it costs less than this share of a step.
THRESHOLD = 0.01
CHECKS = ("teacher logits finite", "label range")


def time_sync_costs(
    device: torch.device,
    batch_size: int = 100,
    teachers: Sequence[str] = ("cnn", "gru", "mlp"),
    steps: int = STEPS,
    rounds: int = ROUNDS,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{"ms": {row: median ms per step}, "share_of_step": {check: its ms / the step's}}``."""
    torch.manual_seed(seed)
    student = MLP().to(device)
    ensemble = TeacherEnsemble(make_teachers(teachers)).to(device)
    loss = DistillationLoss("mean_probs", alpha=ALPHA, temperature=TEMPERATURE)
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, IN_FEATURES, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device)
    spent = dict.fromkeys(CHECKS, 0.0)  # seconds inside each check, summed over timed steps

    def step(check_finite: CheckFinite, timed: bool = False) -> None:
        ensemble.check_finite = check_finite
        student_logits, teacher_logits = student(inputs), ensemble(inputs)
        if timed:
            start = time.perf_counter()
            check_finite_logits(ensemble.names, teacher_logits)
            middle = time.perf_counter()
            check_shapes(student_logits, teacher_logits, labels, loss.ignore_index)
            spent["teacher logits finite"] += middle - start
            spent["label range"] += time.perf_counter() - middle
        out = loss(student_logits, teacher_logits, labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    runs: dict[str, Callable[[], None]] = {
        "step": partial(step, "always"),
        "step, check_finite='first_step'": partial(step, "first_step"),
        "checks timed": partial(step, "never", timed=True),
    }
    for run in runs.values():  # warm-up: allocations, Adam's state, the first step's check
        run()
    labels_in_order = list(runs)
    times: dict[str, list[float]] = {label: [] for label in (*labels_in_order[:2], *CHECKS)}
    for round_index in range(rounds):
        for label in labels_in_order[:: 1 if round_index % 2 == 0 else -1]:
            if label == "checks timed":
                spent.update(dict.fromkeys(CHECKS, 0.0))
                _ms_per_call(runs[label], steps, device)
                for check in CHECKS:
                    times[check].append(spent[check] / steps * 1e3)
            else:
                times[label].append(_ms_per_call(runs[label], steps, device))
    ms = {label: statistics.median(values) for label, values in times.items()}
    return {"ms": ms, "share_of_step": {check: ms[check] / ms["step"] for check in CHECKS}}


def _ms_per_call(function: Callable[[], object], calls: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e3


def format_sync_costs(table: dict[str, dict[str, float]]) -> str:
    """The table as Markdown: ms per step and share of a step; whether each check is under the
    :data:`THRESHOLD` a check run at every step may cost.

    Examples:
        >>> print(format_sync_costs({
        ...     "ms": {"step": 4.0, "teacher logits finite": 0.01},
        ...     "share_of_step": {"teacher logits finite": 0.0025},
        ... }))
        | | ms | % of a step | under 1 % |
        |---|---|---|---|
        | step | 4.0000 | 100.00 |  |
        | teacher logits finite | 0.0100 | 0.25 | yes |
    """
    step = table["ms"]["step"]
    lines = [
        f"| | ms | % of a step | under {100 * THRESHOLD:g} % |",
        "|---|---|---|---|",
    ]
    for label, ms in table["ms"].items():
        share = table["share_of_step"].get(label)
        verdict = "" if share is None else ("yes" if share < THRESHOLD else "no")
        lines.append(f"| {label} | {ms:.4f} | {100 * ms / step:.2f} | {verdict} |")
    return "\n".join(lines)
