"""Argument checks every part of the package shares, with the project's error message: the function
and argument, what was expected and what was given."""

from __future__ import annotations

__all__ = ["check_int_at_least"]


def check_int_at_least(where: str, argument: str, value, minimum: int, meaning: str | None = None) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else ValueError
    ``"{where}: argument '{argument}' expected an int >= {minimum} ({meaning}), got {value!r}"``.

    >>> check_int_at_least("MMoE", "num_experts", 4, 1)
    4
    >>> check_int_at_least("MMoE", "num_experts", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: MMoE: argument 'num_experts' expected an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"{where}: argument '{argument}' expected an int >= {minimum}{why}, got {value!r}")
    return value
