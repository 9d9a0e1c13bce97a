"""(h) bad input gives a clear exception naming what is wrong (spec/errors.md), and a step that
raises leaves every input as it was."""
from __future__ import annotations

import math

import numpy as np
import pytest

import refopt

S, D = refopt.SAVEUS, refopt.DOPE
NAN, INF = math.nan, math.inf

BAD_HPARAMS = [
    # (optimizer, kwargs, exception, message pattern)
    (D, {"lr": NAN}, ValueError, r"Invalid learning rate: nan \(lr must be finite"),
    (S, {"lr": INF}, ValueError, r"Invalid learning rate: inf"),
    (S, {"lr": -1e-3}, ValueError, r"Invalid learning rate: -0.001 \(lr must be finite and in \[0.0, inf\)\)"),
    (D, {"betas": (0.9, 0.99, 0.999)}, ValueError, r"Invalid betas: .*must be a pair"),
    (S, {"betas": 0.9}, ValueError, r"Invalid betas: 0.9"),
    (S, {"betas": "ab"}, ValueError, r"Invalid betas: 'ab'"),
    (D, {"betas": (0.9, 1.0)}, ValueError, r"Invalid beta parameter at index 1: 1.0 \(betas\[1\]"),
    (S, {"betas": (-0.1, 0.9)}, ValueError, r"Invalid beta parameter at index 0: -0.1"),
    (S, {"betas": (NAN, 0.9)}, ValueError, r"Invalid beta parameter at index 0: nan"),
    (D, {"betas": (0.9, "x")}, TypeError, r"betas\[1\] must be a real number, got str"),
    (D, {"momentum_beta": 1.0}, ValueError, r"Invalid momentum_beta parameter: 1.0"),
    (S, {"eps": -1e-8}, ValueError, r"Invalid epsilon value: -1e-08 \(eps must be"),
    (D, {"eps2": -0.01}, ValueError, r"Invalid epsilon2 value: -0.01 \(eps2 must be"),
    (D, {"eps_floor": -1.0}, ValueError, r"Invalid eps_floor value"),
    (D, {"eps_floor": INF}, ValueError, r"Invalid eps_floor value: inf"),
    (D, {"weight_decay": NAN}, ValueError, r"Invalid weight_decay: nan \(weight_decay must be finite\)"),
    (S, {"amp_fac": INF}, ValueError, r"Invalid amp_fac: inf"),
    (D, {"gamma": -INF}, ValueError, r"Invalid gamma"),
    (D, {"lr": "0.1"}, TypeError, r"lr must be a real number, got str '0.1'"),
    (D, {"lr": None}, TypeError, r"lr must be a real number, got NoneType"),
    (D, {"lr": True}, TypeError, r"lr must be a real number, got bool"),
    (D, {"lr": np.array(0.1)}, TypeError, r"lr must be a real number, got ndarray"),
    (S, {"clip_lambda": 3}, TypeError, r"clip_lambda must be callable or None, got 3"),
    (D, {"cautious": 1}, TypeError, r"cautious must be True or False, got int 1"),
    (S, {"normalize_channels": "yes"}, TypeError, r"normalize_channels must be True or False"),
    (S, {"decouple_weight_decay": None}, TypeError, r"decouple_weight_decay must be True or False"),
    (D, {"check_finite": 1}, TypeError, r"check_finite must be True or False"),
    (D, {"foo": 1}, TypeError, r"DOPE\(\) got an unexpected hyperparameter 'foo'; known: lr, "),
    (S, {"momentum_beta": 0.9}, TypeError, r"SAVEUS\(\) got an unexpected hyperparameter 'momentum_beta'"),
    (S, {"decouple": True}, TypeError, r"unexpected hyperparameter 'decouple'"),
    (D, {"profile": "pytorch"}, ValueError, r"Invalid profile: 'pytorch'; expected one of reference, documented"),
    (D, {"quirks": {"mars": False}}, TypeError, r"unknown quirk 'mars'; known quirks: aliased_lerp"),
    (S, {"quirks": {"aliased_lerp": 0}}, TypeError, r"quirk 'aliased_lerp' must be True or False, got 0"),
]


@pytest.mark.parametrize("cls,kwargs,exc,pattern", BAD_HPARAMS,
                         ids=[f"{c.__name__}-{next(iter(k))}-{i}" for i, (c, k, _, _) in enumerate(BAD_HPARAMS)])
def test_bad_hyperparameter(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("cls,kwargs", [(D, {"lr": 0.0, "eps": 0.0, "eps2": 0.0, "betas": (0.0, 0.0)}),
                                        (S, {"weight_decay": -0.1, "centralization": -1.0}),
                                        (D, {"lr": np.float32(1e-3), "momentum_beta": 0}),
                                        (S, {"clip_lambda": None, "clip_gradients": True})])
def test_edge_hyperparameters_accepted(cls, kwargs):
    opt = cls(**kwargs)
    p = np.linspace(-1, 1, 6).reshape(2, 3)
    new, _ = opt.step(p, p + 0.5, opt.init(p))
    assert new.shape == p.shape


def _p(shape=(3,), dtype=np.float64):
    return np.linspace(0.5, 1.5, math.prod(shape)).reshape(shape).astype(dtype)


def _bad_steps():
    torch = pytest.importorskip("torch")
    xps = pytest.importorskip("array_api_strict")
    p, dev1 = _p(), xps.Device("device1")
    pa, pb = xps.asarray(p), xps.asarray(p, device=dev1)
    return [
        ("grad shape", D, lambda o: o.step(p, _p((4,)), o.init(p)), ValueError,
         r"grad has shape \(4,\) but param has shape \(3,\)"),
        ("grad dtype", D, lambda o: o.step(p, _p(dtype=np.float32), o.init(p)), TypeError,
         r"grad has dtype float32 but param has dtype float64; cast it"),
        ("int param", S, lambda o: o.step(_p(dtype=np.int64), _p(dtype=np.int64), o.init(p)), TypeError,
         r"param dtype must be a real floating dtype .* got int64"),
        ("bool param", D, lambda o: o.step(np.ones(3, bool), np.ones(3, bool), o.init(p)), TypeError,
         r"got bool"),
        ("complex param", D, lambda o: o.step(_p(dtype=complex), _p(dtype=complex), o.init(p)), TypeError,
         r"got complex128"),
        ("int init", S, lambda o: o.init(np.ones(3, int)), TypeError,
         r"SAVEUS.init: param dtype must be one of float16, bfloat16, float32, float64, got int64"),
        ("list param", D, lambda o: o.step([1.0, 2.0, 3.0], p, o.init(p)), TypeError,
         r"param must be an array, got list"),
        ("two libraries", D, lambda o: o.step(p, torch.ones(3, dtype=torch.float64), o.init(p)), TypeError,
         r"param, grad and state come from different array libraries"),
        ("state library", S, lambda o: o.step(torch.ones(3, dtype=torch.float64),
                                              torch.ones(3, dtype=torch.float64), o.init(p)), TypeError,
         r"different array libraries"),
        ("two devices", D, lambda o: o.step(pa, pb, o.init(pa)), ValueError,
         r"grad is on device .*device1.* but param is on"),
        ("state device", S, lambda o: o.step(pa, pa, o.init(pb)), ValueError,
         r"state.ema is on device .*device1"),
        ("other optimizer's state", D, lambda o: o.step(p, p, S().init(p)), TypeError,
         r"DOPE.step: state must be a DOPEState from DOPE.init, got SAVEUSState"),
        ("dict state", S, lambda o: o.step(p, p, dict(o.init(p)._asdict())), TypeError,
         r"state must be a SAVEUSState from SAVEUS.init, got dict"),
        ("state shape", D, lambda o: o.step(p, p, o.init(_p((2, 3)))), ValueError,
         r"state.exp_avg has shape \(2, 3\) but param has shape \(3,\) \(was the state made for another"),
        ("state dtype", S, lambda o: o.step(p, p, o.init(_p(dtype=np.float32))), TypeError,
         r"state.ema has dtype float32 but param has dtype float64"),
        ("float step count", D, lambda o: o.step(p, p, o.init(p)._replace(step=np.asarray(0.0))), TypeError,
         r"state.step must be a 0-d integer array"),
        ("vector step count", D, lambda o: o.step(p, p, o.init(p)._replace(step=np.zeros(2, int))),
         TypeError, r"state.step must be a 0-d integer array"),
    ]


@pytest.mark.parametrize("case", range(17))
def test_bad_step_inputs(case):
    what, cls, call, exc, pattern = _bad_steps()[case]
    with pytest.raises(exc, match=pattern):
        call(cls())


@pytest.mark.parametrize("field,value", [("fim", None), ("step", 0), ("step", None)])
def test_state_field_not_an_array(field, value):
    p = _p()
    with pytest.raises(TypeError, match=rf"state.{field} must be "):
        D().step(p, p, D().init(p)._replace(**{field: value}))


@pytest.mark.parametrize("cls", [S, D])
def test_failed_step_leaves_inputs_untouched(cls):
    p, g = _p((2, 3)), _p((2, 3)) * -1
    opt = cls()
    _, s = opt.step(p, g, opt.init(p))
    s = s._replace(**{s._fields[1]: s[1][:1]})  # a state of another shape
    before = [np.array(a, copy=True) for a in (p, g, *s)]
    with pytest.raises(ValueError):
        opt.step(p, g, s)
    g_nan = g.copy()
    g_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"grad has 1 non-finite element\(s\) \(check_finite=True\)"):
        opt.replace(check_finite=True).step(p, g_nan, opt.init(p))
    for b, a in zip(before, (p, g, *s)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", [S, D])
def test_check_finite(cls):
    opt = cls(check_finite=True)
    p = _p((2, 3))
    good, _ = opt.step(p, p, opt.init(p))
    assert np.isfinite(good).all()
    bad_p = p.copy()
    bad_p[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"param has 1 non-finite element"):
        opt.step(bad_p, p, opt.init(p))
    bad_g = np.full((2, 3), np.nan)
    with pytest.raises(ValueError, match=r"grad has 6 non-finite element"):
        opt.step(p, bad_g, opt.init(p))


def test_non_finite_gradient_propagates():
    """A5: no error by default. SAVEUS's reductions are per channel (S1/S2 over axes 1..), so a NaN
    spoils its own row only; DOPE's per-tensor clip norm (D3) spreads it to every element."""
    p = _p((3, 4))
    g = np.cos(np.arange(12.0)).reshape(3, 4)
    g[1, 2] = np.nan
    new, s = S().step(p, g, S().init(p))
    assert np.isnan(new[1]).all() and np.isfinite(new[[0, 2]]).all()
    assert np.isnan(s.ema[1]).all() and np.isfinite(s.ema[[0, 2]]).all()
    new, s = D().step(p, g, D().init(p))
    assert np.isnan(new).all() and np.isnan(s.prev_grad).all()
    g[1, 2] = np.inf  # inf - mean(inf) = nan: the same pattern
    assert np.isnan(S().step(p, g, S().init(p))[0][1]).all()
    new, _ = D(clip=0.0, cautious=False).step(p, g, D().init(p))
    assert np.isnan(new[1]).all()
