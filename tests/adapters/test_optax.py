"""refopt.optax: the core's numbers over pytrees, optax conventions, schedules, no retracing.

The exactness tests run the core's own program (``fused=False``); the fused kernel (the default on
one CPU device) computes the same up to the order of its sums, checked at the end."""
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does; float64 agreement needs it
import jax.numpy as jnp  # noqa: E402

import refopt  # noqa: E402
import refopt.optax as ro  # noqa: E402

# Leaves of every rank the clauses distinguish: channels (ndim > 1), 1-d global normalisation,
# numel <= 2 (no S2/D2), 0-d, empty (A6), one-element channels (A2: NaN by specification).
SHAPES = {"conv": (4, 3, 2), "dense": (6, 5), "bias": (7,), "pair": (2,), "scalar": (), "empty": (0, 3),
          "col": (3, 1)}
SAVEUS_CORE = functools.partial(ro.saveus, fused=False)
DOPE_CORE = functools.partial(ro.dope, fused=False)
CONFIGS = [
    (refopt.SAVEUS, SAVEUS_CORE, {}),
    (refopt.SAVEUS, SAVEUS_CORE, {"weight_decay": 0.1, "decouple_weight_decay": True, "clip_gradients": True}),
    (refopt.SAVEUS, SAVEUS_CORE, {"weight_decay": 0.05, "profile": "documented"}),
    (refopt.DOPE, DOPE_CORE, {"lr": 1e-2}),
    (refopt.DOPE, DOPE_CORE, {"lr": 1e-2, "eps_floor": 1e-5, "profile": "documented"}),
]


def make_tree(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def grads_seq(params, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()} for _ in range(steps)]


def core_run(opt, params, grads):
    """The core on NumPy, leaf by leaf."""
    states = {k: opt.init(p) for k, p in params.items()}
    for g in grads:
        for k in params:
            params[k], states[k] = opt.step(params[k], g[k], states[k])
    return params, states


def assert_close(got, want, rel):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    scale = max(float(np.nanmax(np.abs(want), initial=0.0)), 1e-300)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    err = float(np.nanmax(np.abs(got - want), initial=0.0))
    assert err <= rel * scale, f"max error {err:.3e} > {rel:g} x scale {scale:.3e}"


def optax_run(tx, params, grads, exact):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    exact_step = jax.jit(lambda g, s, p: ro.step(tx, g, s, p))
    for g in grads:
        if exact:
            params, state = exact_step(g, state, params)
        else:
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("cls,factory,hp", CONFIGS)
def test_float64_matches_core_leaf_by_leaf(cls, factory, hp):
    params, grads = make_tree(np.float64), grads_seq(make_tree(np.float64), 6)
    want_p, want_s = core_run(cls(**hp), dict(params), grads)
    got_p, got_s = optax_run(factory(**hp), params, grads, exact=False)
    for k in SHAPES:
        assert_close(got_p[k], want_p[k], 1e-12)
        for field in cls.State._fields[1:]:
            assert_close(getattr(got_s, field)[k], want_s[k][field], 1e-12)
    assert int(got_s.step) == 6 and got_s.step.dtype == jnp.int64  # x64: counts past 2**31 - 1


@pytest.mark.parametrize("cls,factory,hp", [CONFIGS[1], CONFIGS[3]])
def test_step_is_the_core_and_apply_updates_one_rounding_off(cls, factory, hp):
    """ro.step gives the core's jitted per-leaf result bit for bit; params + (new - params) can
    differ from it only where new - params is inexact, by one rounding at max(|param|, |new|)."""
    params = jax.tree.map(jnp.asarray, make_tree(np.float32))
    g = jax.tree.map(jnp.asarray, grads_seq(params, 1)[0])
    tx, opt = factory(**hp), cls(**hp)
    state = tx.init(params)
    new, _ = ro.step(tx, g, state, params)  # eager calls share one internally jitted program
    updates, _ = tx.update(g, state, params)
    readded = optax.apply_updates(params, updates)
    core = jax.jit(lambda p, g: {k: opt.step(p[k], g[k], opt.init(p[k]))[0] for k in p})(params, g)
    for k, p in params.items():
        want = core[k]
        np.testing.assert_array_equal(new[k], want)
        bound = np.spacing(np.maximum(np.abs(p), np.abs(want)))
        assert np.all((np.abs(readded[k] - want) <= bound) | np.isnan(want))


@pytest.mark.parametrize("cls,factory,hp", CONFIGS[::3])
def test_float32_close_and_low_precision_kept(cls, factory, hp):
    params = {**make_tree(np.float32), "half": np.ones((3, 4), np.float16), "bf": jnp.ones((5,), jnp.bfloat16)}
    grads = grads_seq(params, 3)
    grads[0]["bf"] = np.linspace(-1, 1, 5).astype(jnp.bfloat16)
    np_params = {k: np.asarray(v) for k, v in params.items()}
    want_p, _ = core_run(cls(**hp), np_params, [{k: np.asarray(v) for k, v in g.items()} for g in grads])
    got_p, got_s = optax_run(factory(**hp), params, grads, exact=False)
    for k, p in params.items():
        assert got_p[k].dtype == jnp.asarray(p).dtype and got_s[1][k].dtype == jnp.asarray(p).dtype
        assert_close(got_p[k], want_p[k], 1e-5 if k in SHAPES else 1e-2)


@pytest.mark.parametrize("factory", [ro.saveus, ro.dope])
def test_jitted_update_traces_once(factory):
    traces = []
    tx = factory(optax.exponential_decay(1e-3, 2, 0.5))

    def counted(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    update = jax.jit(counted)
    params = jax.tree.map(jnp.asarray, make_tree(np.float32))
    state = tx.init(params)
    for g in grads_seq(params, 5):
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    assert len(traces) == 1 and update._cache_size() == 1
    assert int(state.step) == 5


@pytest.mark.parametrize("leaf_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls,factory,hp", [CONFIGS[1], CONFIGS[3]])
def test_schedule_uses_update_count(cls, factory, hp, leaf_dtype):
    """lr_t = schedule(number of updates already done), applied as the reference's Python float."""
    seen = []
    sched = optax.cosine_decay_schedule(3e-2, 5)

    def schedule(count):
        jax.debug.callback(lambda c: seen.append(int(c)), count)
        return sched(count)

    hp = {k: v for k, v in hp.items() if k != "lr"}
    params = make_tree(leaf_dtype)
    grads = grads_seq(params, 4)
    opt, want = cls(**hp), dict(params)
    states = {k: opt.init(p) for k, p in want.items()}
    for n, g in enumerate(grads):
        o = opt.replace(lr=float(sched(n)))
        for k in want:
            want[k], states[k] = o.step(want[k], g[k], states[k])
    got, _ = optax_run(factory(schedule, **hp), params, grads, exact=True)
    assert seen == [0, 1, 2, 3]
    for k in SHAPES:
        assert got[k].dtype == want[k].dtype
        assert_close(got[k], want[k], 1e-12 if leaf_dtype == np.float64 else 1e-6)


def test_learning_rate_aliases_and_defaults():
    p = {"w": jnp.ones((3, 2))}
    g = {"w": jnp.full((3, 2), 0.5)}
    runs = [ro.dope(2e-3), ro.dope(learning_rate=2e-3), ro.dope(lr=2e-3)]
    outs = [tx.update(g, tx.init(p), p)[0]["w"] for tx in runs]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    assert isinstance(runs[0], optax.GradientTransformationExtraArgs)
    with pytest.raises(TypeError, match="not both"):
        ro.saveus(1e-3, lr=1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ro.saveus(-1.0)
    with pytest.raises(TypeError, match="unexpected hyperparameter"):
        ro.dope(momentum=0.9)
    # defaults are the reference's: no lr given equals the core default
    want, _ = refopt.DOPE().step(np.ones((3, 2)), np.full((3, 2), 0.5), refopt.DOPE().init(np.ones((3, 2))))
    got, _ = ro.step(ro.dope(), g, ro.dope().init(p), p)
    np.testing.assert_array_equal(got["w"], want)


def test_errors_name_the_problem():
    tx = ro.saveus()
    p = {"w": jnp.ones(3), "n": [jnp.arange(3)]}
    with pytest.raises(TypeError, match=r"\['n'\]\[0\].*real floating"):
        tx.init(p)
    p = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))
    with pytest.raises(TypeError, match="SAVEUSState"):
        tx.update(p, ro.dope().init(p), p)
    with pytest.raises(TypeError, match="must come from refopt.optax"):
        ro.step(optax.adam(1e-3), p, None, p)


def test_composes_with_optax_and_numpy_leaves():
    params = {"w": np.linspace(-1, 1, 12).reshape(3, 4), "s": np.float64(0.3)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), ro.dope(1e-2))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(lambda x: x * 10, params), state, params)
    new = optax.apply_updates(params, updates)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))


@pytest.mark.parametrize("cls,factory,hp", [(refopt.SAVEUS, ro.saveus, {}), (refopt.DOPE, ro.dope, {"lr": 1e-2})])
def test_fused_kernel_follows_the_core_with_a_schedule(cls, factory, hp):
    """The default on one CPU device: refopt.fused's kernel as an XLA FFI call, the scheduled
    learning rate passed at run time (one trace); float64 within the reordering of its sums."""
    from refopt import fused

    if not fused.available():
        pytest.skip("no C compiler")
    sched = optax.cosine_decay_schedule(3e-2, 5)
    params, grads = make_tree(np.float64), grads_seq(make_tree(np.float64), 4)
    want, _ = optax_run(factory(sched, fused=False, **{k: v for k, v in hp.items() if k != "lr"}), params, grads, True)
    got, _ = optax_run(factory(sched, fused=True, **{k: v for k, v in hp.items() if k != "lr"}),
                       make_tree(np.float64), grads, True)
    for k in SHAPES:
        assert_close(got[k], want[k], 1e-10)


_FUSED_STEPS = """
import numpy as np, jax.numpy as jnp, refopt.optax as ro


def fused_steps(name, p, gs):
    tx = getattr(ro, name)(1e-2, weight_decay=0.1, fused=True)
    params = {"w": jnp.asarray(p)}
    state = tx.init(params)
    for g in gs:
        params, state = tx.update.refopt_step({"w": jnp.asarray(g)}, state, params)
    return np.asarray(params["w"])
"""
_WITHOUT_X64 = _FUSED_STEPS + """
import sys, jax
assert not jax.config.read("jax_enable_x64")
p, gs = np.load(sys.argv[1]), np.load(sys.argv[2])
for name in ("saveus", "dope"):
    np.save(sys.argv[3] + name + ".npy", fused_steps(name, p, gs))
"""


def test_fused_kernel_takes_float64_scalars_without_x64(tmp_path):
    """Without jax_enable_x64 (JAX's default) the kernel still gets the hyperparameters as the
    float64 numbers they are: its result equals the one under x64 bit for bit."""
    import subprocess
    import sys

    from refopt import fused

    if not fused.available():
        pytest.skip("no C compiler")
    rng = np.random.default_rng(5)
    p, gs = rng.standard_normal((9, 7)).astype(np.float32), rng.standard_normal((3, 9, 7)).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "g.npy", gs)
    subprocess.run([sys.executable, "-c", _WITHOUT_X64, str(tmp_path / "p.npy"), str(tmp_path / "g.npy"),
                    str(tmp_path / "out_")], check=True, timeout=300)
    here = {}
    exec(_FUSED_STEPS, here)  # noqa: S102 - the same steps, in this process (x64 on)
    for name in ("saveus", "dope"):
        np.testing.assert_array_equal(np.load(tmp_path / f"out_{name}.npy"), here["fused_steps"](name, p, gs))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("factory", [ro.saveus, ro.dope])
def test_fused_updates_are_the_new_parameter_minus_the_old(factory, dtype):
    """``update`` takes the kernel that writes ``new - param`` itself over the gradient's buffer
    (the parameter only read, so XLA keeps no copy of it): the same numbers as the new parameters
    minus the old, rounded once; the caller's gradients stay as they were."""
    from refopt import fused

    if not fused.available():
        pytest.skip("no C compiler")
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((5, 6)), dtype), "b": jnp.asarray(rng.standard_normal(6), dtype)}
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), dtype) for k, v in params.items()}
    kept = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    tx = factory(3e-2, weight_decay=0.1, fused=True)
    state = tx.init(params)
    updates, s1 = tx.update(grads, state, params)
    for k in grads:
        np.testing.assert_array_equal(np.asarray(grads[k], np.float64), kept[k])
    new, s2 = tx.update.refopt_step(grads, state, params)
    for k in params:
        assert updates[k].dtype == params[k].dtype
        np.testing.assert_array_equal(np.asarray(updates[k], np.float64), np.asarray(new[k] - params[k], np.float64))
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_fused_kernels_share_the_cpus_with_xla(monkeypatch):
    """XLA runs the kernels of independent leaves concurrently on its own threads: each kernel of
    a many-leaf tree gets one thread; a tree with one leaf gives its kernel all of them."""
    from refopt import fused as fused_kernels
    from refopt.fused import jax_ffi

    if not (fused_kernels.available() and jax_ffi.usable()):
        pytest.skip("no fused kernel here")
    seen = []
    real = jax_ffi.step

    def spy(*args, threads=None, **kwargs):
        seen.append(threads)
        return real(*args, threads=threads, **kwargs)

    monkeypatch.setattr(jax_ffi, "step", spy)
    for tree, expected in (({"w": jnp.ones((8, 16)), "b": jnp.ones((16,))}, [1, 1]), ({"w": jnp.ones((8, 16))}, [None])):
        seen.clear()
        tx = ro.saveus()
        tx.update(tree, tx.init(tree), tree)
        assert seen == expected
