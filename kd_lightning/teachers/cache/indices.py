"""Where a batch carries its samples' indices, the keys of a teacher-output cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

#: The key of the sample indices in dict batches.
INDEX_KEY = "index"


def sample_indices(batch: Any) -> Tensor:
    """The sample indices of a batch: its last tuple item, or ``batch["index"]``.

    :class:`~kd_lightning.data.indexed.IndexedCollate` puts them there.

    Examples:
        >>> import torch
        >>> sample_indices((torch.zeros(2, 3), torch.zeros(2), torch.tensor([7, 4])))
        tensor([7, 4])
    """
    if isinstance(batch, Mapping) and INDEX_KEY in batch:
        return batch[INDEX_KEY]
    if isinstance(batch, Sequence) and len(batch) >= 3 and isinstance(batch[-1], Tensor):
        return batch[-1]
    raise ValueError(
        "the batch carries no sample indices: teachers read from a cache need batches from "
        "kd_lightning.data.indexed.IndexedDataModule (or IndexedDataset with IndexedCollate)"
    )
