"""LightningModules for each training regime."""

from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distillation import DistillationModule
from kd_lightning.modules.online import (
    AFDModule,
    CodistillationModule,
    DMLModule,
    FFLModule,
    OKDDipModule,
    OnlinePeersModule,
)
from kd_lightning.modules.prokd import ProKDModule
from kd_lightning.modules.prokt import ProKTModule
from kd_lightning.modules.teacher_free import VirtualTeacherModule

__all__ = [
    "AFDModule",
    "ClassifierModule",
    "CodistillationModule",
    "DMLModule",
    "DistillationModule",
    "FFLModule",
    "OKDDipModule",
    "OnlinePeersModule",
    "ProKDModule",
    "ProKTModule",
    "VirtualTeacherModule",
]
