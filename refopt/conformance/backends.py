"""refopt's own core on each installed array library: the targets a plain `refopt check` runs.

Each ``Backend`` moves NumPy arrays into its library and back and says how a step is run there
(eagerly, or under ``jax.jit``); ``CoreTarget`` runs the core on one backend, configured with each
vector's own profile and quirks.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple

import numpy as np

from .. import registry
from .encoding import np_dtype
from .targets import STATE_NAMES, Output, call_port


class Backend(NamedTuple):
    name: str
    dtypes: tuple
    to: Callable  # numpy array -> backend array
    back: Callable  # backend array -> numpy array of the given dtype
    compile: Callable  # optimizer -> its (possibly compiled) step function


def numpy_backend():
    return Backend("numpy", registry.DTYPES, lambda a: np.asarray(a), lambda x, dt: np.asarray(x), _eager)


def _eager(opt):
    return opt.step


def _strict_backend():
    import array_api_strict as xps

    return Backend("array-api-strict", ("float32", "float64"), xps.asarray,
                   lambda x, dt: np.asarray(x._array), _eager)


def torch_backend(device: str):
    import torch

    def to(a):
        if a.dtype == np_dtype("bfloat16"):  # NumPy has no bfloat16 to hand torch: widen exactly
            return torch.from_numpy(a.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
        return torch.from_numpy(np.array(a, order="C")).to(device)  # a copy; keeps 0-d arrays 0-d

    def back(x, dt):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.float().numpy().astype(dt)
        return x.numpy().copy()  # a port updates its tensors in place: keep this step's values

    return Backend(f"torch-{device}", registry.DTYPES, to, back, _eager)


def _jax_backend():
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 vectors need x64 before jax is used
    import jax.numpy as jnp

    cache: dict = {}

    def compile_step(opt):
        # One jitted function per configuration; jax re-traces it per shape and dtype. Compiling
        # costs ~1 s a time on a small CPU, so equal configurations share it.
        key = (type(opt), tuple(opt.hparams.items()), tuple(opt.quirks.as_dict().items()))
        try:
            return cache.setdefault(key, jax.jit(opt.step))
        except TypeError:  # an unhashable hyperparameter (a custom clip_lambda)
            return jax.jit(opt.step)

    return Backend("jax", registry.DTYPES, jnp.asarray, lambda x, dt: np.asarray(x), compile_step)


def _torch_cuda_backend():
    import torch

    if not torch.cuda.is_available():
        raise ImportError("CUDA is not available")
    return torch_backend("cuda")


def _cupy_backend():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise ImportError("no GPU")
    dts = ("float16", "float32", "float64")  # CuPy has no bfloat16
    return Backend("cupy", dts, cupy.asarray, lambda x, dt: cupy.asnumpy(x), _eager)


def available_backends() -> dict[str, Callable[[], Backend]]:
    """Name -> factory for every backend whose library is installed (and device present)."""
    out: dict[str, Callable[[], Backend]] = {"numpy": numpy_backend}
    if importlib.util.find_spec("array_api_strict"):
        out["array-api-strict"] = _strict_backend
    if importlib.util.find_spec("torch"):
        out["torch-cpu"] = lambda: torch_backend("cpu")
        out["torch-cuda"] = _torch_cuda_backend
    if importlib.util.find_spec("jax"):
        out["jax"] = _jax_backend
    if importlib.util.find_spec("cupy"):
        out["cupy"] = _cupy_backend
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
        dt = np_dtype(vector.dtype)
        out = []
        for s in vector.steps:
            p, state = call_port(self.name, step, p, b.to(s.grad), state)
            out.append(Output(b.back(p, dt), {k: b.back(state[k], dt) for k in STATE_NAMES[vector.optimizer]},
                              int(b.back(state.step, None))))
        return out
