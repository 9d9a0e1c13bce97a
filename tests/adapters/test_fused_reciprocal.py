"""refopt.fused's division by a step scalar (refopt/fused/c_source.py's docstring): a float32
``sqrt(x) / c`` computed as ``(float)((double)sqrt(x) * (1.0 / (double)c))`` is IEEE's quotient
bit for bit wherever the kernel uses it, and the copy of a loop that divides runs where it would
not be."""
from __future__ import annotations

import ctypes
import math
import re

import numpy as np
import pytest

import refopt
from refopt import fused
from refopt.fused import build

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler")

GUARD = 2.0**51  # the largest |c| the fast loop takes


def by_reciprocal(x, c):
    """What the fast loop computes: x widened, times c's reciprocal in double, rounded to float32."""
    return (x.astype(np.float64) * (1.0 / np.float64(c))).astype(np.float32)


def same_bits(a, b) -> bool:
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


def square_roots(count, seed):
    """float32 square roots of positive float32s drawn uniformly over their bit patterns (every
    binade, subnormals included), with the special values."""
    bits = np.random.default_rng(seed).integers(1, 0x7F800000, count, dtype=np.uint32)
    roots = np.sqrt(bits.view(np.float32))
    return np.concatenate([roots, np.float32([0.0, -0.0, np.inf, np.nan, np.sqrt(np.float32(1e-45))])])


def divisors(count, seed):
    """float32 divisors up to the guard, over every binade (subnormals too), both signs, and the
    special values."""
    rng = np.random.default_rng(seed)
    top = np.float32(GUARD).view(np.uint32)
    c = rng.integers(1, top + 1, count, dtype=np.uint32).view(np.float32)
    c = np.where(rng.random(count) < 0.5, -c, c)
    return np.concatenate([c, np.float32([GUARD, 1.0, 0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45])])


def test_the_reciprocal_gives_the_correctly_rounded_quotient_up_to_the_guard():
    x = square_roots(200_000, 0)
    with np.errstate(all="ignore"):
        for c in divisors(300, 1):
            assert same_bits(x / c, by_reciprocal(x, c)), f"c = {float(c).hex()}"


def test_the_identity_fails_beyond_the_guard_where_the_quotient_is_subnormal():
    """Why the guard exists: 3 * 2**-150 is a rounding midpoint of float32's subnormals (the tie
    goes to 2 * 2**-149); the double product of x and 1/c falls just below it."""
    c = np.float32(49 * 2.0**80)
    x = np.float32([147 * 2.0**-70])  # sqrt(21609 * 2**-140), exact
    assert c > GUARD and x[0] == np.sqrt(np.float32(21609 * 2.0**-140))
    assert (x / c)[0] == np.float32(2 * 2.0**-149)
    assert by_reciprocal(x, c)[0] == np.float32(2.0**-149)


def _run(source, kernel, arrays, values, steps, rows, cols):
    """``steps`` steps of the kernel compiled from ``source`` (a variant of ``kernel``'s own)."""
    fn = getattr(build.load(source, f"test-{kernel.program.name}"), kernel.program.name)
    fn.restype = ctypes.c_int
    for step in range(steps):
        v = dict(values, step=step)
        args = (ctypes.c_double * len(kernel.params))(*[float(v[p]) for p in kernel.params])
        assert fn(args, ctypes.c_int64(rows), ctypes.c_int64(cols), 2,
                  *[ctypes.c_void_p(arrays[n].ctypes.data) for n in kernel.inputs]) == 0


@pytest.mark.parametrize("opt", [refopt.DOPE(), refopt.SAVEUS(), refopt.DOPE(betas=(0.5, 0.75), eps=0.0)],
                         ids=["dope", "saveus", "dope-eps0"])
def test_fast_and_dividing_loops_give_the_same_bits(opt):
    """The kernel as built (fast loops: the divisors are small) and the same kernel with every
    guard forced off (the loops that divide) agree bit for bit, sums included (their order is
    written out, so both copies of a loop sum alike)."""
    rows, cols = 37, 300
    kernel = fused.kernel_for(opt, 2, "float32", rows, cols)
    source = kernel.program_source
    guards = re.findall(r"const int (rdiv\d+_exact) = !\(fabs\(\(double\)\w+\) > 0x1p51\);", source)
    assert guards, "the kernel divides by no step scalar"
    assert source.count(f"if ({' && '.join(sorted(guards))})") >= 1
    dividing = re.sub(r"const int (rdiv\d+_exact) = [^;]*;", r"const int \1 = 0;", source)
    rng = np.random.default_rng(3)
    start = {n: rng.standard_normal(rows * cols).astype(np.float32) * 0.1 for n in kernel.inputs}
    for n in kernel.inputs:
        if n in ("fim", "fim_diff", "ema_squared"):
            start[n] = np.abs(start[n]) * 1e-3
    start["param"][:5] = [0.0, -0.0, 1e-40, np.inf, np.nan]
    values = fused.values_of(opt, 0, rows, cols)
    results = []
    for src in (source, dividing):
        arrays = {n: a.copy() for n, a in start.items()}
        arrays["grad"] = start["grad"]
        _run(src, kernel, arrays, values, 4, rows, cols)
        results.append(arrays)
    for n in kernel.inputs:
        assert same_bits(results[0][n], results[1][n]), n


def test_a_divisor_beyond_the_guard_runs_the_dividing_loop():
    """Hyperparameters no optimizer accepts (beta2 far below -1: sqrt(1 - beta2) > 2**51), given to
    the kernel directly: the guard is off and the kernel computes what the dividing copy does."""
    opt = refopt.DOPE()
    rows, cols = 8, 64
    kernel = fused.kernel_for(opt, 2, "float32", rows, cols)
    source = kernel.program_source
    dividing = re.sub(r"const int (rdiv\d+_exact) = [^;]*;", r"const int \1 = 0;", source)
    values = dict(fused.values_of(opt, 0, rows, cols), betas1=-(2.0**110))
    assert math.sqrt(1 - values["betas1"]) > GUARD
    rng = np.random.default_rng(4)
    start = {n: rng.standard_normal(rows * cols).astype(np.float32) for n in kernel.inputs}
    start["fim"] = np.abs(start["fim"])
    results = []
    for src in (source, dividing):
        arrays = {n: a.copy() for n, a in start.items()}
        _run(src, kernel, arrays, values, 1, rows, cols)
        results.append(arrays)
    for n in kernel.inputs:
        assert same_bits(results[0][n], results[1][n]), n
