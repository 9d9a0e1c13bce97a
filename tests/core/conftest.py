"""Helpers shared by the core tests (offered as fixtures: test modules here are not a package)."""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import refopt


def problem(shape, steps: int, seed: int, scale: float = 1.0):
    """A start parameter and ``steps`` gradients of ``shape`` (float64, reproducible)."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape)
    return p0, [scale * rng.standard_normal(shape) for _ in range(steps)]


def scaled_error(actual, expected) -> float:
    """max |actual - expected| over the finite elements, relative to max |expected| there.

    Non-finite elements must match exactly (same NaN positions, same infinities); a tensor whose
    expected values are all zero is compared absolutely."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg="NaN positions differ")
    inf = np.isinf(e)
    np.testing.assert_array_equal(a[inf], e[inf], err_msg="infinities differ")
    fin = np.isfinite(e)
    if not fin.any():
        return 0.0
    np.testing.assert_array_equal(np.isfinite(a[fin]), True, err_msg="non-finite where finite expected")
    scale = np.max(np.abs(e[fin]))
    diff = np.max(np.abs(a[fin] - e[fin]))
    return float(diff / scale) if scale > 0 else float(diff)


def run(backend, opt, p0, grads, dtype="float64"):
    """Step ``opt`` over ``grads`` on ``backend``; returns the NumPy params and states per step."""
    p = backend.asarray(p0, dtype)
    s = opt.init(p)
    out = []
    for g in grads:
        p, s = backend.step(opt, p, backend.asarray(g, dtype), s)
        out.append((backend.to_numpy(p), backend.state_to_numpy(s)))
    return out


OPTIMIZERS = {"saveus": refopt.SAVEUS, "dope": refopt.DOPE}


def seed(*parts) -> int:
    """A stable seed from test parameters (``hash`` of a str changes from run to run)."""
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(scope="session")
def core(backend_factory):
    """``core.problem``, ``scaled_error``, ``run``, ``seed``, ``OPTIMIZERS`` and ``numpy`` (backend)."""
    return SimpleNamespace(problem=problem, scaled_error=scaled_error, run=run, seed=seed,
                           OPTIMIZERS=OPTIMIZERS, numpy=backend_factory("numpy"))
