"""The teacher-output (logit) caches: teachers run once over the data and their outputs are
stored memory-mapped, read back by sample index (classification) or by block and position (a
sparse top-k store of K language-model teachers)."""

from kd_lightning.teachers.cache.build import build_output_cache
from kd_lightning.teachers.cache.sequence_build import build_sequence_cache
from kd_lightning.teachers.cache.sequence_store import MismatchedCacheError, SequenceCachedTeachers
from kd_lightning.teachers.cache.store import CachedTeachers

__all__ = [
    "CachedTeachers",
    "MismatchedCacheError",
    "SequenceCachedTeachers",
    "build_output_cache",
    "build_sequence_cache",
]
