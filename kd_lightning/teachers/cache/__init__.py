"""The teacher-output (logit) cache: teachers run once over the data, their logits are stored
memory-mapped and read back by sample index."""

from kd_lightning.teachers.cache.build import build_output_cache
from kd_lightning.teachers.cache.store import CachedTeachers

__all__ = ["CachedTeachers", "build_output_cache"]
