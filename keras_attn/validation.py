"""Argument checks shared by keras_attn's constructors and its plugins.

Each check raises ``ValueError`` with Keras's wording, ``... Received: arg=value``,
at the moment the argument is given, and returns the value normalized (a Python
``int`` for an integer given as a numpy integer).
"""

import math
import numbers

import numpy as np

__all__ = ["boolean", "integer", "number", "one_of", "positive_int", "positive_number"]


def integer(value, arg, minimum=None, allow_none=False):
    """An integer (not a bool) of at least `minimum`.

    Args:
        value: What the caller gave.
        arg: The argument's name, for the message.
        minimum: Smallest allowed value, or None for any.
        allow_none: Whether None is accepted (and returned as is).

    Raises:
        ValueError: `value` is not such an integer.
    """
    if value is None and allow_none:
        return None
    if (
        not isinstance(value, (int, np.integer))
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
    ):
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        if minimum == 1:
            expected = "a positive integer"
        raise ValueError(f"`{arg}` must be {expected}. Received: {arg}={value!r}")
    return int(value)


def positive_int(value, arg, allow_none=False):
    """An integer >= 1 (None too if `allow_none`); see `integer`."""
    return integer(value, arg, minimum=1, allow_none=allow_none)


def positive_number(value, arg, allow_none=False):
    """A finite number > 0 (None too if `allow_none`); see `number`."""
    return number(value, arg, low=0, low_open=True, allow_none=allow_none)


def boolean(value, arg):
    """A Python bool (not 0/1, not a string).

    Raises:
        ValueError: `value` is not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{arg}` must be a bool. Received: {arg}={value!r}")
    return bool(value)


def number(value, arg, low=None, high=None, low_open=False, high_open=False, allow_none=False):
    """A finite real number (not a bool) in the interval given by `low` and `high`.

    Args:
        low, high: Bounds, or None for unbounded.
        low_open, high_open: Whether the bound itself is excluded.
        allow_none: Whether None is accepted (and returned as is).

    Raises:
        ValueError: `value` is not a number in that interval (NaN and infinities
            never are).
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok and not math.isfinite(value):
        ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = (
            f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        )
        raise ValueError(f"`{arg}` must be a number in {interval}. Received: {arg}={value!r}")
    return float(value)


def one_of(value, arg, choices):
    """One of `choices` (compared with ``==`` and by type, so ``1`` is not ``True``).

    Raises:
        ValueError: `value` is none of them.
    """
    if not any(type(value) is type(c) and value == c for c in choices):
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{arg}` must be one of {expected}. Received: {arg}={value!r}")
    return value
