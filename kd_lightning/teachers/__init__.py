"""Frozen teachers: the ensemble, input transforms, safe loading of their weights, and the
teacher-output cache."""

from kd_lightning.teachers.cache import CachedTeachers, build_output_cache
from kd_lightning.teachers.class_maps import MISSING_CLASS_LOGIT_GAP
from kd_lightning.teachers.ensemble import (
    InputTransform,
    OutputAdapter,
    TeacherEnsemble,
    attribute_adapter,
)
from kd_lightning.teachers.loading import load_teacher, read_state_dict
from kd_lightning.teachers.transforms import ReverseSequence, Standardize

__all__ = [
    "MISSING_CLASS_LOGIT_GAP",
    "CachedTeachers",
    "InputTransform",
    "OutputAdapter",
    "ReverseSequence",
    "Standardize",
    "TeacherEnsemble",
    "attribute_adapter",
    "build_output_cache",
    "load_teacher",
    "read_state_dict",
]
