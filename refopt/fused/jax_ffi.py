"""The fused kernels under ``jax.jit``: an XLA FFI custom call (refopt.optax, CPU).

The kernel of refopt.fused is wrapped in an XLA FFI handler (plain C against
``xla/ffi/api/c_api.h``, which jaxlib ships) and called with ``jax.ffi.ffi_call``, its outputs
aliased with the parameter and state inputs: with donated buffers XLA lets it update them in
place, as refopt.torch's path does. The step's run-time values (step count, hyperparameters, a
scheduled learning rate) travel as one float64 vector, so one compiled kernel serves every step.
"""
from __future__ import annotations

import ctypes
import os
import threading

from . import kernel_for, values_of
from .build import load
from .c_source import ffi_source

_TARGETS: dict = {}
_LOCK = threading.Lock()


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def target_for(optimizer, ndim: int, dtype: str, rows: int, cols: int):
    """(FFI target name, Kernel) for ``optimizer`` on such a leaf; registers the target once."""
    import jax

    kernel = kernel_for(optimizer, ndim, dtype, rows, cols)
    with _LOCK:
        name = _TARGETS.get(id(kernel))
        if name is None:
            source = kernel.program_source + ffi_source(kernel.program)
            lib = load(source, f"{optimizer.facts.key}-{dtype}-ffi", include=jax.ffi.include_dir())
            handler = getattr(lib, f"{kernel.program.name}_ffi")
            name = f"{kernel.program.name}_{len(_TARGETS)}"
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
            _TARGETS[id(kernel)] = name
            kernel.ffi_library = lib  # keep it loaded while the kernel lives
    return name, kernel


def step(optimizer, param, grad, state, runtime: dict | None = None):
    """``optimizer.step`` on one leaf through the fused kernel (inside ``jax.jit``). ``runtime``:
    hyperparameter values for this step that may be traced (a scheduled learning rate), which
    take the place of the optimizer's own."""
    import jax
    import jax.numpy as jnp

    shape = param.shape
    rows = shape[0] if len(shape) >= 2 else 1
    cols = (param.size // rows) if rows else 0
    name, kernel = target_for(optimizer, len(shape), str(param.dtype), rows, cols)
    static = values_of(optimizer, 0, rows, cols)
    runtime = runtime or {}
    entries = []
    for p in kernel.params:
        if p == "step":
            entries.append(jnp.asarray(state.step, jnp.float64))
        elif p in runtime and not isinstance(runtime[p], (float, int)):  # a traced lr (schedule)
            entries.append(jnp.asarray(runtime[p], jnp.float64))
        else:
            entries.append(jnp.asarray(float(static[p]), jnp.float64))
    entries.append(jnp.asarray(float(_threads()), jnp.float64))
    params = jnp.stack(entries)
    buffers = list(state[1:])
    outs = [jax.ShapeDtypeStruct(shape, param.dtype)] * (1 + len(buffers))
    aliases = {1: 0, **{3 + i: 1 + i for i in range(len(buffers))}}
    result = jax.ffi.ffi_call(name, outs, input_output_aliases=aliases)(params, param, grad, *buffers)
    return result[0], optimizer.State(state.step + 1, *result[1:])


def usable() -> bool:
    """float64 scalars (jax_enable_x64) and the CPU backend on one device."""
    import jax

    return jax.config.read("jax_enable_x64") and jax.default_backend() == "cpu" and jax.device_count() == 1
