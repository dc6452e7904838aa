"""``kd-cache``: run the configured teachers once over the data and store their logits.

Takes the same overrides as ``kd-train``, e.g. ``kd-cache teachers=[cnn,gru] cache_top_k=3``; a
later ``kd-train cache=true`` with the same teachers and data reads the logits instead of running
the teachers. Prints where the cache is and how big it is.
"""

from __future__ import annotations

from omegaconf import DictConfig

from kd_lightning.cli.logit_cache import (
    OutputCache,
    cache_datamodule,
    check_cacheable,
    describe,
    open_output_cache,
)
from kd_lightning.cli.teachers import command, data_and_teachers


def cache_teachers(cfg: DictConfig) -> OutputCache:
    """Build (or find) the teacher-output cache of ``cfg``; print and return it."""
    check_cacheable(cfg)
    datamodule, teachers = data_and_teachers(cfg)
    cache = open_output_cache(cfg, teachers, cache_datamodule(cfg, datamodule))
    print(describe(cache))
    return cache


main = command(cache_teachers)


if __name__ == "__main__":
    main()
