"""Frozen teachers: the ensemble, the sources a distillation step reads them from (live, drawn per
step, sharded, cached), input transforms and safe loading of their weights."""

from kd_lightning.teachers.cache import (
    CachedTeachers,
    SequenceCachedTeachers,
    build_output_cache,
    build_sequence_cache,
)
from kd_lightning.teachers.class_maps import MISSING_CLASS_LOGIT_GAP
from kd_lightning.teachers.drawn import DrawnTeachers
from kd_lightning.teachers.ensemble import (
    InputTransform,
    OutputAdapter,
    TeacherEnsemble,
    attribute_adapter,
)
from kd_lightning.teachers.loading import load_teacher, read_state_dict
from kd_lightning.teachers.source import TeacherOutputs, TeacherSource
from kd_lightning.teachers.transforms import ReverseSequence, Standardize

__all__ = [
    "MISSING_CLASS_LOGIT_GAP",
    "CachedTeachers",
    "DrawnTeachers",
    "InputTransform",
    "OutputAdapter",
    "ReverseSequence",
    "SequenceCachedTeachers",
    "Standardize",
    "TeacherEnsemble",
    "TeacherOutputs",
    "TeacherSource",
    "attribute_adapter",
    "build_output_cache",
    "build_sequence_cache",
    "load_teacher",
    "read_state_dict",
]
