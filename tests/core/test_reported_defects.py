"""Defects found by probing the core and the adapters as a user would (issue 10.7), one test each."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import refopt
from refopt.quirks import Quirks

S, D = refopt.SAVEUS, refopt.DOPE


def test_replace_profile_keeps_only_the_users_overrides():
    documented = Quirks.for_profile("documented").as_dict()
    assert D().replace(profile="documented").quirks.as_dict() == documented
    # an override given by the user survives the change of profile; nothing else of the old one does
    opt = D(quirks={"mars_current_grad": True}).replace(profile="documented")
    assert opt.quirks.as_dict() == dict(documented, mars_current_grad=True)
    assert opt == D(profile="documented", quirks={"mars_current_grad": True})


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"quirks": 3}, TypeError, "quirks must be a mapping"),
    ({"quirks": ["aliased_lerp"]}, TypeError, "quirks must be a mapping"),
    ({"betas": {0.9, 0.99}}, ValueError, "Invalid betas"),
])
def test_wrongly_typed_quirks_and_betas_are_clear_errors(kwargs, error, pattern):
    for cls in (S, D):
        with pytest.raises(error, match=pattern):
            cls(**kwargs)


def test_optimizers_are_immutable():
    opt = D()
    with pytest.raises(AttributeError, match="immutable: use opt.replace"):
        opt.lr = 0.5
    assert opt.lr == D().lr


@pytest.mark.parametrize("dtype", [np.longdouble, ml_dtypes.float8_e4m3fn, np.int32])
def test_unsupported_param_dtypes_are_refused_by_init_and_step(dtype):
    if np.dtype(dtype) == np.float64:  # pragma: no cover - where long double is double
        pytest.skip("long double is double here")
    p = np.zeros(3, dtype)
    for cls in (S, D):
        opt = cls()
        with pytest.raises(TypeError, match="param dtype must be"):
            opt.init(p)
        with pytest.raises(TypeError, match="param dtype must be"):
            opt.step(p, p, opt.init(np.zeros(3)))


@pytest.mark.parametrize("count, pattern", [(-1, "cannot be negative"),
                                            (np.iinfo(np.int64).max, "would overflow")])
@pytest.mark.parametrize("check_finite", [False, True])
def test_step_counts_the_adapters_refuse_are_refused_by_the_core(count, pattern, check_finite):
    p = np.ones(3)
    opt = S(check_finite=check_finite)
    state = opt.init(p)._replace(step=np.asarray(count, dtype=np.int64))
    with pytest.raises(ValueError, match=pattern):
        opt.step(p, p, state)


def numpy_threshold(t):
    return np.float32(0.5) * np.sqrt(t)  # a NumPy scalar, from a NumPy function of the step


def test_clip_lambda_returning_a_numpy_scalar_works_in_the_core_and_on_torch():
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal((4, 5)), 10 * rng.standard_normal((4, 5))
    core = S(clip_gradients=True, clip_lambda=numpy_threshold, normalization=0.0, lr=0.1)
    expected, _ = core.step(p, g, core.init(p))
    unclipped, _ = core.replace(clip_gradients=False).step(p, g, core.init(p))
    assert not np.allclose(expected, unclipped)  # the clip binds
    torch = pytest.importorskip("torch")
    import refopt.torch

    param = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = refopt.torch.SAVEUS([param], clip_gradients=True, clip_lambda=numpy_threshold, normalization=0.0, lr=0.1)
    param.grad = torch.from_numpy(g.copy())
    opt.step()
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=0, atol=1e-15)


def test_optax_inject_hyperparams_works():
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    import refopt.optax

    jax.config.update("jax_enable_x64", True)
    p = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    g = jnp.linspace(0.3, -0.5, 12).reshape(3, 4)
    ref = D(lr=1e-3)
    expected, _ = ref.step(np.asarray(p), np.asarray(g), ref.init(np.asarray(p)))
    eager = optax.inject_hyperparams(refopt.optax.dope)(learning_rate=1e-3)
    updates, _ = eager.update(g, eager.init(p), p)
    # the fused kernel sums in another order than NumPy (freedom 1): equal to the last bit or two
    np.testing.assert_allclose(np.asarray(p + updates), expected, rtol=1e-15, atol=0)
    # inside jax.jit the learning rate is injected (traced); the others stay static
    tx = optax.inject_hyperparams(refopt.optax.dope, static_args=refopt.optax.STATIC_ARGS["dope"])(learning_rate=1e-3)
    state = tx.init(p)
    update = jax.jit(tx.update)
    updates, state = update(g, state, p)
    np.testing.assert_allclose(np.asarray(p + updates), expected, rtol=1e-15, atol=0)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, _ = update(g, state, p)
    assert not np.any(np.asarray(updates))
    with pytest.raises(TypeError, match="only the learning rate can change inside a compiled step"):
        jax.jit(eager.update)(g, eager.init(p), p)
    with pytest.raises(TypeError, match="clip_lambda arrived as a number"):
        optax.inject_hyperparams(refopt.optax.saveus)(learning_rate=1e-3).init(p)
