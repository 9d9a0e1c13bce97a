"""spec/common.md as code: the A1 and A2 reductions and the two clauses SAVEUS and DOPE share.

``centralize`` is S1 and D1, ``normalize`` is S2 and D2; the optimizers differ only in the gate
that switches them on (SAVEUS: value != 0, DOPE: value > 0), which their updates test. A3/A4 (the
rounding) live in ``refopt._arithmetic``; A5 needs no code (non-finite values propagate because
nothing tests for them).

Every function takes ``ops``, the ``Arithmetic`` of the tensor being stepped, and returns new
arrays; nothing is modified in place, and no Python ``if`` looks at an array value.
"""
from __future__ import annotations

import math


def empty_tensor_step(xp, param, state):
    """A6 <common.md#a6>: for an empty tensor no clause is evaluated; only the count moves."""
    return param, state._replace(step=xp.asarray(state.step + 1))


def trailing_mean(ops, x, torch_empty_axis_mean: bool):
    """A1 <common.md#a1>: R(mean of ``x`` over axes 1..ndim-1), keeping them as size 1.

    With no trailing axes (ndim <= 1) PyTorch's mean over an empty axis list reduces over all
    axes (quirk Q2 ``torch_empty_axis_mean``, on in both profiles); the array API's ``axis=()``
    reduces over none, which is what Q2 off computes."""
    xp = ops.xp
    if x.ndim > 1:
        mean = xp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    elif torch_empty_axis_mean:
        mean = xp.mean(x, axis=None, keepdims=True) if x.ndim else xp.mean(x)
    else:
        mean = x
    return ops.round(mean)


def normalizer_std(ops, x, channels: bool):
    """A2 <common.md#a2>: R(the std S2/D2 divide by), or None when the clause does not act.

    Per channel (over axes 1..) when ndim > 1 and ``channels``; else of the whole tensor when it
    has more than 2 elements; else None. Decided from the shape alone. Correction 1, so a
    one-element channel gives 0/0 = NaN, as the reference does."""
    xp = ops.xp
    if x.ndim > 1 and channels:
        std = xp.std(x, axis=tuple(range(1, x.ndim)), correction=1, keepdims=True)
    elif ops.size(x) > 2:
        std = xp.std(x, correction=1)
    else:
        return None
    return ops.round(std)


def infinities_to_nan(ops, x):
    """Q1 <quirks.md#q1>: the reference interpolates a tensor with itself, and ``x - x`` is NaN
    where ``x`` is infinite; elsewhere the interpolation returns ``x`` unchanged."""
    xp = ops.xp
    nan = xp.full((), math.nan, dtype=x.dtype, device=ops.device)  # made on the device, no copy
    return xp.where(xp.isinf(x), nan, x)


def centralize(ops, g, strength: float, torch_empty_axis_mean: bool):
    """S1 <saveus.md#s1>, D1 <dope.md#d1>: g - c * mean(g), with the mean of A1."""
    mean = trailing_mean(ops, g, torch_empty_axis_mean)
    shift = ops.mul(mean, strength)
    return ops.sub(g, shift)


def normalize(ops, g, weight: float, channels: bool, aliased_lerp: bool):
    """S2 <saveus.md#s2>, D2 <dope.md#d2>: g / (s + 1e-8), with the std s of A2.

    Quirk Q1 ``aliased_lerp`` on: the quotient itself (``weight`` only switched the clause on).
    Off: the documented interpolation g + weight * (g/s - g)."""
    std = normalizer_std(ops, g, channels)
    if std is None:
        return g
    divisor = ops.add_constant(std, 1e-8)
    normalized = ops.div(g, divisor)
    if aliased_lerp:
        return infinities_to_nan(ops, normalized)
    return ops.lerp(g, normalized, weight)
