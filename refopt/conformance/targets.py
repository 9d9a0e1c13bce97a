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

import math
from typing import Callable, NamedTuple

import numpy as np

from .. import registry
from .encoding import np_dtype

#: The state buffers of each optimizer, by the reference's names.
STATE_NAMES = {key: facts.buffers for key, facts in registry.OPTIMIZERS.items()}


class ConfigError(Exception):
    """A target or option that cannot be set up: reported in one line, exit status 2."""


class PortFailure(Exception):
    """The target failed on one vector (raised, wrong shape/dtype, crashed): that vector fails.
    ``outputs``: the steps it completed before, when the runner has them."""

    outputs: list = []


class SkipVector(Exception):
    """Raised by a target's run() when a vector turns out not to be runnable on it."""


class Output(NamedTuple):
    param: np.ndarray
    state: dict
    #: the step count the target reports after this step (None: it exposes none)
    step: int | None = None
    #: remarks that do not fail the vector (a torch port writing into p.grad)
    notes: tuple = ()
    #: conformance faults the numbers cannot show (an input modified, a missing state entry)
    faults: tuple = ()


def checked_output(vector, step: int, result, *, where: str) -> Output:
    """A port's ``StepResult`` for one step as an ``Output`` in the vector's dtype: arrays of a
    wider floating dtype are accepted when every value is exact in it (spec/tolerance.md); a
    missing step count or state buffer is a fault. PortFailure for arrays that cannot be judged."""
    want = np_dtype(vector.dtype)
    names = STATE_NAMES[vector.optimizer]
    param = _expect(vector, step, "param", result.param, want, where)
    state = {k: _expect(vector, step, k, result.state[k], want, where) for k in names if k in result.state}
    faults = list(result.faults)
    missing = [k for k in names if k not in state]
    if missing:
        faults.append(f"step {step + 1}: the port's state has no {', '.join(map(repr, missing))} (the state of "
                      f"{vector.optimizer.upper()} is {', '.join(('step',) + names)}: spec "
                      f"{'S0' if vector.optimizer == 'saveus' else 'D0'})")
    if result.step is None:
        faults.append(f"step {step + 1}: the port reports no step count (its state has no 'step')")
    return Output(param, state, result.step, tuple(result.notes), tuple(faults))


def step_count(value, step: int, where: str) -> int:
    """A reported step count (an int, or a 0-d integer or integral float array) as an int."""
    try:
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        number = arr.item() if arr.shape == () else None
    except Exception:  # noqa: BLE001 - anything a port returns must be readable
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or number != int(number):
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
    if arr.dtype == want:
        return arr
    name = dtype_label(arr.dtype)
    if (arr.dtype.kind == "f" or arr.dtype == np_dtype("bfloat16")) and arr.dtype.itemsize > want.itemsize:
        narrowed = arr.astype(want)
        wide = arr.astype(np.float64)
        with np.errstate(invalid="ignore"):
            exact = (narrowed.astype(np.float64) == wide) | (np.isnan(wide) & np.isnan(narrowed.astype(np.float64)))
        if bool(np.all(exact)):
            return narrowed
        raise PortFailure(f"step {step + 1}: {where} returned {what} in {name} with values that are not exact "
                          f"in {vector.dtype} (a wider dtype is accepted only when every value is; "
                          f"spec/tolerance.md)")
    raise PortFailure(f"step {step + 1}: {where} returned {what} of dtype {name}, expected {vector.dtype}")


def dtype_label(dtype) -> str:
    return "bfloat16" if dtype == np_dtype("bfloat16") else np.dtype(dtype).name


def clean_text(text, limit: int = 2000) -> str:
    """A port's text as one printable line: control characters, surrogates and other unprintable
    characters become '?', and it is cut at ``limit`` characters (a port's messages end up on the
    terminal, in JSON and in XML)."""
    text = "".join(c if c.isprintable() else ("?" if c not in "\n\t" else " ") for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def call_port(where: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except PortFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - a port's own error fails only that vector
        raise PortFailure(f"{where} raised {type(exc).__name__}: {exc}") from None
