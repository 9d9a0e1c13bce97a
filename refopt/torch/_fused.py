"""refopt.torch's fused path: each CPU parameter stepped by one compiled kernel (refopt.fused),
in place, without temporaries of the parameter's size; CUDA parameters by refopt.fused's Triton
kernels of the same schedule (_triton.py).

The kernel is the core's own step (the clause functions of refopt.common/saveus/dope, traced and
compiled to C), so per element it computes what the core computes; it reads the gradient and
writes the parameter and its state. A parameter takes this path when it is a plain CPU tensor,
contiguous like its gradient and state, and the optimizer's configuration can be traced (a
``clip_lambda`` that is arithmetic on its argument; the default is); otherwise, or without a C
compiler, the eager kernels of _kernels.py step it.
"""
from __future__ import annotations

import warnings

import torch

from .. import fused
from . import _triton

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
          torch.float64: "float64"}
#: Below this many elements a kernel runs on one thread (waking threads costs more than it saves).
MIN_THREADED = 1 << 15
#: Rows longer than this (elements) with row buffers go to the eager path: the per-thread
#: buffers hold a row each and must stay far below the parameter's size.
MAX_BUFFERED_ROW = 1 << 20
PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses (a DTensor, a tensor subclass of the user's)
_UNAVAILABLE: list = []  # the reason, once the compiler was found missing


def available() -> bool:
    if _UNAVAILABLE:
        return False
    try:
        if fused.available():
            return True
        _UNAVAILABLE.append("no working C compiler")
    except Exception as exc:  # noqa: BLE001 - any failure to build means: use the eager path
        _UNAVAILABLE.append(str(exc))
    return False


def as_rows(p) -> tuple:
    """(ndim, rows, cols): how a kernel sees ``p``, as rows (its leading axis; A1/A2 reduce each
    row) of cols elements."""
    ndim = p.dim()
    rows = p.shape[0] if ndim >= 2 else 1
    return ndim, rows, p.numel() // rows


def takes(p, grad, state, buffers) -> bool:
    """Whether parameter ``p`` can be stepped by a kernel (decided from metadata only)."""
    dtype = p.dtype
    if dtype not in DTYPES:
        return False
    for t in (p, grad, *[state[k] for k in buffers]):
        if type(t) not in PLAIN or t.dtype != dtype or not t.is_contiguous():
            return False
    return True


def candidates(params, grads, states, buffers, rest: list):
    """(index, param, grad, state, ndim, rows, cols) of each parameter a kernel can take; the
    indices of the others are appended to ``rest``."""
    for i, (p, grad, st) in enumerate(zip(params, grads, states)):
        if takes(p, grad, st, buffers):
            yield (i, p, grad, st, *as_rows(p))
        else:
            rest.append(i)


def unavailable_reason(device) -> str | None:
    """Why parameters on ``device`` cannot take the fused path here, or None."""
    if _triton.takes_device(device):
        return _triton.unavailable_reason()
    if device.type != "cpu":
        return f"no fused kernels for {device.type} parameters (CPU: C, CUDA: Triton)"
    return None if available() else _UNAVAILABLE[0]


def check_required(param_groups) -> None:
    """fused=True: RuntimeError unless every parameter's device has a fused path here."""
    for device in {p.device for group in param_groups for p in group["params"]}:
        reason = unavailable_reason(device)
        if reason:
            raise RuntimeError(f"refopt.torch: fused=True, but parameters on {device} cannot be fused here ({reason})")


def step(core, params, grads, states, buffers, t: int, lr, threads: int, required: bool) -> list:
    """Step every parameter a kernel can take; returns the indices of the others. The parameters
    share a device; ``lr`` is a float, or (CUDA) a 0-d float64 tensor on that device."""
    device = params[0].device
    reason = unavailable_reason(device)
    if reason:
        if required:
            raise RuntimeError(f"refopt.torch: fused=True, but parameters on {device} cannot be fused here ({reason})")
        return list(range(len(params)))
    if _triton.takes_device(device):
        return _triton.step(core, params, grads, states, buffers, t, lr, required)
    rest, kernels, batches = [], {}, {}
    for i, p, grad, st, ndim, rows, cols in candidates(params, grads, states, buffers, rest):
        key = (min(ndim, 2), p.dtype, rows, cols)
        if key not in kernels:  # one lookup per shape and step
            kernels[key] = _kernel(core, ndim, p.dtype, rows, cols, required)
        kernel = kernels[key]
        if kernel is None:
            rest.append(i)
            continue
        arrays = {"param": p, "grad": grad, **{k: st[k] for k in buffers}}
        pointers = tuple(arrays[name].data_ptr() for name in kernel.inputs)
        batches.setdefault(kernel, []).append((rows, cols, threads if rows * cols >= MIN_THREADED else 1, pointers))
    # rows and cols are each tensor's own (the kernel takes them apart from the values)
    values = dict(fused.values_of(core, t - 1, 0, 0), lr=lr)
    for kernel, tensors in batches.items():
        kernel.many(tensors, values)
    return rest


def _kernel(core, ndim, dtype, rows, cols, required):
    """The C kernel for parameters of this shape and dtype, or None when they go to the eager
    path (RuntimeError instead when ``required``)."""
    try:
        kernel = fused.kernel_for(core, ndim, DTYPES[dtype], rows, cols)
    except (fused.TraceError, fused.CompilerUnavailable) as exc:
        if required:
            raise RuntimeError(f"refopt.torch: fused=True, but this configuration cannot be fused: {exc}") from exc
        return None
    if kernel.row_buffers and cols > MAX_BUFFERED_ROW:
        return None
    return kernel


def unavailable_warning():
    warnings.warn(f"refopt.torch: the fused CPU path is unavailable ({_UNAVAILABLE[0]}); stepping with the "
                  "eager kernels, which are slower", RuntimeWarning, stacklevel=3)
