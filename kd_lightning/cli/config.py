"""Where the configs live and the resolvers they use."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def config_dir() -> Path:
    """The ``conf`` folder: inside the installed package, or at the root of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"kd_lightning's configs are missing: no train.yaml under {package}")


def register_resolvers() -> None:
    """``${len:${teachers}}``: the number of entries of a config node."""
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda node: len(node))


register_resolvers()
CONFIG_DIR = str(config_dir())


def show_progress(cfg: Mapping[str, Any]) -> bool:
    """The run's ``trainer.enable_progress_bar`` (true when unset)."""
    return bool(cfg["trainer"].get("enable_progress_bar", True))
