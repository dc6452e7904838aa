"""``kd-cache``: run the configured teachers once over the data and store their logits.

Takes the same overrides as ``kd-train``, e.g. ``kd-cache teachers=[cnn,gru] cache_top_k=3``; a
later ``kd-train cache=true`` with the same teachers and data reads the logits instead of running
the teachers. Prints where the cache is and how big it is.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig

from kd_lightning.cli.config import CONFIG_DIR
from kd_lightning.cli.logit_cache import (
    cache_datamodule,
    check_cacheable,
    describe,
    open_output_cache,
)
from kd_lightning.cli.teacher_checkpoints import build_teachers
from kd_lightning.teachers.cache.store import CachedTeachers


def cache_teachers(cfg: DictConfig) -> CachedTeachers:
    """Build (or find) the teacher-output cache of ``cfg``; print and return it."""
    check_cacheable(cfg)
    datamodule: LightningDataModule = instantiate(cfg.data)
    teachers = build_teachers(cfg, datamodule)
    cache = open_output_cache(cfg, teachers, cache_datamodule(cfg, datamodule))
    print(describe(cache))
    return cache


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    """The ``kd-cache`` command."""
    cache_teachers(cfg)


if __name__ == "__main__":
    main()
