"""Figures for the results: agreement heatmaps, accuracy bars, per-epoch and per-step curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from numpy.typing import ArrayLike


def agreement_heatmap(
    matrix: torch.Tensor | ArrayLike,
    names: Sequence[str],
    title: str = "Pairwise teacher agreement",
) -> Figure:
    """A K×K heatmap of agreement fractions, each cell annotated as a percentage.

    The figure is built on the non-interactive Agg canvas, outside pyplot's global state, so
    nothing leaks between calls and it is freed once unreferenced. The colour range is fixed to
    0 to 100 % so heatmaps of different epochs and runs compare at a glance.

    Args:
        matrix: ``(K, K)`` values in [0, 1], e.g. ``TeacherAgreement.compute()["pairwise_agreement"]``.
        names: the K teacher names, in the order of the matrix rows.
        title: the figure title.

    Returns:
        The figure; save it with ``fig.savefig(path)``.

    Raises:
        ValueError: if the matrix is not square, does not match ``names``, or leaves [0, 1].

    Examples:
        >>> fig = agreement_heatmap([[1.0, 0.75], [0.75, 1.0]], ["cnn", "gru"])
        >>> [text.get_text() for text in fig.axes[0].texts]
        ['100.0%', '75.0%', '75.0%', '100.0%']
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu()
    values = np.asarray(matrix, dtype=float)
    k = len(names)
    if values.shape != (k, k):
        raise ValueError(
            f"agreement matrix of shape {values.shape} does not match the {k} teacher names "
            f"{list(names)}: expected shape ({k}, {k})"
        )
    if np.any((values < 0) | (values > 1)):
        raise ValueError(
            f"agreement values must lie in [0, 1], got min {np.nanmin(values):.3g} "
            f"and max {np.nanmax(values):.3g}"
        )

    side = 2.0 + 0.8 * k  # inches: room for the labels, then ~0.8 in per cell
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    colorbar = fig.colorbar(image, ax=ax, format=PercentFormatter(xmax=1.0))
    colorbar.set_label("top-1 agreement")

    ticks = np.arange(k)
    long_names = max((len(name) for name in names), default=0) > 4
    ax.set_xticks(
        ticks,
        labels=list(names),
        rotation=40 if long_names else 0,
        ha="right" if long_names else "center",
        rotation_mode="anchor",
    )
    ax.set_yticks(ticks, labels=list(names))
    ax.set_xlabel("teacher")
    ax.set_ylabel("teacher")
    ax.set_title(title)

    fontsize = 10 if k <= 6 else 8
    for row in range(k):
        for column in range(k):
            value = values[row, column]
            ax.text(
                column,
                row,
                f"{value:.1%}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="black" if value > 0.6 else "white",  # readable on viridis
            )
    return fig


def accuracy_bars(
    labels: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    reference: float | None = None,
    title: str = "Test accuracy",
) -> Figure:
    """Horizontal bars of mean accuracy with ±1 std error bars, one per method, top to bottom.

    Args:
        labels: one label per bar.
        means: mean accuracies in [0, 1].
        stds: their standard deviations over seeds.
        reference: an accuracy drawn as a dashed vertical line (e.g. the scratch baseline).
        title: the figure title.

    Examples:
        >>> fig = accuracy_bars(["scratch", "mean_probs"], [0.62, 0.66], [0.01, 0.02], reference=0.62)
        >>> [tick.get_text() for tick in fig.axes[0].get_yticklabels()]
        ['scratch', 'mean_probs']
    """
    if not len(labels) == len(means) == len(stds):
        raise ValueError(
            f"labels, means and stds differ in length: {len(labels)}, {len(means)}, {len(stds)}"
        )
    fig = Figure(figsize=(7.5, 1.2 + 0.32 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = np.arange(len(labels))
    values = 100 * np.asarray(means, dtype=float)
    errors = 100 * np.nan_to_num(np.asarray(stds, dtype=float))
    ax.barh(rows, values, xerr=errors, color="#4c72b0", ecolor="black", capsize=3)
    for row, (value, error) in enumerate(zip(values, errors, strict=True)):
        ax.text(value + error + 0.3, row, f"{value:.1f}", va="center", fontsize=8)
    if reference is not None:
        ax.axvline(100 * reference, color="#c44e52", linestyle="--", label="scratch baseline")
        fig.legend(loc="outside lower right", fontsize=8)
    ax.set_yticks(rows, labels=list(labels))
    ax.invert_yaxis()
    low = max(0.0, np.nanmin(values - errors) - 5)
    ax.set_xlim(low, min(100.0, np.nanmax(values + errors) + 4))
    ax.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    return fig


def metric_curves(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    ylabel: str,
    title: str,
    percent: bool = True,
    min_span: float = 0.1,
) -> Figure:
    """Small multiples of per-epoch curves: one panel per key of ``panels``, one line per series.

    Args:
        panels: panel title → (series name, e.g. a teacher → values per epoch).
        ylabel: the y axis label.
        title: the figure title.
        percent: show values in [0, 1] as percentages.
        min_span: the least height of a panel's y range, so near-flat curves stay flat.

    Examples:
        >>> fig = metric_curves({"entropy": {"cnn": [0.3, 0.4], "gru": [0.7, 0.6]}}, "weight", "Fusion weights")
        >>> fig.axes[0].get_title(), [line.get_label() for line in fig.axes[0].lines]
        ('entropy', ['cnn', 'gru'])
    """
    if not panels:
        raise ValueError("metric_curves needs at least one panel")
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(3.4 * columns, 2.6 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for label, values in series.items():
            ax.plot(np.arange(1, len(values) + 1), values, label=label)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        low, high = ax.get_ylim()
        if high - low < min_span:  # flat curves: show a sensible range, not noise magnified
            middle = (high + low) / 2
            ax.set_ylim(middle - min_span / 2, middle + min_span / 2)
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)), fontsize=8)
    fig.suptitle(title)
    return fig


def step_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], ylabel: str, title: str
) -> Figure:
    """One line per run of a metric against the training step, e.g. validation loss.

    Args:
        series: run name → (steps, values).
        ylabel: the y axis label.
        title: the figure title.

    Examples:
        >>> fig = step_curves({"scratch": ([50, 100], [4.6, 4.3]), "distilled": ([50, 100], [4.4, 4.0])}, "val CE", "LM")
        >>> [line.get_label() for line in fig.axes[0].lines]
        ['scratch', 'distilled']
    """
    if not series:
        raise ValueError("step_curves needs at least one series")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (steps, values) in series.items():
        ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
