"""Frozen teachers: the ensemble, input transforms and safe loading of their weights."""

from kd_lightning.teachers.ensemble import (
    MISSING_CLASS_LOGIT_GAP,
    InputTransform,
    OutputAdapter,
    TeacherEnsemble,
    attribute_adapter,
)
from kd_lightning.teachers.loading import load_teacher, read_state_dict
from kd_lightning.teachers.transforms import ReverseSequence, Standardize

__all__ = [
    "MISSING_CLASS_LOGIT_GAP",
    "InputTransform",
    "OutputAdapter",
    "ReverseSequence",
    "Standardize",
    "TeacherEnsemble",
    "attribute_adapter",
    "load_teacher",
    "read_state_dict",
]
