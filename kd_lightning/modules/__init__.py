"""LightningModules for each training regime, and the pipelines of the multi-stage methods."""

from kd_lightning.modules.base import MethodModule
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
from kd_lightning.modules.prokd import ProKDModule, prokd_pipeline
from kd_lightning.modules.prokt import ProKTModule, prokt_pipeline
from kd_lightning.modules.stages import StageRunner
from kd_lightning.modules.takd import takd_pipeline
from kd_lightning.modules.teacher_free import VirtualTeacherModule, tfkd_pipeline

__all__ = [
    "AFDModule",
    "ClassifierModule",
    "CodistillationModule",
    "DMLModule",
    "DistillationModule",
    "FFLModule",
    "MethodModule",
    "OKDDipModule",
    "OnlinePeersModule",
    "ProKDModule",
    "ProKTModule",
    "StageRunner",
    "VirtualTeacherModule",
    "prokd_pipeline",
    "prokt_pipeline",
    "takd_pipeline",
    "tfkd_pipeline",
]
