"""(a) float64 NumPy against the independent mpmath oracle (refopt/builders/oracle.py), 4 steps.

Error measure: |refopt - oracle| / max|oracle| per tensor and step, in float64 ulps (2**-52).
The bound is ULPS (6). An element over it is accepted only if it is *ill-conditioned*, detected
by a precision probe: the same oracle run at 53-bit working precision (dps=15: float64's
precision, every operation rounded) itself misses the exact result there by more than ULPS/2.
Such an element must then still be within 2x the probe's own error + ULPS. Measured: worst
well-conditioned element 4.0 ulps (DOPE, 0-d, diff_mult/momentum_lambda set); the only elements
over the bound are DOPE on shape (1,) (11.4 ulps, the probe misses by the same 11.4): D3 scales a
one-element gradient to +-(1 - 1e-6/|g|), so D4's ``g_t - g_{t-1}`` cancels and the rounding of
each ``g`` is amplified in ``fim_diff``. On every element the float64 error equals the probe's
error to the printed digits, i.e. refopt evaluates each clause as a once-rounded float64 op.
"""
from __future__ import annotations

import numpy as np
import pytest

from refopt.builders.oracle import trajectory

ULPS = 6
EPS = np.finfo(np.float64).eps
STEPS = 4

SHAPES = [(), (1,), (2,), (3,), (17,), (3, 5), (4, 1), (2, 2, 3, 3), (0, 3)]

HPARAMS = {
    "saveus": {
        "defaults": {},
        "decoupled_clip": {"weight_decay": 0.1, "decouple_weight_decay": True, "clip_gradients": True,
                           "clip_lambda": lambda t: 0.5 * t**0.25},
        "coupled_clip": {"weight_decay": 0.05, "clip_gradients": True, "clip_lambda": lambda t: 0.3 + 0 * t},
        "negative_centralization": {"centralization": -0.7, "normalization": 0.3, "normalize_channels": False,
                                    "amp_fac": 0.5},
        "clauses_off": {"centralization": 0.0, "normalization": 0.0, "betas": (0.5, 0.6), "eps": 0.0,
                        "lr": 0.05},
    },
    "dope": {
        "defaults": {},
        "eps_floor_no_clip_no_cautious": {"eps_floor": 0.2, "cautious": False, "clip": 0.0},
        "diff_mult_lambda": {"diff_mult": 2.5, "momentum_lambda": 0.5, "gamma": 0.01, "weight_decay": 0.1},
        "negative_centralization": {"centralization": -0.5, "normalization": 0.7, "normalize_channels": False},
        "fast_betas": {"betas": (0.9, 0.99), "momentum_beta": 0.9, "clip": 0.5, "eps2": 1e-3, "lr": 1e-2,
                       "weight_decay": 0.0},
    },
}
CASES = [(o, k) for o, sets in HPARAMS.items() for k in sets]


def _ulps(actual, exact) -> np.ndarray:
    fin = np.isfinite(exact)
    scale = np.max(np.abs(exact[fin])) if fin.any() else 1.0
    err = np.where(fin, np.abs(actual - np.where(fin, exact, 0.0)), 0.0)
    return err / (EPS * (scale if scale > 0 else 1.0))


@pytest.mark.parametrize("profile", ["reference", "documented"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,hset", CASES, ids=[f"{o}-{k}" for o, k in CASES])
def test_float64_matches_oracle(core, name, hset, shape, profile):
    hp = HPARAMS[name][hset]
    opt = core.OPTIMIZERS[name](**hp, profile=profile)
    p0, grads = core.problem(shape, STEPS, seed=core.seed(name, hset, shape))
    exact = trajectory(name, p0, grads, hp, quirks=opt.quirks.as_dict())
    got = core.run(core.numpy, opt, p0, grads)
    probe = None
    for k, ((p, state), ref) in enumerate(zip(got, exact)):
        for what, a, e in [("param", p, ref["param"])] + [
                (f"state.{n}", state[n], ref["state"][n]) for n in state if n != "step"]:
            np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"step {k + 1} {what}: NaN positions")
            if what != "param":  # states are checked for NaN positions; params for value
                continue
            over = _ulps(a, e) > ULPS
            if over.any():
                probe = probe or trajectory(name, p0, grads, hp, quirks=opt.quirks.as_dict(), dps=15)
                probe_err = _ulps(probe[k]["param"], e)
                bad = over & ((probe_err <= ULPS / 2) | (_ulps(a, e) > 2 * probe_err + ULPS))
                assert not bad.any(), (
                    f"step {k + 1}: {_ulps(a, e)[bad].max():.1f} ulps at well-conditioned elements "
                    f"{np.argwhere(bad).tolist()}")
        assert int(state["step"]) == ref["state"]["step"] == k + 1


def test_oracle_float32_scalars_are_float32_values():
    """D11/D12 under float32_scalars: the oracle's scalars are exactly float32 numbers, and differ
    from the exact ones by no more than float32 rounding (so the quirk is tiny but nonzero)."""
    from refopt.builders import oracle

    for t in (1, 2, 3, 7, 1000):
        a32 = oracle._amplification(t, 0.25, True, True)
        exact = oracle._amplification(t, 0.25, True, False)
        assert float(np.float32(float(a32))) == float(a32)
        assert abs(a32 - exact) <= 2 ** -23 * exact
    for k, n in ((1, 3), (7, 17), (5, 36), (0, 4)):
        s32 = oracle._cautious_scale(k, n, True)
        assert float(np.float32(float(s32))) == float(s32)
        if k:
            assert s32 == float(np.float32(np.float32(1) / np.float32(k)) * np.float32(n))


def test_oracle_state0_continues_a_run(core):
    """Resuming from a recorded (float64) state continues the same trajectory."""
    p0, grads = core.problem((3, 4), 4, seed=11)
    full = trajectory("dope", p0, grads, {})
    head = trajectory("dope", p0, grads[:2], {})
    tail = trajectory("dope", head[-1]["param"], grads[2:], {}, state0=head[-1]["state"])
    assert tail[-1]["state"]["step"] == 4
    assert core.scaled_error(tail[-1]["param"], full[-1]["param"]) <= 1e-15


@pytest.mark.parametrize("name", ["saveus", "dope"])
def test_oracle_edge_shapes(name):
    empty = trajectory(name, np.zeros((0, 3)), [np.zeros((0, 3))] * 2, {})
    assert empty[-1]["param"].shape == (0, 3) and empty[-1]["state"]["step"] == 2
    nan = trajectory(name, np.ones((4, 1)), [np.arange(4.0).reshape(4, 1)], {})
    assert np.isnan(nan[0]["param"]).all()  # A2: one-element channels
    scalar = trajectory(name, np.float64(0.5), [np.float64(0.25)], {})
    assert scalar[0]["param"].shape == () and np.isfinite(scalar[0]["param"])
    assert type(scalar[0]["mp_param"][()]).__name__ == "mpf"


def test_oracle_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer must be"):
        trajectory("adam", np.ones(2), [np.ones(2)], {})
    with pytest.raises(TypeError, match="unknown dope hyperparameter 'amp_fac'"):
        trajectory("dope", np.ones(2), [np.ones(2)], {"amp_fac": 2.0})
    with pytest.raises(TypeError, match="unknown quirk 'x'"):
        trajectory("saveus", np.ones(2), [np.ones(2)], {}, quirks={"x": True})
