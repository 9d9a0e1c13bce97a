"""What every target of `refopt check` shares: the result of a run, the ways a run fails, and the
check of what a target returned.

A target's ``run(vector)`` returns one ``Output(param, state)`` per step of the vector: ``param`` a
NumPy array in the vector's dtype, ``state`` a dict of NumPy arrays under the reference's names
(only the names the target exposes; empty when it exposes none). ``skip_reason(vector)`` says why
a target cannot run a vector at all (a dtype its library lacks, a state it cannot be given).
A port that raises, or returns the wrong shape or dtype, raises ``PortFailure`` for that vector
only; a target that cannot be built at all raises ``ConfigError`` (exit status 2). refopt's own
backends are in ``backends.py``, the kinds of port in ``ports.py``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .. import registry
from .encoding import np_dtype

#: The state buffers of each optimizer, by the reference's names.
STATE_NAMES = {key: facts.buffers for key, facts in registry.OPTIMIZERS.items()}


class ConfigError(Exception):
    """A target or option that cannot be set up: reported in one line, exit status 2."""


class PortFailure(Exception):
    """The target failed on one vector (raised, wrong shape/dtype): that vector fails."""


class SkipVector(Exception):
    """Raised by a target's run() when a vector turns out not to be runnable on it."""


class Output(NamedTuple):
    param: np.ndarray
    state: dict
    #: the step count the target reports after this step (None: it exposes none)
    step: int | None = None


def checked_output(vector, step: int, param, state: dict, *, where: str, count=None) -> Output:
    """The port's param/state (and step ``count``) for one step as NumPy in the vector's dtype,
    or PortFailure."""
    want = np_dtype(vector.dtype)
    param = _expect(vector, step, "param", param, want, where)
    named = {k: _expect(vector, step, k, v, want, where) for k, v in state.items()
             if k in STATE_NAMES[vector.optimizer]}
    return Output(param, named, None if count is None else step_count(count, step, where))


def step_count(value, step: int, where: str) -> int:
    """A reported step count (an int, or a 0-d integer or integral float array) as an int."""
    try:
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        number = arr.item() if arr.shape == () else None
    except Exception:  # noqa: BLE001 - anything a port returns must be readable
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
        raise PortFailure(f"step {step + 1}: {where} reported a step count that is not a whole number "
                          f"({value!r})")
    return int(number)


def _expect(vector, step, what, value, want, where):
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - anything a port returns must be readable
        raise PortFailure(f"step {step + 1}: {where} returned a {what} that is not an array ({exc})") from None
    if arr.shape != tuple(vector.shape):
        raise PortFailure(f"step {step + 1}: {where} returned {what} of shape {arr.shape}, "
                          f"expected {tuple(vector.shape)}")
    if arr.dtype != want:
        raise PortFailure(f"step {step + 1}: {where} returned {what} of dtype {arr.dtype}, expected {want}")
    return arr


def call_port(where: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except PortFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - a port's own error fails only that vector
        raise PortFailure(f"{where} raised {type(exc).__name__}: {exc}") from None
