"""Exceptions raised by kd_lightning, each naming the input that caused it."""

from __future__ import annotations


class TeacherLoadError(RuntimeError):
    """A teacher's weights file is missing, corrupt, unsafe or does not fit its model."""


class TeacherOutputError(ValueError):
    """A teacher produced outputs that cannot be distilled (wrong shape, NaN or inf)."""


class BatchFormatError(ValueError):
    """A batch could not be unpacked into inputs and targets."""


class NonFiniteLossError(FloatingPointError):
    """A training step's loss was NaN or infinite; the message names the step, the terms and the
    network whose outputs were not finite."""


class ConfigError(ValueError):
    """A composed config that cannot run; lists every problem found, each with its config key.

    Examples:
        >>> print(ConfigError(["trainer.devices=0: must be a positive count"]))
        the config has 1 problem, found before any work:
          - trainer.devices=0: must be a positive count
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"the config has {count}, found before any work:\n{lines}")
