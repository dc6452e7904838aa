"""Checks of constructor arguments, shared by the models and the data modules."""

from __future__ import annotations


def check_positive(**values: int) -> None:
    """Refuse the first value below 1, naming its argument.

    Examples:
        >>> check_positive(hidden=4, num_classes=0)
        Traceback (most recent call last):
        ...
        ValueError: num_classes must be a positive integer, got 0
    """
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def check_non_negative(**values: float) -> None:
    """Refuse the first negative value, naming its argument.

    Examples:
        >>> check_non_negative(scale=0.1, noise=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: noise must be non-negative, got -1.0
    """
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
