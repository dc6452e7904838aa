"""Compose the real Hydra config the way `kd-train` does, pointed at temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from kd_lightning.cli.config import CONFIG_DIR

FAST = ["experiment=smoke", "data=synthetic", "logger=none", "trainer.enable_progress_bar=false"]


def compose_config(
    tmp_path: Path, overrides: list[str], cache_dir: Path | None = None
) -> DictConfig:
    """The composed config with Hydra's runtime set, output and cache under ``tmp_path`` (the
    teachers and caches in ``cache_dir`` instead, when given: another run's)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    output_dir = tmp_path / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir or tmp_path / "cache")
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = "0"
    HydraConfig().set_config(cfg)
    return cfg


def run_command(
    args: list[str],
    cwd: Path,
    env_overrides: dict[str, str] | None = None,
    timeout: int = 600,
    preexec_fn: Callable[[], None] | None = None,
):
    """Run a kd_lightning module as a real subprocess, as a user's shell would (``preexec_fn``
    runs in the child first, e.g. to set a resource limit)."""
    env = {
        **os.environ,
        "KD_LIGHTNING_CACHE": str(cwd / "cache"),
        "KD_LIGHTNING_LOGS": str(cwd / "logs"),
    }
    env.update(env_overrides or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
