"""Step-input validation (spec/errors.md). Metadata only: shapes, dtypes, namespaces, devices.
Nothing here reads an array value except the opt-in ``check_finite``."""
from __future__ import annotations

import array_api_compat as aac

from ._arrays import dtype_name, is_real_floating, namespace
from ._checks import betas, flag, real  # noqa: F401 - the validators, for callers of this module
from .registry import DTYPES


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
    if dtype_name(param.dtype) not in DTYPES or not is_real_floating(xp, param.dtype):
        raise TypeError(
            f"{optimizer}.step: param dtype must be a real floating dtype "
            f"({', '.join(DTYPES)}), got {dtype_name(param.dtype)}"
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


def finite_inputs(optimizer: str, xp, param, grad, state):
    """Opt-in check_finite=True: raises before anything changes (forces a host sync)."""
    for what, x in (("grad", grad), ("param", param)):
        if not bool(xp.all(xp.isfinite(x))):
            n = int(xp.sum(xp.astype(~xp.isfinite(x), xp.int64)))
            raise ValueError(f"{optimizer}.step: {what} has {n} non-finite element(s) (check_finite=True)")
    step_count_in_range(optimizer, xp, state.step)


def host_step_count(optimizer: str, state):
    """The step count's range, checked where reading it costs no device sync (a NumPy array)."""
    if type(state.step).__module__ == "numpy":
        step_count_in_range(optimizer, namespace(state.step), state.step)


def step_count_in_range(optimizer: str, xp, step):
    """A count below 0 has no meaning; one at its dtype's largest value would wrap on +1."""
    value, top = int(step), int(xp.iinfo(step.dtype).max)
    if value < 0:
        raise ValueError(f"{optimizer}.step: state.step is {value}; a step count cannot be negative")
    if value >= top:
        raise ValueError(f"{optimizer}.step: state.step is {value}, the largest value of "
                         f"{dtype_name(step.dtype)}; one more step would overflow (keep the count in int64)")
