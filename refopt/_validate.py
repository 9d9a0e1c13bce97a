"""Hyperparameter and step-input validation (spec/errors.md). Metadata only: shapes, dtypes,
namespaces, devices. Nothing here reads an array value except the opt-in ``check_finite``."""
from __future__ import annotations

import math
import numbers

import array_api_compat as aac

from ._arrays import dtype_name, is_real_floating, namespace


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
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} ({name} must be a pair (beta1, beta2))")
    return tuple(
        real(f"{name}[{i}]", b, low=0.0, high=1.0, msg=f"Invalid beta parameter at index {i}")
        for i, b in enumerate(value)
    )


def step_inputs(optimizer: str, state_type, param, grad, state):
    """TypeError/ValueError naming what is wrong with (param, grad, state); returns xp."""
    for what, x in (("param", param), ("grad", grad)):
        if not aac.is_array_api_obj(x):
            raise TypeError(f"{optimizer}.step: {what} must be an array, got {type(x).__name__}")
    if not isinstance(state, state_type):
        raise TypeError(
            f"{optimizer}.step: state must be a {state_type.__name__} from {optimizer}.init, "
            f"got {type(state).__name__}"
        )
    arrays = [("param", param), ("grad", grad)] + [
        (f"state.{k}", getattr(state, k)) for k in state_type._fields if k != "step"
    ]
    for what, x in arrays[2:] + [("state.step", state.step)]:
        if not aac.is_array_api_obj(x):
            raise TypeError(f"{optimizer}.step: {what} must be an array, got {type(x).__name__}")
    try:
        xp = namespace(*(a for _, a in arrays), state.step)
    except TypeError:
        libs = ", ".join(f"{what} is {type(x).__module__.split('.')[0]}" for what, x in arrays + [("state.step", state.step)])
        raise TypeError(
            f"{optimizer}.step: param, grad and state come from different array libraries ({libs}); "
            "convert them to one library"
        ) from None
    if not is_real_floating(xp, param.dtype):
        raise TypeError(
            f"{optimizer}.step: param dtype must be a real floating dtype "
            f"(float16, bfloat16, float32, float64), got {dtype_name(param.dtype)}"
        )
    dev = aac.device(param)
    for what, x in arrays[1:]:
        if tuple(x.shape) != tuple(param.shape):
            raise ValueError(
                f"{optimizer}.step: {what} has shape {tuple(x.shape)} but param has shape {tuple(param.shape)}"
                + (" (was the state made for another parameter?)" if what.startswith("state") else "")
            )
        if x.dtype != param.dtype:
            raise TypeError(
                f"{optimizer}.step: {what} has dtype {dtype_name(x.dtype)} but param has dtype "
                f"{dtype_name(param.dtype)}; cast it (the update is computed in the parameter's dtype)"
            )
        if aac.device(x) != dev:
            raise ValueError(f"{optimizer}.step: {what} is on device {aac.device(x)} but param is on {dev}")
    if tuple(state.step.shape) != () or not xp.isdtype(state.step.dtype, "integral"):
        raise TypeError(f"{optimizer}.step: state.step must be a 0-d integer array")
    if aac.device(state.step) != dev:
        raise ValueError(f"{optimizer}.step: state.step is on device {aac.device(state.step)} but param is on {dev}")
    return xp


def finite_inputs(optimizer: str, xp, param, grad):
    """Opt-in check_finite=True: raises before anything changes (forces a host sync)."""
    for what, x in (("grad", grad), ("param", param)):
        if not bool(xp.all(xp.isfinite(x))):
            n = int(xp.sum(xp.astype(~xp.isfinite(x), xp.int64)))
            raise ValueError(f"{optimizer}.step: {what} has {n} non-finite element(s) (check_finite=True)")
