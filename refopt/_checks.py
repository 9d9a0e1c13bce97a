"""Hyperparameter checks (spec/errors.md): pure Python, no array library involved.

The registry attaches one validator to each hyperparameter: ``validator(name, value)`` returns the
value to keep (a float for reals, a tuple for betas) or raises the error the spec lists.
"""
from __future__ import annotations

import math
import numbers


def real(name: str, value, *, low=None, high=None, low_open=False, high_open=True, msg=None):
    """A finite real number within [low, high); bools and non-numbers are TypeErrors."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        rng = _range_text(low, high, low_open, high_open)
        raise ValueError(f"{msg or f'Invalid {name}'}: {value!r} ({name} must be finite{rng})")
    return value


def _range_text(low, high, low_open, high_open):
    if low is None and high is None:
        return ""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    return f" and in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def betas(value, name="betas"):
    if isinstance(value, (str, bytes, set, frozenset, dict)) or not hasattr(value, "__len__") \
            or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be a pair (beta1, beta2))")
    return tuple(
        real(f"{name}[{i}]", b, low=0.0, high=1.0, msg=f"Invalid beta parameter at index {i}")
        for i, b in enumerate(value)
    )


class Real:
    """A finite real number, optionally within ``[low, high)``."""

    def __init__(self, low=None, high=None, message=None):
        self.low, self.high, self.message = low, high, message

    def __call__(self, name, value):
        return real(name, value, low=self.low, high=self.high, msg=self.message)


class Flag:
    def __call__(self, name, value):
        return flag(name, value)


class Betas:
    def __call__(self, name, value):
        return betas(value, name)


class Optional:
    """``None``, or a value the wrapped validator accepts."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, name, value):
        return None if value is None else self.inner(name, value)


class CallableOrNone:
    def __call__(self, name, value):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {value!r}")
        return value
