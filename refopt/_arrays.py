"""Array-API plumbing: namespaces, dtypes and devices (spec clauses A3, A4).

Everything here is decided from dtypes, shapes and devices only, never from array values, so a
step traced by ``jax.jit`` or captured by ``torch.compile`` sees no data-dependent Python.
"""
from __future__ import annotations

import math
from functools import lru_cache

import array_api_compat as aac

from .registry import LOW_PRECISION


def namespace(*arrays):
    """The array namespace of ``arrays`` (TypeError when they come from different libraries)."""
    return aac.array_namespace(*arrays)


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', ... for numpy, torch, jax, cupy and array-api-strict dtypes."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    return name.rsplit(".", 1)[-1].strip("'>")


def is_low_precision(dtype) -> bool:
    return dtype_name(dtype) in LOW_PRECISION


def is_real_floating(xp, dtype) -> bool:
    """True for float16/bfloat16/float32/float64 (bfloat16 through ml_dtypes on NumPy too)."""
    if is_low_precision(dtype):
        return True
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:
        return False


def device_of(x):
    return aac.device(x)


def work_dtype(xp, dtype):
    """A3: 16-bit tensors are computed op by op in float32 and rounded back (as PyTorch does)."""
    return xp.float32 if is_low_precision(dtype) else dtype


@lru_cache(maxsize=None)
def _has_float64(xp, device) -> bool:
    # Probed once per (namespace, device), on that device. With ``full``, not ``asarray``: on CUDA
    # an asarray of a Python number is a host-to-device copy, which raises under
    # torch.cuda.set_sync_debug_mode("error"); that answer was cached, and float64 scalars
    # silently became float32 for the rest of the process.
    try:
        return xp.full((), 0.0, dtype=xp.float64, device=device).dtype == xp.float64
    except Exception:  # e.g. torch on MPS, or JAX without x64
        return False


def scalar_dtype(xp, device):
    """A4: step-dependent scalars are float64 (Python floats in the reference) where available."""
    if aac.is_jax_namespace(xp):  # checked first, so other users never import jax
        import jax

        if not jax.config.read("jax_enable_x64"):
            return xp.float32
    try:
        return xp.float64 if _has_float64(xp, device) else xp.float32
    except TypeError:  # an unhashable device object: probe without the cache
        return xp.float64 if _has_float64.__wrapped__(xp, device) else xp.float32
