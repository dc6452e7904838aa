"""Which code produced a result: the checkout's commit, recorded by benchmarks and results."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """The checkout's short commit (``-dirty`` when it has changes), or why there is none.

    Examples:
        >>> commit = git_commit()
        >>> isinstance(commit, str) and len(commit) > 0
        True
    """
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
