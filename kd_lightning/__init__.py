"""kd_lightning: multi-teacher knowledge distillation on PyTorch Lightning.

Three layers, each importing only those below it: a plain-torch core (``functional``, ``fusion``,
``teachers``, ``DistillationLoss``), the Lightning layer (``modules``, ``metrics``, ``callbacks``,
``data``) and the Hydra shell (``conf/`` and the ``kd-*`` commands).
"""

from kd_lightning.batch import BatchAdapter
from kd_lightning.callbacks import TeacherAgreementCallback
from kd_lightning.loss import DistillationLoss, DistillationOutput
from kd_lightning.metrics import TeacherAgreement
from kd_lightning.modules import DistillationModule
from kd_lightning.teachers import TeacherEnsemble, load_teacher

__version__ = "0.1.0"

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
