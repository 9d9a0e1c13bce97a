"""refopt.optax's row-blocked DOPE path (large float32/float64 leaves on one CPU device) computes
what the core computes. The size threshold is lowered so small leaves, several blocks and the
hyperparameter switches it mirrors are all exercised."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)

import refopt  # noqa: E402
import refopt.optax as ro  # noqa: E402

SHAPES = {"conv": (6, 3, 4), "dense": (12, 5), "col": (5, 1), "bias": (7,)}
HPARAMS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "eps_floor": 1e-5, "profile": "documented"},
    {"lr": 1e-2, "cautious": False, "clip": 0.0, "weight_decay": 0.0, "centralization": 0.0},
    {"lr": 1e-2, "normalization": 0.0, "quirks": {"mars_current_grad": False, "cautious_processed_grad": False}},
]


@pytest.fixture
def rowblock(monkeypatch):
    monkeypatch.setattr(ro, "_fused_leaf", lambda opt, p: False)  # the walk is the fallback of the kernel
    monkeypatch.setattr(ro._rowblock, "MIN_NUMEL", 1)
    monkeypatch.setattr(ro._rowblock, "BLOCK_BYTES", 40)  # a few rows per block: several blocks per leaf


def run(dtype, hp, steps=4):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    params["dense"][2] *= 1e3  # rows of very different scale
    grads = [{k: rng.standard_normal(p.shape).astype(dtype) for k, p in params.items()} for _ in range(steps)]
    opt = refopt.DOPE(**hp)
    want = {k: (p, opt.init(p)) for k, p in params.items()}
    tx = ro.dope(**hp)
    got_p, state = jax.tree.map(jax.numpy.asarray, params), tx.init(params)
    for g in grads:
        want = {k: opt.step(*want[k][:1], g[k], want[k][1]) for k in params}
        got_p, state = ro.step(tx, g, state, got_p)
    return want, got_p, state


@pytest.mark.parametrize("hp", HPARAMS)
@pytest.mark.parametrize("dtype,rel", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_rowblock_matches_core(rowblock, hp, dtype, rel):
    assert ro._rowblock.applies(refopt.DOPE(**hp), jax.numpy.zeros((12, 5), dtype))
    want, got_p, state = run(dtype, hp)
    for k in SHAPES:
        pairs = [(got_p[k], want[k][0])] + [(getattr(state, f)[k], want[k][1][f])
                                             for f in ("exp_avg", "fim", "fim_diff", "prev_grad")]
        for got, exp in pairs:
            got, exp = np.asarray(got, np.float64), np.asarray(exp, np.float64)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(exp))
            scale = max(float(np.nanmax(np.abs(exp), initial=0.0)), 1e-300)
            assert float(np.nanmax(np.abs(got - exp), initial=0.0)) <= rel * scale, k


def test_rowblock_not_for_16bit_vectors_or_saveus(rowblock):
    opt = refopt.DOPE()
    assert not ro._rowblock.applies(opt, jax.numpy.zeros((8, 8), jax.numpy.bfloat16))
    assert not ro._rowblock.applies(opt, jax.numpy.zeros((64,), jax.numpy.float32))
    assert not ro._rowblock.applies(refopt.SAVEUS(), jax.numpy.zeros((8, 8), jax.numpy.float32))
    assert not ro._rowblock.applies(opt.replace(normalize_channels=False), jax.numpy.zeros((8, 8), jax.numpy.float32))
