"""Frozen teachers: the ensemble and safe loading of their weights."""

from kd_lightning.teachers.ensemble import OutputAdapter, TeacherEnsemble, attribute_adapter
from kd_lightning.teachers.loading import load_teacher, read_state_dict

__all__ = [
    "OutputAdapter",
    "TeacherEnsemble",
    "attribute_adapter",
    "load_teacher",
    "read_state_dict",
]
