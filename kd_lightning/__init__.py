"""kd_lightning: multi-teacher knowledge distillation on PyTorch Lightning.

Three layers, each importing only those below it:

* the torch core: ``functional``, ``fusion``, ``losses``, ``teachers``, ``models``; it imports
  neither Lightning nor Hydra, so it serves any training loop;
* the Lightning layer: ``modules``, ``callbacks``, ``metrics``, ``data``;
* the shell: ``cli`` (the ``kd-*`` commands and their Hydra glue) over ``conf/``.

``reporting`` (plots, loggers) and ``bench`` sit beside them. The names below are loaded on first
use (PEP 562), so ``import kd_lightning.fusion`` pulls in nothing above the core.

Examples:
    >>> import kd_lightning
    >>> kd_lightning.DistillationLoss().alpha
    0.9
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BatchAdapter": "kd_lightning.batch",
    "DistillationLoss": "kd_lightning.losses",
    "DistillationOutput": "kd_lightning.losses",
    "TeacherEnsemble": "kd_lightning.teachers",
    "load_teacher": "kd_lightning.teachers",
    "DistillationModule": "kd_lightning.modules",
    "TeacherAgreement": "kd_lightning.metrics",
    "TeacherAgreementCallback": "kd_lightning.callbacks",
}

__all__ = [
    "BatchAdapter",
    "DistillationLoss",
    "DistillationModule",
    "DistillationOutput",
    "TeacherAgreement",
    "TeacherAgreementCallback",
    "TeacherEnsemble",
    "__version__",
    "load_teacher",
]

if TYPE_CHECKING:
    from kd_lightning.batch import BatchAdapter
    from kd_lightning.callbacks import TeacherAgreementCallback
    from kd_lightning.losses import DistillationLoss, DistillationOutput
    from kd_lightning.metrics import TeacherAgreement
    from kd_lightning.modules import DistillationModule
    from kd_lightning.teachers import TeacherEnsemble, load_teacher


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kd_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
