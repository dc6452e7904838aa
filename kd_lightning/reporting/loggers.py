"""A Weights & Biases logger that never prompts: online when logged in, offline otherwise."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
"""The modes ``wandb.init`` accepts; ``dryrun`` is an alias of offline, ``run`` of online."""
NEEDS_CREDENTIALS = ("online", "shared", "run")


def has_wandb_credentials() -> bool:
    """Whether ``wandb.init`` would find credentials without prompting, checked offline.

    Looks where wandb does, with wandb's own reader: the session (``wandb.login``),
    ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, the netrc file (``NETRC``, else
    ``~/.netrc``) entry for the W&B host (``WANDB_BASE_URL``), and the settings files. The key is
    not checked against the server.

    Raises:
        wandb.errors.AuthenticationError: if a key is found but is malformed.

    Examples:
        >>> isinstance(has_wandb_credentials(), bool)
        True
    """
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    host = os.environ.get("WANDB_BASE_URL") or wandb_setup.singleton().settings.base_url
    auth = wbauth.authenticate_session(
        host=host, source="kd_lightning", prompt=False, update_session=False
    )
    return auth is not None


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to run in: ``mode``, else ``$WANDB_MODE``, else online if logged in, else offline.

    Args:
        mode: an explicit mode, one of :data:`WANDB_MODES`.

    Raises:
        ValueError: for an unknown mode, or an online mode without credentials (which would make
            wandb prompt for an API key).

    Examples:
        >>> resolve_wandb_mode("disabled")
        'disabled'
    """
    source = "mode"
    if mode is None and os.environ.get("WANDB_MODE"):
        mode, source = os.environ["WANDB_MODE"], "WANDB_MODE"
    if mode is None:
        return "online" if has_wandb_credentials() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown W&B {source}={mode!r}; choose from {list(WANDB_MODES)}")
    if mode in NEEDS_CREDENTIALS and not has_wandb_credentials():
        raise ValueError(
            f"W&B {source}={mode!r} needs credentials but none were found: run `wandb login`, "
            "set WANDB_API_KEY, or use mode='offline'"
        )
    return mode


def wandb_logger(
    project: str | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A :class:`~lightning.pytorch.loggers.WandbLogger` whose mode is chosen so that it never prompts.

    The mode comes from :func:`resolve_wandb_mode`; without credentials the run is logged
    offline, with a one-line message on how to upload it later with ``wandb sync``. Arguments left
    ``None`` fall back to the standard variables (``WANDB_PROJECT``, ``WANDB_DIR``,
    ``WANDB_NAME``, ``WANDB_RUN_GROUP``, ``WANDB_TAGS``). The run starts at the logger's first use.

    Args:
        project: the W&B project; defaults to ``$WANDB_PROJECT``, else ``"kd_lightning"``.
        save_dir: where the ``wandb/`` run folders go; defaults to ``$WANDB_DIR``, else ``"."``.
        name: the run's display name.
        group: the run group, e.g. one per sweep.
        tags: the run's tags.
        mode: one of :data:`WANDB_MODES`; see :func:`resolve_wandb_mode`.
        **kwargs: passed on to ``WandbLogger`` and ``wandb.init`` (e.g. ``config``, ``log_model``).

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     logger = wandb_logger(save_dir=tmp, mode="disabled")
        ...     logger.save_dir == tmp
        True
    """
    resolved = resolve_wandb_mode(mode)
    save_dir = os.fspath(save_dir if save_dir is not None else os.environ.get("WANDB_DIR", "."))
    if resolved in ("offline", "dryrun") and not has_wandb_credentials():
        runs = Path(save_dir, "wandb", "offline-run-*")
        log.warning(
            "W&B: no credentials found, logging offline; upload later with `wandb sync %s`", runs
        )
    # mode goes to wandb.init: WandbLogger(offline=True) would set os.environ["WANDB_MODE"]
    return WandbLogger(
        project=project or os.environ.get("WANDB_PROJECT", "kd_lightning"),
        save_dir=save_dir,
        name=name,
        group=group,
        tags=list(tags) if tags is not None else None,
        mode=resolved,
        **kwargs,
    )
