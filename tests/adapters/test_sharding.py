"""refopt.optax on parameters sharded over a jax.sharding.Mesh of 8 simulated CPU devices.

XLA_FLAGS must be set before JAX initialises, so the work runs in a fresh interpreter: this file
run as a script (``python tests/adapters/test_sharding.py``) prints a JSON report, and the pytest
test below starts it and checks the report. Nothing here imports JAX in the pytest process.
"""
import json
import os
import subprocess
import sys

import pytest

STEPS = 3
# name: (shape, PartitionSpec axes). Channel reductions (axes 1..) cross the 'b' shards, the
# global ones (1-d std, D3 norm, D12 mask count) cross all 8.
LEAVES = {
    "dense": ((16, 12), ("a", "b")),
    "conv": ((8, 4, 6), (None, "a", "b")),
    "bias": ((64,), (("a", "b"),)),
    "scalar": ((), ()),
    "empty": ((0, 8), (None, "a")),
}


def worker():
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import refopt
    import refopt.optax as ro

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    specs = {k: NamedSharding(mesh, P(*axes)) for k, (_, axes) in LEAVES.items()}
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) for k, (s, _) in LEAVES.items()}
    grads = [{k: rng.standard_normal(s) for k, (s, _) in LEAVES.items()} for _ in range(STEPS)]

    def rel(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))

    def run(tx, place):
        p = place(params)
        state = tx.init(p)
        update = jax.jit(tx.update)
        for g in grads:
            updates, state = update(place(g), state, p)
            p = jax.tree.map(jnp.add, p, updates)
        return p, state

    def sharded(tree):
        return {k: jax.device_put(v, specs[k]) for k, v in tree.items()}

    def single(tree):
        return {k: jax.device_put(v, jax.devices()[0]) for k, v in tree.items()}

    report = {}
    for name, factory, cls, hp in [("saveus", ro.saveus, refopt.SAVEUS, {"weight_decay": 0.1}),
                                   ("dope", ro.dope, refopt.DOPE, {"lr": 1e-2})]:
        p_sh, s_sh = run(factory(**hp), sharded)
        p_1, s_1 = run(factory(**hp), single)
        core = {k: np.asarray(v) for k, v in params.items()}  # NumPy core, leaf by leaf
        opt = cls(**hp)
        core_state = {k: opt.init(v) for k, v in core.items()}
        for g in grads:
            for k in core:
                core[k], core_state[k] = opt.step(core[k], g[k], core_state[k])
        report[name] = {
            "sharded_vs_unsharded": max(rel(p_sh[k], p_1[k]) for k in LEAVES),
            "state_sharded_vs_unsharded": max(rel(a, b) for a, b in zip(jax.tree.leaves(s_sh), jax.tree.leaves(s_1))),
            "sharded_vs_numpy_core": max(rel(p_sh[k], core[k]) for k in LEAVES),
            # Zero-size leaves hold no data; XLA hands them back replicated, so they are not checked.
            "param_sharding_kept": all(p_sh[k].sharding.is_equivalent_to(specs[k], len(LEAVES[k][0]))
                                       for k in LEAVES if k != "empty"),
            "state_sharding_kept": all(getattr(s_sh, f)[k].sharding.is_equivalent_to(specs[k], len(LEAVES[k][0]))
                                       for f in s_sh._fields[1:] for k in LEAVES if k != "empty"),
            "step": int(s_sh.step),
        }
        # Control: the same step with each device reducing only its own shard (shard_map) differs,
        # so the agreement above shows that the jitted reductions are global over each leaf.
        spec, nbuf = specs["dense"].spec, len(opt.State._fields) - 1

        def per_shard(p, g, step, *bufs):
            new, st = opt.step(p, g, opt.State(step, *bufs))
            return new, tuple(st)

        local = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, P()) + (spec,) * nbuf,
                                      out_specs=(spec, (P(),) + (spec,) * nbuf), check_vma=False))
        p, g = sharded(params)["dense"], sharded(grads[0])["dense"]
        bufs = [jax.device_put(x, specs["dense"]) for x in opt.init(np.asarray(params["dense"]))[1:]]
        step0 = jnp.asarray(0)
        local_p, _ = local(p, g, step0, *bufs)
        global_p, _ = jax.jit(lambda p, g, *s: opt.step(p, g, opt.State(*s)))(p, g, step0, *bufs)
        want, _ = opt.step(np.asarray(params["dense"]), grads[0]["dense"], opt.init(np.asarray(params["dense"])))
        if name == "dope":  # eager calls on sharded leaves (jitted inside): same numbers, one program
            tx = factory(**hp)
            p = sharded(params)
            state = tx.init(p)
            for g in grads:
                updates, state = tx.update(sharded(g), state, p)
                p = jax.tree.map(jnp.add, p, updates)
            report[name]["eager_vs_jit"] = max(rel(p[k], p_sh[k]) for k in LEAVES)
            report[name]["eager_compilations"] = tx.update.refopt_step._cache_size()
        report[name]["per_shard_reduction_vs_core"] = rel(local_p, want)
        report[name]["jit_global_reduction_vs_core"] = rel(global_p, want)
    print(json.dumps(report))


@pytest.mark.slow  # 8 simulated devices in a subprocess
def test_sharded_equals_unsharded_and_reductions_are_global():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        assert r["step"] == STEPS, name
        assert r["sharded_vs_unsharded"] <= 1e-12, (name, r)
        assert r["state_sharded_vs_unsharded"] <= 1e-12, (name, r)
        assert r["sharded_vs_numpy_core"] <= 1e-12, (name, r)
        assert r["param_sharding_kept"] and r["state_sharding_kept"], (name, r)
        assert r["jit_global_reduction_vs_core"] <= 1e-12, (name, r)
        if "eager_vs_jit" in r:  # <= 2: the zero-size leaf comes back replicated after step 1
            assert r["eager_vs_jit"] <= 1e-12 and r["eager_compilations"] <= 2, (name, r)
        assert r["per_shard_reduction_vs_core"] > 1e-3, (name, r)  # the control does differ


if __name__ == "__main__":
    worker()
