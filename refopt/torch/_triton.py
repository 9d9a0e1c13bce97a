"""refopt.torch's fused path on CUDA: each parameter stepped by refopt.fused's Triton kernels (the
core's own step, traced, scheduled as for the CPU kernel and written as Triton; see
refopt/fused/triton_source.py), in place, without temporaries of the parameter's size and
without a host sync: the step's run-time values travel as one float64 vector copied from pinned
memory without blocking, and a learning rate that is a tensor on the device is copied into that
vector on the device.

A parameter takes this path when it is a plain contiguous CUDA tensor (like its gradient and
state) and triton can be imported (CUDA builds of torch ship it). ``ON_CPU`` (tests) sends CPU
parameters here as well, through Triton's interpreter (``TRITON_INTERPRET=1`` before triton is
imported), instead of the C kernels.
"""
from __future__ import annotations

import warnings

import torch

from .. import fused

#: Run the Triton kernels on CPU parameters too (Triton's interpreter; for the tests).
ON_CPU = False
_FAILED: set = set()  # kernels that did not compile here (fused=None then steps them eagerly)


def takes_device(device) -> bool:
    return device.type == "cuda" or (ON_CPU and device.type == "cpu")


def unavailable_reason() -> str | None:
    """Why the Triton path cannot run here, or None."""
    from ..fused import gpu

    try:
        gpu.triton_module()
    except gpu.TritonUnavailable as exc:
        return str(exc)
    return None


def step(core, params, grads, states, buffers, t: int, lr, required: bool) -> list:
    """Step every parameter the Triton kernels can take; returns the indices of the others.
    ``lr``: a float, or a 0-d float64 tensor on the parameters' device."""
    from ..fused import gpu

    from ._fused import DTYPES, candidates

    rest, vectors, kernels = [], {}, {}
    for i, p, grad, st, ndim, rows, cols in candidates(params, grads, states, buffers, rest):
        tensors = {"param": _flat(p), "grad": _flat(grad), **{k: _flat(st[k]) for k in buffers}}
        kernel = None
        try:
            shape_key = (min(ndim, 2), p.dtype, rows, cols)
            kernel = kernels.get(shape_key)
            if kernel is None:
                kernel = kernels[shape_key] = fused.kernel_for(core, ndim, DTYPES[p.dtype], rows, cols,
                                                               target="triton")
            if isinstance(lr, torch.Tensor) and "lr" in kernel.guarded_params:
                raise fused.TraceError("a switch depends on the learning rate, which is a tensor on the device")
            if id(kernel) in _FAILED:
                raise RuntimeError("this kernel did not compile earlier in this process")
            key = tuple(kernel.params)
            if key not in vectors:
                vectors[key] = _values(kernel.params, fused.values_of(core, t - 1, rows, cols), lr, p.device)
            kernel.compile(tensors, rows, cols, vectors[key])
        except (fused.TraceError, gpu.TritonUnavailable) as exc:
            if required:
                raise RuntimeError(f"refopt.torch: fused=True, but this configuration cannot be fused: {exc}") from exc
            rest.append(i)
            continue
        except Exception as exc:  # noqa: BLE001 - Triton failed to compile: eager kernels, unless required
            if required:
                raise RuntimeError(f"refopt.torch: fused=True, but the Triton kernels failed: {exc}") from exc
            if id(kernel) not in _FAILED:
                _FAILED.add(id(kernel))
                warnings.warn(f"refopt.torch: the Triton kernels failed to compile ({type(exc).__name__}: "
                              f"{exc}); stepping these parameters with the eager kernels", RuntimeWarning,
                              stacklevel=4)
            rest.append(i)
            continue
        kernel(tensors, rows, cols, vectors[key])
    return rest


def _flat(x):
    """The tensor as the kernels take it: contiguous, any shape (they index it flat); bfloat16
    viewed as int16 (the kernels round on the bits)."""
    x = x.detach()
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _values(names, values: dict, lr, device):
    """The kernels' run-time values on ``device`` (float64), without a host sync: copied from
    pinned memory without blocking, a tensor ``lr`` copied on the device. ``rows`` and ``cols``
    are kernel arguments (0 here), so one vector serves every parameter of a step."""
    device_lr = isinstance(lr, torch.Tensor)
    host = torch.tensor([0.0 if name in ("rows", "cols") or (name == "lr" and device_lr)
                         else float(lr if name == "lr" else values[name]) for name in names], dtype=torch.float64)
    if device.type == "cuda":
        vector = host.pin_memory().to(device, non_blocking=True)
    else:
        vector = host
    if device_lr and "lr" in names:
        i = names.index("lr")
        vector[i:i + 1].copy_(lr.reshape(1))
    return vector
