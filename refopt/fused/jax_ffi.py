"""The fused kernels under ``jax.jit``: an XLA FFI custom call (refopt.optax, CPU).

The kernel of refopt.fused is wrapped in an XLA FFI handler (plain C against
``xla/ffi/api/c_api.h``, which jaxlib ships) and called with ``jax.ffi.ffi_call``, its outputs
aliased with the parameter and state inputs: with donated buffers XLA lets it update them in
place, as refopt.torch's path does. The step's run-time values travel as arguments, so one compiled
kernel serves every step: the hyperparameters given as Python numbers as float64 bit patterns
(exact without ``jax_enable_x64`` too: the A4 scalars are float64, as the reference's), the step
count as the state holds it (int32 or int64), a traced learning rate (a schedule) in the dtype JAX
computed it in (float32 without x64).
"""
from __future__ import annotations

import ctypes
import os
import threading

from . import kernel_for, values_of
from .build import load
from .c_source import FFI_FIXED_ARGS, ffi_source

_TARGETS: dict = {}
_LOCK = threading.Lock()


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def target_for(optimizer, ndim: int, dtype: str, rows: int, cols: int, updates: bool = False):
    """(FFI target name, Kernel) for ``optimizer`` on such a leaf; registers the target once."""
    import jax

    kernel = kernel_for(optimizer, ndim, dtype, rows, cols, updates)
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


def step(optimizer, param, grad, state, runtime: dict | None = None, updates: bool = False,
         threads: int | None = None):
    """``optimizer.step`` on one leaf through the fused kernel (inside ``jax.jit``). ``runtime``:
    hyperparameter values for this step that may be traced (a scheduled learning rate), which
    take the place of the optimizer's own. ``updates``: return optax's ``new - param`` instead of
    the new parameter, written over the gradient's buffer; the parameter is only read, so XLA
    keeps no copy of it for the subtraction and ``optax.apply_updates`` is the only pass left.
    (Where the gradient is an input of the jitted function that is not donated, XLA copies it.)
    ``threads``: the kernel's threads (None: every CPU this process may use)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    shape = param.shape
    rows = shape[0] if len(shape) >= 2 else 1
    cols = (param.size // rows) if rows else 0
    name, kernel = target_for(optimizer, len(shape), str(param.dtype), rows, cols, updates)
    static = values_of(optimizer, 0, rows, cols)
    runtime = runtime or {}
    traced = {p: runtime[p] for p in kernel.params if p in runtime and not isinstance(runtime[p], (float, int))}
    # Python numbers travel as float64 bit patterns: exact, with or without jax_enable_x64.
    values = np.array([float(static[p]) for p in kernel.params] + [float(threads or _threads())], np.float64)
    value_dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    dynamic = jnp.stack([jnp.asarray(v, value_dtype) for v in traced.values()]) if traced else jnp.zeros((0,), value_dtype)
    slots = np.array([kernel.params.index(p) for p in traced], np.int32)
    buffers = list(state[1:])
    outs = [jax.ShapeDtypeStruct(shape, param.dtype)] * (1 + len(buffers))
    first = FFI_FIXED_ARGS
    aliases = {first + 1 if updates else first: 0, **{first + 2 + i: 1 + i for i in range(len(buffers))}}
    result = jax.ffi.ffi_call(name, outs, input_output_aliases=aliases)(
        values.view(np.uint32), state.step, dynamic, slots, param, grad, *buffers)
    return result[0], optimizer.State(state.step + 1, *result[1:])


def usable() -> bool:
    """The CPU backend on one device."""
    import jax

    return jax.default_backend() == "cpu" and jax.device_count() == 1
