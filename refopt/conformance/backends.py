"""refopt's own core on each installed array library: the targets a plain `refopt check` runs.

Each ``Backend`` moves NumPy arrays into its library and back and says how a step is run there
(eagerly, or under ``jax.jit``); ``CoreTarget`` runs the core on one backend, configured with each
vector's own profile and quirks.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import numpy as np

from .. import registry
from .encoding import np_dtype
from .targets import STATE_NAMES, Output, call_port


class Backend:
    """One array library (and device) that refopt's core runs on.

    ``to(a)`` moves a NumPy array (exact in its dtype; bfloat16 through ml_dtypes) into the
    library, ``back(x)`` brings a library array back as a NumPy copy in its own dtype, and
    ``compile(opt)`` is the step function to run (``opt.step``, or it under ``jax.jit``). The
    test suite's ``xp`` fixture is built from these same objects (tests/conftest.py)."""

    def __init__(self, name: str, dtypes: tuple, to: Callable, back: Callable, compile: Callable | None = None,
                 *, xp=None, device=None, jit: bool = False):
        self.name, self.dtypes, self.to, self.back = name, tuple(dtypes), to, back
        self.compile = compile or _eager
        self.xp, self.device, self.jit = xp, device, jit

    def step(self, opt, param, grad, state):
        return self.compile(opt)(param, grad, state)

    def __repr__(self) -> str:
        return self.name


def _eager(opt):
    return opt.step


def numpy_backend(readonly: bool = False):
    def to(a):
        a = np.array(a, copy=True)  # keeps 0-d arrays 0-d
        a.flags.writeable = not readonly
        return a

    return Backend("numpy_readonly" if readonly else "numpy", registry.DTYPES, to,
                   lambda x: np.array(x, copy=True), xp=np)


def strict_backend(device_name: str | None = None):
    import array_api_strict as xps

    device = xps.Device(device_name) if device_name else None

    def to(a):
        return xps.asarray(np.array(a), dtype=getattr(xps, a.dtype.name), device=device)

    def back(x):
        return np.asarray(xps.asarray(x, device=xps.Device("CPU_DEVICE")) if device else x).copy()

    name = "array-api-strict" + (f"[{device_name}]" if device_name else "")
    return Backend(name, ("float32", "float64"), to, back, xp=xps, device=device)


def torch_backend(device: str = "cpu"):
    import torch
    from array_api_compat import torch as xpt

    def to(a):
        if a.dtype == np_dtype("bfloat16"):  # NumPy has no bfloat16 to hand torch: widen exactly
            return torch.from_numpy(a.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
        return torch.from_numpy(np.array(a, order="C")).to(device)  # a copy; keeps 0-d arrays 0-d

    def back(x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.float().numpy().astype(np_dtype("bfloat16"))
        return x.numpy().copy()  # a port updates its tensors in place: keep this step's values

    return Backend(f"torch-{device}", registry.DTYPES, to, back, xp=xpt, device=torch.device(device))


def jax_backend(jit: bool = True):
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 vectors need x64 before jax is used
    import jax.numpy as jnp

    cache: dict = {}

    def compile_step(opt):
        # One jitted function per configuration; jax re-traces it per shape and dtype. Compiling
        # costs ~1 s a time on a small CPU, so equal configurations share it.
        try:
            return cache.setdefault(opt, jax.jit(opt.step)) if hash(opt) != id(opt) else jax.jit(opt.step)
        except TypeError:  # pragma: no cover - an unhashable optimizer
            return jax.jit(opt.step)

    return Backend("jax" if jit else "jax-eager", registry.DTYPES, jnp.asarray, lambda x: np.array(x, copy=True),
                   compile_step if jit else None, xp=jnp, jit=jit)


def _torch_cuda_backend():
    import torch

    if not torch.cuda.is_available():
        raise ImportError("CUDA is not available")
    return torch_backend("cuda")


def cupy_backend():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise ImportError("no GPU")
    dts = ("float16", "float32", "float64")  # CuPy has no bfloat16
    return Backend("cupy", dts, cupy.asarray, cupy.asnumpy, xp=cupy)


def available_backends() -> dict[str, Callable[[], Backend]]:
    """Name -> factory for every backend whose library is installed (and device present)."""
    out: dict[str, Callable[[], Backend]] = {"numpy": numpy_backend}
    if importlib.util.find_spec("array_api_strict"):
        out["array-api-strict"] = strict_backend
    if importlib.util.find_spec("torch"):
        out["torch-cpu"] = lambda: torch_backend("cpu")
        out["torch-cuda"] = _torch_cuda_backend
    if importlib.util.find_spec("jax"):
        out["jax"] = jax_backend
    if importlib.util.find_spec("cupy"):
        out["cupy"] = cupy_backend
    return out


def make_core_state(opt, vector, to):
    if vector.state0 is None:
        return None
    fields = {k: to(np.asarray(v)) for k, v in vector.state0.items() if k != "step"}
    return opt.State(step=to(np.asarray(int(vector.state0["step"]), dtype=np.int64)), **fields)


#: Backends whose every new configuration, shape and dtype costs a compilation (~1 s on a small
#: CPU): a plain `refopt check` runs them on a sample (SAMPLE_PER_GROUP vectors per optimizer x
#: dtype); naming them with --backend runs every vector.
COMPILED = ("jax",)
SAMPLE_PER_GROUP = 2


class CoreTarget:
    """refopt's reference core, run on one array backend with the vector's own profile/quirks."""

    kind = "core"
    optimizers = None  # every optimizer

    def __init__(self, backend: Backend, sample: bool = False):
        self.backend = backend
        self.sample = sample
        self.name = f"refopt[{backend.name}]" + (" (sample)" if sample else "")

    def selects(self, vector) -> bool:
        return True  # configured with each vector's own profile and quirks

    def skip_reason(self, vector) -> str | None:
        if vector.dtype not in self.backend.dtypes:
            return f"{self.backend.name} has no {vector.dtype}"
        return None

    def run(self, vector, make=None) -> list[Output]:
        b = self.backend
        opt = (make or vector.make_reference)()
        p = b.to(vector.param0)
        state = make_core_state(opt, vector, b.to)
        state = opt.init(p) if state is None else state
        step = b.compile(opt)
        out = []
        for s in vector.steps:
            p, state = call_port(self.name, step, p, b.to(s.grad), state)
            out.append(Output(b.back(p), {k: b.back(state[k]) for k in STATE_NAMES[vector.optimizer]},
                              int(b.back(state.step))))
        return out
