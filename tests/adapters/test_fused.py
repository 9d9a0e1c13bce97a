"""refopt.fused: the core's step traced and compiled to C. Per element it computes what the core
computes (bit for bit for 16-bit parameters, whose reductions round to float32 anyway; float32 and
float64 within the reordering of sums); it writes in place; kernels are reused across steps and
learning rates, and rebuilt only when a switch changes."""
from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pytest

import refopt
from refopt import fused
from refopt.conformance.encoding import np_dtype

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler")

CONFIGS = [
    refopt.SAVEUS(),
    refopt.SAVEUS(clip_gradients=True, weight_decay=0.1, decouple_weight_decay=True, centralization=-0.5),
    refopt.SAVEUS(normalize_channels=False, weight_decay=0.05, profile="documented"),
    refopt.DOPE(),
    refopt.DOPE(profile="documented", eps_floor=1e-3),
    refopt.DOPE(normalize_channels=False, clip=0.0, cautious=False),
    refopt.DOPE(centralization=0.0, normalization=0.0, weight_decay=0.0,
                quirks={"mars_current_grad": False, "float32_scalars": False}),
]
SHAPES = [(), (7,), (4, 1), (3, 5), (2, 3, 4), (9, 33)]
#: float32/float64: the kernel sums in blocks (freedom 1), so reductions round differently;
#: measured worst (relative to the tensor's scale, 3 steps): float64 2e-15, float32 1.2e-5
#: (DOPE's ill-conditioned elements amplify a last-bit difference, spec/numerics.md)
BOUND = {"float64": 1e-13, "float32": 1e-4}


def _runs(opt, shape, dtype, steps=3):
    rng = np.random.default_rng(zlib.crc32(repr((repr(opt), shape, dtype)).encode()))
    dt = np_dtype(dtype)
    p0 = rng.standard_normal(shape).astype(dt)
    grads = [rng.standard_normal(shape).astype(dt) for _ in range(steps)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        p, st, core = p0.copy(), opt.init(p0.copy()), []
        for g in grads:
            p, st = opt.step(p, g, st)
            core.append([p] + [np.asarray(st[k]) for k in opt.facts.buffers])
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    kernel = fused.kernel_for(opt, len(shape), dtype, rows, cols)
    arrays = {"param": np.array(p0).reshape(-1).copy(), "grad": None,
              **{k: np.zeros(math.prod(shape), dt) for k in opt.facts.buffers}}
    compiled = []
    for i, g in enumerate(grads):
        arrays["grad"] = np.array(g).reshape(-1).copy()
        kernel({n: a.ctypes.data for n, a in arrays.items()}, rows, cols, fused.values_of(opt, i, rows, cols), 2)
        compiled.append([arrays["param"].reshape(shape).copy()] +
                        [arrays[k].reshape(shape).copy() for k in opt.facts.buffers])
    return core, compiled


def _check(opt, shape, dtype):
    core, compiled = _runs(opt, shape, dtype)
    for want_step, got_step in zip(core, compiled):
        for want, got in zip(want_step, got_step):
            w, g = want.astype(np.float64), got.astype(np.float64)
            np.testing.assert_array_equal(np.isnan(w), np.isnan(g))
            if dtype in ("bfloat16", "float16"):
                np.testing.assert_array_equal(w, g)  # 16-bit: every sum rounds to float32 both ways
                continue
            finite = np.isfinite(w)
            scale = max(float(np.max(np.abs(w[finite]), initial=0.0)), 1e-300)
            assert float(np.max(np.abs(w[finite] - g[finite]), initial=0.0)) <= BOUND[dtype] * scale


@pytest.mark.parametrize("shape,dtype", [((9, 33), "float32"), ((9, 33), "bfloat16"), ((7,), "float64"),
                                         ((2, 3, 4), "float16")], ids=str)
@pytest.mark.parametrize("opt", [CONFIGS[0], CONFIGS[3]], ids=lambda o: o.name)
def test_kernel_computes_what_the_core_computes(opt, shape, dtype):
    """Each configuration compiles a kernel on a cold cache (~0.5 s): a spread here, the rest
    in the slow sweep below."""
    _check(opt, shape, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opt", CONFIGS, ids=lambda o: f"{o.name}-{o.profile}-{zlib.crc32(repr(o).encode()) % 1000}")
def test_kernel_computes_what_the_core_computes_everywhere(opt, shape, dtype):
    _check(opt, shape, dtype)


def test_one_kernel_for_every_step_and_learning_rate():
    opt = refopt.DOPE()
    kernel = fused.kernel_for(opt, 2, "float32", 4, 6)
    assert fused.kernel_for(opt.replace(lr=0.3, betas=(0.5, 0.6)), 2, "float32", 40, 60) is kernel
    assert fused.kernel_for(opt, 3, "float32", 4, 6) is kernel  # trailing axes collapse into columns


def test_a_switch_that_changes_builds_another_kernel():
    opt = refopt.DOPE()
    kernel = fused.kernel_for(opt, 2, "float32", 4, 6)
    other = fused.kernel_for(opt.replace(centralization=-0.5), 2, "float32", 4, 6)  # D1 off (gate > 0)
    assert other is not kernel and not other.valid_for(fused.values_of(opt, 0, 4, 6))
    assert fused.kernel_for(opt, 2, "float64", 4, 6) is not kernel


def test_own_clip_lambda_is_not_traced():
    opt = refopt.SAVEUS(clip_gradients=True, clip_lambda=lambda t: t**0.5)
    with pytest.raises(fused.TraceError, match="clip_lambda of your own"):
        fused.kernel_for(opt, 2, "float32", 4, 6)


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("REFOPT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused.build, "_LOADED", {})
    with pytest.raises(fused.CompilerUnavailable):
        fused.build.load("int f(void) { return 1; }\n", "probe")
