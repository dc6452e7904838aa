"""Exceptions raised by kd_lightning, each naming the input that caused it."""

from __future__ import annotations


class TeacherLoadError(RuntimeError):
    """A teacher's weights file is missing, corrupt, unsafe or does not fit its model."""


class TeacherOutputError(ValueError):
    """A teacher produced outputs that cannot be distilled (wrong shape, NaN or inf)."""


class BatchFormatError(ValueError):
    """A batch could not be unpacked into inputs and targets."""
