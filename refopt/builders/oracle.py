"""An independent high-precision oracle for SAVEUS and DOPE (float64 inputs, mpmath arithmetic).

Written from the clause list of the normative semantics, not from ``refopt``'s array code: every
element is an ``mpmath.mpf``, every elementwise operation and reduction (mean, std with
correction 1, norm, count) is carried out at ``dps`` significant digits (50 by default), and the
trajectory is carried from step to step in that precision. The only values that are not exact are
the two that the specification defines as float32 numbers (D11 amplification and D12 cautious
scale, quirk ``float32_scalars``): they are computed with NumPy float32 operations, as specified,
and then used exactly. Non-finite values follow IEEE rules (NaN propagates, ``x/0`` is ``±inf``).

    from refopt.builders.oracle import trajectory
    steps = trajectory("dope", p0, [g1, g2, g3], {"lr": 1e-3}, quirks=None)
    steps[-1]["param"], steps[-1]["state"]["fim"], steps[-1]["mp_param"]

Needs ``mpmath`` (a test dependency); nothing in the optimizer imports this module.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import mpmath
import numpy as np

__all__ = ["trajectory", "SAVEUS_DEFAULTS", "DOPE_DEFAULTS", "QUIRKS", "REFERENCE", "DOCUMENTED"]

mpf = mpmath.mpf

# Reference defaults (semantics: "SAVEUS (normative version)" and "DOPE").
SAVEUS_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "centralization": 0.5,
    "normalization": 0.5, "normalize_channels": True, "amp_fac": 2.0,
    "clip_lambda": lambda t: t**0.25, "decouple_weight_decay": False, "clip_gradients": False,
}
DOPE_DEFAULTS: dict[str, Any] = {
    "lr": 1.5e-4, "betas": (0.999, 0.9999), "momentum_beta": 0.9999, "eps": 1e-6, "eps2": 1e-2,
    "eps_floor": None, "weight_decay": 0.01, "centralization": 0.5, "normalization": 0.5,
    "diff_mult": 1.0, "momentum_lambda": 0.25, "gamma": 0.0005, "clip": 1.0, "cautious": True,
    "normalize_channels": True,
}
QUIRKS = ("aliased_lerp", "torch_empty_axis_mean", "mars_current_grad",
          "lambda_scaled_amplification", "float32_scalars", "cautious_processed_grad")
REFERENCE = dict.fromkeys(QUIRKS, True)
DOCUMENTED = {**dict.fromkeys(QUIRKS, False), "torch_empty_axis_mean": True}
STATE_NAMES = {"saveus": ("ema", "ema_squared"), "dope": ("exp_avg", "fim", "fim_diff", "prev_grad")}


# --- elementwise helpers on object arrays of mpf ------------------------------------------------

def _to_mp(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    out = np.empty(a.shape, dtype=object)
    for idx, v in np.ndenumerate(a):
        out[idx] = mpf(float(v))
    return out


def _to_f64(a: np.ndarray) -> np.ndarray:
    """Round each element to the nearest float64 (mpf -> float rounds to nearest, ties to even)."""
    out = np.empty(a.shape, dtype=np.float64)
    for idx, v in np.ndenumerate(a):
        out[idx] = float(v)
    return out


def _isnan(x) -> bool:
    return mpmath.isnan(x)


def _div_scalar(a, b):
    """IEEE division on mpf (mpmath raises on a zero divisor; mpf zero carries no sign)."""
    if b == 0:
        if a == 0 or _isnan(a):
            return mpf("nan")
        return mpf("inf") if a > 0 else mpf("-inf")
    return a / b


_div = np.frompyfunc(_div_scalar, 2, 1)
_sqrt = np.frompyfunc(lambda x: mpmath.sqrt(x) if not _isnan(x) else x, 1, 1)


def _clamp_scalar(x, lo, hi):
    if _isnan(x):
        return x
    return lo if x < lo else hi if x > hi else x


_clamp = np.frompyfunc(_clamp_scalar, 3, 1)
_positive = np.frompyfunc(lambda a, b: bool(a * b > 0), 2, 1)


def _obj(x) -> np.ndarray:
    """Object arithmetic on 0-d arrays yields bare mpf scalars; put them back in an array."""
    return x if isinstance(x, np.ndarray) else np.full((), x, dtype=object)


def _sum(x: np.ndarray, axes, keepdims: bool):
    x = _obj(x)
    if axes is None:
        total = mpf(0)
        for v in x.flat:
            total += v
        return np.full((1,) * x.ndim if keepdims else (), total, dtype=object)
    return np.sum(x, axis=axes, keepdims=keepdims) if x.size else np.zeros(
        tuple(1 if i in axes else n for i, n in enumerate(x.shape)), dtype=object)


def _trailing_mean(x: np.ndarray, torch_rule: bool) -> np.ndarray:
    """A1: mean over axes 1..ndim-1 (keepdims); with none, ALL axes (torch) or none (array API)."""
    x = _obj(x)
    if x.ndim > 1:
        axes = tuple(range(1, x.ndim))
        n = math.prod(x.shape[1:])
        return _sum(x, axes, True) / mpf(n)
    if not torch_rule:
        return x
    return _sum(x, None, True) / mpf(x.size)


def _std(x: np.ndarray, axes) -> np.ndarray:
    """std with correction 1 (A2); one sample -> NaN."""
    n = x.size if axes is None else math.prod(x.shape[a] for a in axes)
    m = _sum(x, axes, True) / mpf(n)
    d = x - m
    ss = _sum(d * d, axes, True)
    var = ss / mpf(n - 1) if n > 1 else np.full(ss.shape, mpf("nan"), dtype=object)
    return _sqrt(var)


def _normalize(g, alpha, channels: bool, aliased: bool):
    """S2/D2: g/s (aliased lerp) or the documented g + a*(g/s - g); None when the clause is idle."""
    g = _obj(g)
    if g.ndim > 1 and channels:
        s = _std(g, tuple(range(1, g.ndim)))
    elif g.size > 2:
        s = _std(g, None).reshape(())
    else:
        return g
    g_hat = _div(g, s + mpf(1e-8))
    return g_hat if aliased else g + mpf(alpha) * (g_hat - g)


# --- the two float32 scalars (quirk float32_scalars) --------------------------------------------

def _amplification(t: int, lam: float, scaled: bool, f32: bool):
    """D11: lam * t**lam (Q4), as a correctly rounded float32 pow of float32(t) then a float32
    multiply (Q5). The power is taken at ``mp.dps`` digits and rounded once to float32's 24 bits
    (NumPy's own float32 power is not correctly rounded)."""
    if f32:
        lam32 = np.float32(lam)
        exact = mpf(float(np.float32(t))) ** mpf(float(lam32))
        with mpmath.workprec(24):  # round to nearest at float32's precision (normal range)
            a = np.float32(float(+exact))
        if scaled:
            a = np.multiply(lam32, a, dtype=np.float32)
        return mpf(float(a))
    a = mpf(t) ** mpf(lam)
    return mpf(lam) * a if scaled else a


def _cautious_scale(k: int, numel: int, f32: bool):
    """D12: numel / (k + 1e-8); float32 as (float32(k) + 1e-8), reciprocal, times numel (Q5)."""
    if f32:
        q = np.add(np.float32(k), np.float32(1e-8), dtype=np.float32)
        r = np.divide(np.float32(1.0), q, dtype=np.float32)
        return mpf(float(np.multiply(r, np.float32(numel), dtype=np.float32)))
    return mpf(numel) / (mpf(k) + mpf(1e-8))


# --- one step of each optimizer (state holds mpf object arrays) ---------------------------------

def _saveus_step(p, g, st, t: int, h, q):
    b1, b2 = (mpf(b) for b in h["betas"])
    c = h["centralization"]
    if c != 0:  # S1 (gate != 0)
        g = g - mpf(c) * _trailing_mean(g, q["torch_empty_axis_mean"])
    if h["normalization"] != 0:  # S2
        g = _normalize(g, h["normalization"], h["normalize_channels"], q["aliased_lerp"])
    bc1 = 1 - b1**t  # S3
    bc2_sqrt = mpmath.sqrt(1 - b2**t)
    step_size = mpf(h["lr"]) / bc1
    ema = st["ema"] * b1 + (1 - b1) * g  # S4
    g = g + mpf(h["amp_fac"]) * ema  # S5
    ema_sq = st["ema_squared"] * b2 + (1 - b2) * g * g  # S6
    denom = _sqrt(ema_sq) / bc2_sqrt + mpf(h["eps"])  # S7
    wd = mpf(h["weight_decay"])
    if h["decouple_weight_decay"] and wd != 0:  # S8
        p = p * (1 - step_size * wd)
    elif wd != 0:
        g = g + wd * p
    if h["clip_gradients"] and h["clip_lambda"] is not None:  # S9
        lim = mpf(h["clip_lambda"](mpf(t)))
        g = _clamp(g, -lim, lim)
    p = p - step_size * _div(g, denom)  # S10
    return p, {"ema": ema, "ema_squared": ema_sq}


def _dope_step(p, g, st, t: int, h, q):
    b1, b2 = (mpf(b) for b in h["betas"])
    mb, lam = mpf(h["momentum_beta"]), h["momentum_lambda"]
    if h["centralization"] > 0:  # D1 (gate > 0)
        g = g - mpf(h["centralization"]) * _trailing_mean(g, q["torch_empty_axis_mean"])
    if h["normalization"] > 0:  # D2
        g = _normalize(g, h["normalization"], h["normalize_channels"], q["aliased_lerp"])
    if h["clip"] > 0:  # D3: per-tensor norm, coefficient min(clip/(n+1e-6), 1), NaN propagates
        norm = mpmath.sqrt(_sum(g * g, None, False)[()])
        coef = _div_scalar(mpf(h["clip"]), norm + mpf(1e-6))
        coef = coef if _isnan(coef) or coef < 1 else mpf(1)
        g = g * coef
    fim = st["fim"] * b2 + (1 - b2) * g * g  # D4
    d = g - st["prev_grad"]
    fim_diff = st["fim_diff"] * b1 + (1 - b1) * d * d
    g_prev, prev = st["prev_grad"], g
    bc1, bc2 = 1 - b1**t, 1 - b2**t  # D5
    eps_hat = mpf(h["eps"])  # D6
    if h["eps_floor"] is not None:
        eps_hat = max(mpf(h["eps_floor"]), eps_hat * mpmath.sqrt(t))
    denom = _sqrt(fim) / mpmath.sqrt(bc2) + eps_hat  # D7
    denom_diff = _sqrt(fim_diff) / mpmath.sqrt(bc1) * mpf(h["diff_mult"]) + mpf(h["eps2"])
    u = _div(_div(g, denom), denom_diff)  # D8
    mars = mpf(h["gamma"]) * (b1 / (1 - b1))  # D9
    u = u + mars * (prev if q["mars_current_grad"] else g_prev)
    c_t = u
    exp_avg = st["exp_avg"] * mb + (1 - mb) * u  # D10 (centred value is stored)
    exp_avg = exp_avg - _trailing_mean(exp_avg, q["torch_empty_axis_mean"])
    u = u + exp_avg * _amplification(t, lam, q["lambda_scaled_amplification"], q["float32_scalars"])
    if h["cautious"]:  # D12
        u = _obj(u)
        ref = prev if q["cautious_processed_grad"] else c_t
        pos = np.asarray(_positive(u, ref), dtype=bool)
        scale = _cautious_scale(int(pos.sum()), u.size, q["float32_scalars"])
        u = u * np.where(pos, scale, mpf(0)).astype(object)
    wd = h["weight_decay"]
    if wd > 0:  # D13: pre-update p, D7's denominators
        p_new = p - mpf(h["lr"]) * mpf(wd) * _div(_div(p, denom), denom_diff)
    else:
        p_new = p
    p_new = p_new - mpf(h["lr"]) * u  # D14
    return p_new, {"exp_avg": exp_avg, "fim": fim, "fim_diff": fim_diff, "prev_grad": prev}


# --- public entry point --------------------------------------------------------------------------

def trajectory(optimizer: str, param0, grads: Sequence, hparams: Mapping[str, Any] | None = None,
               quirks: Mapping[str, bool] | None = None, state0: Mapping[str, Any] | None = None,
               dps: int = 50) -> list[dict]:
    """Run ``optimizer`` ("saveus" or "dope") from ``param0`` over ``grads`` in high precision.

    ``hparams`` uses the reference names (missing keys take the reference defaults); SAVEUS's
    ``clip_lambda`` is called with the step count as an ``mpf``. ``quirks`` maps quirk names to
    bools (None: profile ``reference``; missing names take their reference value). ``state0`` is
    None (fresh) or a dict of the state arrays plus ``"step"`` (int, steps already taken).

    Returns one dict per step: ``param`` (float64, rounded to nearest), ``state`` (float64 arrays
    and ``"step"``), ``mp_param`` and ``mp_state`` (object arrays of ``mpf``).
    """
    name = optimizer.lower()
    if name not in STATE_NAMES:
        raise ValueError(f"optimizer must be 'saveus' or 'dope', got {optimizer!r}")
    defaults = SAVEUS_DEFAULTS if name == "saveus" else DOPE_DEFAULTS
    unknown = sorted(set(hparams or {}) - set(defaults))
    if unknown:
        raise TypeError(f"unknown {name} hyperparameter {unknown[0]!r}")
    h = {**defaults, **(hparams or {})}
    bad = sorted(set(quirks or {}) - set(QUIRKS))
    if bad:
        raise TypeError(f"unknown quirk {bad[0]!r}")
    q = {**REFERENCE, **(quirks or {})}
    step_fn: Callable = _saveus_step if name == "saveus" else _dope_step
    names = STATE_NAMES[name]
    shape = np.shape(param0)
    out = []
    with mpmath.workdps(dps):
        p = _to_mp(param0)
        if state0 is None:
            st, step = {k: _to_mp(np.zeros(shape)) for k in names}, 0
        else:
            st, step = {k: _to_mp(state0[k]) for k in names}, int(state0["step"])
        for grad in grads:
            g = _to_mp(grad)
            if g.shape != p.shape:
                raise ValueError(f"grad shape {g.shape} != param shape {p.shape}")
            step += 1
            if p.size:  # A6: an empty tensor only advances the count
                p, st = step_fn(p, g, st, step, h, q)
                p, st = _obj(p).reshape(shape), {k: _obj(v).reshape(shape) for k, v in st.items()}
            out.append({
                "param": _to_f64(p),
                "state": {**{k: _to_f64(v) for k, v in st.items()}, "step": step},
                "mp_param": p.copy(),
                "mp_state": {k: v.copy() for k, v in st.items()},
            })
    return out
