"""Draw pairwise teacher agreement as an annotated heatmap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
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

    Example:
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
