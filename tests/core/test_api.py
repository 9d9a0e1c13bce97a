"""(g) state fields, output dtype/device/namespace on every backend, empty and 0-d parameters."""
from __future__ import annotations

import array_api_compat as aac
import numpy as np
import pytest

import refopt

FIELDS = {"saveus": ("step", "ema", "ema_squared"), "dope": ("step", "exp_avg", "fim", "fim_diff", "prev_grad")}


@pytest.mark.parametrize("name", ["saveus", "dope"])
def test_state_fields(core, name):
    opt = core.OPTIMIZERS[name]()
    s = opt.init(np.zeros((2, 3)))
    assert s._fields == FIELDS[name] and tuple(s.keys()) == FIELDS[name]
    for k in FIELDS[name]:
        assert s[k] is getattr(s, k)
    assert dict(s.items())["step"] is s.step
    with pytest.raises(KeyError, match="no field 'nope'"):
        s["nope"]
    assert s.step.shape == () and s.step.dtype.kind == "i" and int(s.step) == 0
    for k in FIELDS[name][1:]:
        assert s[k].shape == (2, 3) and s[k].dtype == np.float64 and not s[k].any()


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("name", ["saveus", "dope"])
def test_outputs_keep_namespace_dtype_device(xp, core, name, dtype):
    if xp.jit and dtype == "float32":
        pytest.skip("jax_jit: float64 and bfloat16 suffice (each dtype is another compile)")
    opt = core.OPTIMIZERS[name]()
    shape = xp.pick([(3, 5), (2, 2, 3, 3)], dtype)[0]
    p0, (g0,) = core.problem(shape, 1, seed=1)
    p, g = xp.asarray(p0, dtype), xp.asarray(g0, dtype)
    s = opt.init(p)
    p1, s1 = xp.step(opt, p, g, s)
    ns, dev = aac.array_namespace(p), aac.device(p)
    for x in (p1, *s1[1:], *s[1:]):
        assert aac.array_namespace(x) is ns
        assert x.dtype == p.dtype and tuple(x.shape) == shape
        assert aac.device(x) == dev
    assert type(s1) is opt.State
    assert tuple(s1.step.shape) == () and int(s1.step) == 1 and aac.device(s1.step) == dev


@pytest.mark.parametrize("name", ["saveus", "dope"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)], ids=str)
def test_empty_param_only_counts(core, name, shape):
    """A6: an empty tensor keeps its (empty) value and state; only the count moves."""
    opt = core.OPTIMIZERS[name]()
    p = np.zeros(shape)
    s = opt.init(p)
    for _ in range(2):
        p, s = opt.step(p, np.zeros(shape), s)
    assert p.shape == shape and int(s.step) == 2
    assert all(s[k].shape == shape for k in FIELDS[name][1:])


@pytest.mark.parametrize("name", ["saveus", "dope"])
def test_zero_d_param(xp, core, name):
    opt = core.OPTIMIZERS[name]()
    got = core.run(xp, opt, np.float64(0.7), [np.float64(0.3), np.float64(-1.2)])
    p, s = got[-1]
    assert p.shape == () and np.isfinite(p) and p != 0.7
    assert all(s[k].shape == () for k in FIELDS[name][1:]) and int(s["step"]) == 2


@pytest.mark.parametrize("shape", [(3,), (0,)], ids=str)
def test_numpy_step_count_stays_an_array(shape):
    opt = refopt.SAVEUS()
    p = np.ones(shape)
    _, s = opt.step(p, p, opt.init(p))
    assert isinstance(s.step, np.ndarray)


def test_hparams_and_replace():
    opt = refopt.DOPE(lr=1e-3)
    assert opt.hparams["lr"] == 1e-3 and opt.lr == 1e-3 and opt.hparams["betas"] == (0.999, 0.9999)
    opt.hparams["lr"] = 5.0  # a copy
    assert opt.lr == 1e-3
    new = opt.replace(eps_floor=1e-5, profile="documented")
    assert new.eps_floor == 1e-5 and new.lr == 1e-3 and new.profile == "documented"
    assert opt.eps_floor is None
    assert refopt.SAVEUS().hparams.keys() == {
        "lr", "betas", "eps", "weight_decay", "centralization", "normalization", "normalize_channels",
        "amp_fac", "clip_lambda", "decouple_weight_decay", "clip_gradients"}
