"""The fused path: the core's own step, traced and compiled into one C function per configuration.

``kernel_for(optimizer, ndim, dtype, rows, cols)`` returns a ``Kernel`` that updates a contiguous
parameter and its state in place, reading the gradient; the clause functions of refopt.common,
refopt.saveus and refopt.dope are its only source of arithmetic (symbolic.py traces them,
c_source.py schedules and writes C, build.py compiles and caches). Per element it computes what
the core computes, operation for operation (A3); reductions sum in another order (freedom 1), so
float32/float64 results agree with the core to the last bit except where a reduction's rounding
differs, and the golden vectors judge it like any port (tests/adapters).

Kernels depend on the optimizer's switches (quirks, flags, which hyperparameters act), the dtype
and whether the parameter has trailing axes; hyperparameter values, the step count and the size
are run-time arguments, so one kernel serves every step of a training run, whatever a scheduler
does to the learning rate.
"""
from __future__ import annotations

import ctypes
import threading

from .build import CompilerUnavailable, load
from .c_source import Program
from .symbolic import TraceError, guards_hold, trace

__all__ = ["Kernel", "kernel_for", "TraceError", "CompilerUnavailable", "available"]

_KERNELS: dict = {}
#: (target, updates, configuration with every hyperparameter's value, rows, cols) -> the kernel
#: kernel_for chose: its guards are evaluated once per such key, not once per tensor and step.
_CHOSEN: dict = {}
_LOCK = threading.Lock()


class Kernel:
    """One compiled step: ``kernel(pointers, rows, cols, values, threads)`` for one tensor,
    ``kernel.many(tensors, values)`` for several in one call."""

    def __init__(self, traced, program: Program, source: str, lib):
        self.program, self.program_source = program, source
        self.inputs = program.inputs
        self.params = program.params
        self.guards = traced.trace.guards
        self.sweeps = program.n_sweeps
        self.row_buffers = program.n_buffers
        self._many = getattr(lib, f"{program.name}_many")
        self._many.restype = ctypes.c_int
        self._many.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                               ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32),
                               ctypes.POINTER(ctypes.c_void_p)]

    def valid_for(self, values: dict) -> bool:
        return guards_hold(self.guards, values)

    def __call__(self, pointers: dict, rows: int, cols: int, values: dict, threads: int) -> None:
        self.many([(rows, cols, threads, tuple(pointers[name] for name in self.inputs))], values)

    def many(self, tensors: list, values: dict) -> None:
        """Step several tensors with the same run-time values in one call: ``tensors`` holds
        (rows, cols, threads, pointers), the pointers in ``self.inputs`` order. The per-tensor
        cost is a C call, not a Python one (a model has hundreds of small tensors)."""
        count = len(tensors)
        if not count:
            return
        args = (ctypes.c_double * max(len(self.params), 1))(*[float(values[p]) for p in self.params])
        rows = (ctypes.c_int64 * count)(*[t[0] for t in tensors])
        cols = (ctypes.c_int64 * count)(*[t[1] for t in tensors])
        threads = (ctypes.c_int32 * count)(*[t[2] for t in tensors])
        table = (ctypes.c_void_p * (count * len(self.inputs)))(*[ptr for t in tensors for ptr in t[3]])
        failed = self._many(args, count, rows, cols, threads, table)
        if failed:
            which = f" (tensor {failed - 1} of {count}; the ones after it were not stepped)" if count > 1 else ""
            raise MemoryError(f"the fused kernel could not allocate its per-row results{which}")


def values_of(optimizer, step: int, rows: int, cols: int) -> dict:
    """The run-time arguments of a kernel: hyperparameters (tuples flattened), step, size."""
    values = {"step": step, "rows": rows, "cols": cols}
    for name, value in optimizer.hparams.items():
        if isinstance(value, tuple):
            values.update({f"{name}{i}": v for i, v in enumerate(value)})
        elif isinstance(value, float):
            values[name] = value
    return values


def _config(optimizer, ndim: int, dtype: str):
    """What a kernel is specialised on (besides its guards)."""
    static = tuple((k, v if not callable(v) else id(v)) for k, v in optimizer.hparams.items()
                   if not isinstance(v, (float, tuple)))
    return (type(optimizer), optimizer.quirks, static, min(ndim, 2), dtype)


def kernel_for(optimizer, ndim: int, dtype: str, rows: int, cols: int, updates: bool = False, *,
               target: str = "c"):
    """The kernel for ``optimizer`` on a parameter of ``ndim`` dims (viewed as rows x cols) and
    dtype ``dtype``: a C ``Kernel`` (``target="c"``) or a ``gpu.TritonKernel`` (``"triton"``);
    traced and compiled on first use. Raises TraceError when the configuration cannot be fused
    (e.g. a ``clip_lambda`` that is not arithmetic on its argument), CompilerUnavailable without
    a C compiler, gpu.TritonUnavailable without triton. ``updates`` (C only): the kernel writes
    optax's updates (``new - param``) over the gradient and leaves the parameter as it is."""
    if target not in ("c", "triton"):
        raise ValueError(f"target must be 'c' or 'triton', got {target!r}")
    if updates and target != "c":
        raise ValueError("updates=True is a C kernel's mode (refopt.optax)")
    try:
        chosen_key = (target, updates, type(optimizer), optimizer.quirks, min(ndim, 2), dtype, rows, cols,
                      tuple((k, id(v) if callable(v) else v) for k, v in optimizer.hparams.items()))
        chosen = _CHOSEN.get(chosen_key)
    except TypeError:  # an unhashable hyperparameter value: choose afresh
        chosen_key = chosen = None
    if chosen is not None:
        return chosen
    _check_traceable(optimizer)
    values = values_of(optimizer, 1, rows, cols)
    key = (target, _config(optimizer, ndim, dtype), updates)
    with _LOCK:
        for kernel in _KERNELS.get(key, ()):
            if kernel.valid_for(values):
                if chosen_key is not None:
                    _CHOSEN[chosen_key] = kernel
                return kernel
    traced = trace(optimizer, min(ndim, 2), dtype, {"rows": rows, "cols": cols}, updates)
    if target == "triton":
        from . import gpu

        kernel = gpu.build(optimizer, traced, dtype)
    else:
        program = Program(traced, name=f"refopt_{optimizer.facts.key}_{'updates' if updates else 'step'}")
        source = program.source()
        kernel = Kernel(traced, program, source, load(source, f"{optimizer.facts.key}-{dtype}"))
    with _LOCK:
        _KERNELS.setdefault(key, []).append(kernel)
        if chosen_key is not None:
            _CHOSEN.setdefault(chosen_key, kernel)
    return kernel


def _check_traceable(optimizer) -> None:
    """A kernel calls nothing at run time: a callable hyperparameter is traced once, which is
    right only for the known pure ones (SAVEUS's default ``t**0.25`` and the vectors' powers)."""
    from ..conformance.vectors import PowerLambda
    from ..registry import clip_lambda_default

    h = optimizer.hparams
    clip = h.get("clip_lambda")
    if h.get("clip_gradients") and clip is not None and clip is not clip_lambda_default \
            and not isinstance(clip, PowerLambda):
        raise TraceError("a clip_lambda of your own is called at every step, which a compiled kernel cannot do")


def available() -> bool:
    """Whether kernels can be compiled here (a C compiler that builds a test kernel)."""
    try:
        load("int refopt_probe(void) { return 0; }\n", "probe")
        return True
    except CompilerUnavailable:
        return False
