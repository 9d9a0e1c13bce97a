"""Judging a port's output against a golden (spec/tolerance.md).

An element passes when ``|actual - golden| <= k * budget + floor_ulps * ulp(golden)``, where
``budget`` is the vector's per-element Monte Carlo arithmetic error budget (refopt/conformance/
mca.py), ``ulp`` is the spacing of the vector's dtype at the golden, NaN must sit exactly where
the golden is NaN, and infinities must match in sign.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .encoding import np_dtype

#: Default constants (spec/tolerance.md gives the measurements behind them).
K = 4.0
FLOOR_ULPS = 2.0


@dataclass(frozen=True)
class Judgement:
    passed: bool
    n: int                      # elements compared
    worst_budget_units: float   # max |actual-golden| / budget (inf where budget 0 and they differ)
    worst_ulps: float           # max |actual-golden| in ulps of the vector dtype at the golden
    bitwise_equal: int          # elements equal to the golden rounded to the vector dtype, bit for bit
    first_bad: tuple | None     # index (C order) of the first failing element, or None
    reason: str                 # "" when passed, else what failed first
    expected: float | None = None  # the golden at ``first_bad``
    actual: float | None = None    # the value there

    def __str__(self) -> str:
        verdict = "pass" if self.passed else f"FAIL ({self.reason})"
        return (f"{verdict}: {self.n} elements, worst {self.worst_budget_units:.3g} budget units, "
                f"{self.worst_ulps:.3g} ulps, {self.bitwise_equal} bitwise equal")


def ulp(golden: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` at |golden| (float64): the gap to the next value away from zero,
    never below the smallest subnormal."""
    fi = finfo(dtype)
    a = np.abs(np.asarray(golden, dtype=np.float64))
    with np.errstate(invalid="ignore", over="ignore"):
        _, e = np.frexp(np.where(np.isfinite(a), a, 0.0))
        # a = m * 2**e with m in [0.5, 1): spacing 2**(e - nmant - 1), subnormals clamp.
        e = np.where(a > 0, e - 1, fi["minexp"])
        spacing = np.ldexp(1.0, np.maximum(e, fi["minexp"]) - fi["nmant"])
    return spacing


def finfo(dtype: str) -> dict:
    import ml_dtypes

    fi = ml_dtypes.finfo(np_dtype(dtype)) if dtype == "bfloat16" else np.finfo(np_dtype(dtype))
    return {"nmant": int(fi.nmant), "minexp": int(fi.minexp), "max": float(fi.max)}


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np_dtype(dtype))


def _expected(vector, step_index, what):
    step = vector.steps[step_index]
    if what == "param":
        return step.param, step.budget
    if what not in step.state:
        names = ", ".join(["param", *step.state])
        raise KeyError(f"judge: unknown quantity {what!r}; expected one of {names}")
    if what == "step":
        return np.asarray(step.state["step"], dtype=np.float64), np.zeros(())
    return step.state[what], step.state_budget.get(what, np.zeros_like(step.state[what]))


def judge(vector, step_index, actual, *, what="param", k=None, floor_ulps=None) -> Judgement:
    """Compare ``actual`` (the port's ``what`` after step ``step_index``, 0-based) with the golden.

    ``actual`` is an array in the vector dtype, or anything convertible (numpy/torch/jax, or a
    float64 array of exactly-representable values). ``k``/``floor_ulps`` override the vector's."""
    golden, budget = _expected(vector, step_index, what)
    golden = np.asarray(golden, dtype=np.float64)
    tol = vector.tolerance
    k = float(tol.get("k", K) if k is None else k)
    floor_ulps = float(tol.get("floor_ulps", FLOOR_ULPS) if floor_ulps is None else floor_ulps)
    a, reason = _as_numpy(actual, vector.dtype if what != "step" else None)
    n = golden.size
    if reason:
        return Judgement(False, n, math.inf, math.inf, 0, None, reason)
    judged = getattr(vector, "judged", None) is not None and what != "step"
    want = tuple(vector.shape) if judged else golden.shape
    if a.shape != want:
        return Judgement(False, n, math.inf, math.inf, 0, None, f"shape {tuple(a.shape)} != {tuple(want)}")
    if judged:  # a format-2 vector judges a listed subset: compare those elements only
        a = vector.judged_part(a)
    if what == "step":
        ok = bool(a.shape == () and a == golden)
        return Judgement(ok, 1, 0.0 if ok else math.inf, 0.0 if ok else math.inf, int(ok), None if ok else (),
                         "" if ok else f"step {a} != {int(golden)}")
    af = a.astype(np.float64)
    gnan, anan = np.isnan(golden), np.isnan(af)
    # A golden beyond the dtype's range is matched by the dtype's own rounding (overflow to inf).
    rounded = _to_dtype(golden, vector.dtype)
    rf = rounded.astype(np.float64)
    nonfinite = ~np.isfinite(golden) | ~np.isfinite(af) | ~np.isfinite(rf)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.where(nonfinite, 0.0, np.abs(af - golden))
        u = ulp(golden, vector.dtype)
        limit = k * budget + floor_ulps * u
        units = np.where(err == 0, 0.0, err / np.where(budget > 0, budget, 0.0))
        ulps = err / u
    bad_nan = gnan != anan
    bad_inf = nonfinite & ~gnan & ~anan & (af != rf)
    bad = bad_nan | bad_inf | ~(err <= limit)
    bits = np.dtype(f"u{a.dtype.itemsize}")
    bitwise = int(np.sum((a.view(bits) == rounded.view(bits)) | (gnan & anan)))
    worst_units = float(np.max(units, initial=0.0))
    worst_ulps = float(np.max(ulps, initial=0.0))
    if not bad.any():
        return Judgement(True, n, worst_units, worst_ulps, bitwise, None, "")
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.reshape(-1))), golden.shape))
    where = vector.full_index(idx) if judged else idx
    if bad_nan[idx]:
        reason = "NaN where golden is finite" if anan[idx] else f"{af[idx]!r} where golden is NaN"
    elif bad_inf[idx]:
        reason = f"{af[idx]!r} where golden is {golden[idx]!r}"
    else:
        reason = (f"{what}{list(where)} = {af[idx]!r}, golden {golden[idx]!r}: error {err[idx]:.3g} is "
                  f"{units[idx]:.3g} budget units, {ulps[idx]:.3g} ulps (limit {limit[idx]:.3g})")
    return Judgement(False, n, worst_units, worst_ulps, bitwise, where, reason, float(golden[idx]), float(af[idx]))


def _as_numpy(actual, dtype):
    """(array, "") or (None, reason). Accepts numpy, torch, jax, array-api-strict arrays."""
    x = actual
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import torch

            x = x.view(torch.int16).numpy().view(np_dtype("bfloat16"))
        else:
            x = x.numpy()
    try:
        a = np.asarray(x)
    except Exception:  # e.g. array-api-strict: go through DLPack
        try:
            a = np.from_dlpack(x)
        except Exception as exc:
            return None, f"cannot convert {type(actual).__name__} to numpy ({exc})"
    if dtype is None:
        return a, ""
    want = np_dtype(dtype)
    if a.dtype == want:
        return a, ""
    if a.dtype.kind == "f" or a.dtype == np_dtype("bfloat16"):
        b = a.astype(np.float64).astype(want)
        with np.errstate(invalid="ignore"):
            exact = (b.astype(np.float64) == a.astype(np.float64)) | np.isnan(a.astype(np.float64))
        if bool(np.all(exact)):
            return b, ""
    return None, f"dtype {a.dtype.name if a.dtype != np_dtype('bfloat16') else 'bfloat16'} != {dtype}"
