"""The implementations benchmarks/run.py times, grouped by array library.

Each builder takes (optimizer name, NumPy params, NumPy grads, device) and returns a ``Bench``:
``step()`` advances every tensor by one update, ``sync()`` waits for the device, ``scratch`` is
the bytes the implementation keeps between steps beyond its state (0 if none). Inputs are float32.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Bench(NamedTuple):
    step: Callable
    sync: Callable
    scratch: int = 0
    #: bytes of temporaries a compiled step plans (XLA's memory analysis), where known; the host
    #: RSS cannot see them reliably, since XLA keeps its buffers between calls
    temp: int | None = None


def _noop():
    return None


def _core(name):
    import refopt

    return getattr(refopt, name)()


def _core_loop(opt, ps, gs, sync):
    """The core's pure step applied tensor by tensor, as a user of refopt.SAVEUS/DOPE writes it."""
    ss = [opt.init(p) for p in ps]

    def step():
        for i in range(len(ps)):
            ps[i], ss[i] = opt.step(ps[i], gs[i], ss[i])

    return Bench(step, sync)


# ---- NumPy -----------------------------------------------------------------------------------
def core_numpy(name, params, grads, device):
    return _core_loop(_core(name), [p.copy() for p in params], list(grads), _noop)


# ---- torch -----------------------------------------------------------------------------------
def _torch_tensors(arrays, device):
    import torch

    # a copy: refopt.torch and AdamW write their parameters in place, and the next row needs fresh data
    return [torch.from_numpy(a).to(device, copy=True) for a in arrays]


def _torch_sync(device):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else _noop


def core_torch(name, params, grads, device):
    return _core_loop(_core(name), _torch_tensors(params, device), _torch_tensors(grads, device),
                      _torch_sync(device))


def _torch_optim(factory, params, grads, device):
    import torch

    ps = [torch.nn.Parameter(t) for t in _torch_tensors(params, device)]
    for p, g in zip(ps, _torch_tensors(grads, device)):
        p.grad = g
    opt = factory(ps)
    opt.step()  # torch optimizers allocate state (and refopt.torch its scratch) on the first step
    scratch = opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0
    return Bench(opt.step, _torch_sync(device), scratch)


def refopt_torch(**options):
    def build(name, params, grads, device):
        import refopt.torch as rt

        return _torch_optim(lambda ps: getattr(rt, name)(ps, **options), params, grads, device)

    return build


def torch_adamw(**options):
    def build(name, params, grads, device):
        import torch

        return _torch_optim(lambda ps: torch.optim.AdamW(ps, **options), params, grads, device)

    return build


def torch_port(cls):
    """A torch.optim.Optimizer class of the user's (``--compare torch:MODULE:CLASS``), defaults."""
    def build(name, params, grads, device):
        return _torch_optim(cls, params, grads, device)

    return build


# ---- CuPy ------------------------------------------------------------------------------------
def core_cupy(name, params, grads, device):
    import cupy

    return _core_loop(_core(name), [cupy.asarray(p) for p in params], [cupy.asarray(g) for g in grads],
                      cupy.cuda.get_current_stream().synchronize)


# ---- JAX -------------------------------------------------------------------------------------
def _jax():
    import jax

    # JAX's default (no x64), as users run it: refopt.optax's fused kernel takes the hyperparameters
    # as float64 regardless (A4); the core under jit then computes its step scalars in float32.
    return jax


#: XLA compiles one copy of the step per tensor, ~0.3-0.7 s each on a small CPU: a 1000-tensor
#: tree takes many minutes to compile once, so JAX rows skip workloads above this many tensors.
JAX_MAX_TENSORS = 150


def _within(tensors: int, limit: int, what: str) -> None:
    """RuntimeError (the row is skipped) when XLA would compile one ``what`` per tensor for too many."""
    if tensors > limit:
        raise RuntimeError(f"{tensors} tensors > {limit}: compile time (one {what} per tensor)")


def _jax_loop(update, params, grads, state_of, limit=JAX_MAX_TENSORS):
    """Jitted ``(params, state) <- update(params, grads, state)`` with params and state donated."""
    _within(len(params), limit, "step copy")
    jax = _jax()
    import jax.numpy as jnp

    ps = [jnp.asarray(p) for p in params]
    gs = [jnp.asarray(g) for g in grads]
    box = {"p": ps, "s": state_of(ps)}
    fn = jax.jit(update, donate_argnums=(0, 2)).lower(box["p"], gs, box["s"]).compile()
    memory = fn.memory_analysis()

    def step():
        box["p"], box["s"] = fn(box["p"], gs, box["s"])

    return Bench(step, lambda: jax.block_until_ready(box["p"]),
                 temp=getattr(memory, "temp_size_in_bytes", None))


def core_jax_jit(name, params, grads, device):
    opt = _core(name)

    def update(ps, gs, ss):
        out = [opt.step(p, g, s) for p, g, s in zip(ps, gs, ss)]
        return [o[0] for o in out], [o[1] for o in out]

    return _jax_loop(update, params, grads, lambda ps: [opt.init(p) for p in ps])


def _optax_loop(tx, params, grads, limit=JAX_MAX_TENSORS):
    import optax

    def update(ps, gs, s):
        updates, s = tx.update(gs, s, ps)
        return optax.apply_updates(ps, updates), s

    return _jax_loop(update, params, grads, tx.init, limit)


def refopt_optax(name, params, grads, device):
    _jax()
    import refopt.optax as ro

    return _optax_loop(getattr(ro, name.lower())(), params, grads)


def optax_adamw(name, params, grads, device):
    _jax()
    import optax

    return _optax_loop(optax.adamw(1e-3), params, grads, limit=len(params))  # a small step: compiles fast


def jax_grad_copy(name, params, grads, device):
    """What XLA adds to a jitted step that is passed gradients it may not overwrite, where the
    step writes over them (refopt.optax's kernel writes the updates there): a copy of each into a
    freshly allocated buffer. Timed beside the optimizers, it is that cost in the same rounds."""
    jax = _jax()
    import jax.numpy as jnp

    _within(len(grads), JAX_MAX_TENSORS, "copy")
    gs = [jnp.asarray(g) for g in grads]
    fn = jax.jit(lambda gs: [jnp.copy(g) for g in gs])
    box = {"out": fn(gs)}

    def step():
        box["out"] = fn(gs)

    return Bench(step, lambda: jax.block_until_ready(box["out"]))


def optax_port(factory):
    """An optax factory of the user's (``--compare optax:MODULE:FACTORY``), called with no arguments
    or with optax's learning_rate=1e-3."""
    def build(name, params, grads, device):
        _jax()
        try:
            tx = factory()
        except TypeError:
            tx = factory(1e-3)
        return _optax_loop(tx, params, grads)

    return build


#: library -> [(implementation, builder, optimizers it runs)]; the first AdamW row of a library
#: is the baseline its ratios are taken against (what a user would pick instead).
OPTS = ("SAVEUS", "DOPE")
IMPLS = {
    "torch": [
        ("torch AdamW fused=True", torch_adamw(fused=True), ("AdamW",)),
        ("torch AdamW foreach=True", torch_adamw(foreach=True), ("AdamW",)),
        ("refopt.torch (defaults)", refopt_torch(), OPTS),
        ("refopt.torch fused=False", refopt_torch(fused=False), OPTS),
        ("core torch", core_torch, OPTS),
    ],
    "jax": [
        ("optax adamw jit", optax_adamw, ("AdamW",)),
        ("refopt.optax jit", refopt_optax, OPTS),
        ("core jax jit", core_jax_jit, OPTS),
        ("jax grads copy (fresh buffers)", jax_grad_copy, ("copy",)),
    ],
    "numpy": [("core numpy", core_numpy, OPTS)],
    "cupy": [("core cupy", core_cupy, OPTS)],
}
#: The libraries run on each device.
LIBRARIES = {"cpu": ("torch", "jax", "numpy"), "cuda": ("torch", "cupy", "jax")}


def _transformer(d=256, layers=12):
    shapes = [(1000, d)]  # embedding
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    return shapes


WORKLOADS = {
    "big": [(4096, 4096)],
    "transformer": _transformer(),  # 121 tensors, ~9.7M elements
    "tiny": [((i % 7) + 1, (i % 5) + 2) if i % 3 else ((i % 11) + 1,) for i in range(1000)],
}
#: Tensor-sized passes a step must make at least: (reads + writes) of p, grad and state.
PASSES = {"DOPE": 11, "SAVEUS": 7, "AdamW": 7, "copy": 2}


def data(shapes, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    return params, grads
