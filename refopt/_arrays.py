"""Array-API plumbing shared by both optimizers (spec clauses A1-A4).

Everything here is decided from dtypes, shapes and devices only, never from array values, so a
step traced by ``jax.jit`` or captured by ``torch.compile`` sees no data-dependent Python.
"""
from __future__ import annotations

import math
from functools import lru_cache

import array_api_compat as aac

LOW_PRECISION = ("float16", "bfloat16")


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


def work_dtype(xp, dtype):
    """A3: 16-bit tensors are computed op by op in float32 and rounded back (as PyTorch does)."""
    return xp.float32 if is_low_precision(dtype) else dtype


@lru_cache(maxsize=None)
def _has_float64(xp, device) -> bool:
    try:  # probed once per (namespace, device), on that device, outside any hot path
        return xp.asarray(0.0, dtype=xp.float64, device=device).dtype == xp.float64
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


class Arith:
    """Per-step arithmetic context: storage dtype D, work dtype W, scalar dtype, device.

    ``rd`` rounds an intermediate to D and back to W (A3). For float32/float64 it is the
    identity; for float16/bfloat16 it reproduces PyTorch's "compute in float32, store in D".
    """

    def __init__(self, param):
        xp = namespace(param)
        self.xp = xp
        self.dtype = param.dtype
        self.device = aac.device(param)
        self.work = work_dtype(xp, param.dtype)
        self.low = self.work != self.dtype
        self.sdtype = scalar_dtype(xp, self.device)

    def rd(self, x):
        if not self.low:
            return x
        return self.xp.astype(self.xp.astype(x, self.dtype), self.work)

    def to_work(self, x):
        return self.xp.astype(x, self.work) if self.low else x

    def to_storage(self, x):
        return self.xp.asarray(self.xp.astype(x, self.dtype) if self.low else x)

    def const(self, value: float, dtype):
        """A 0-d constant made on the device (``full``, not ``asarray``: on CUDA an asarray of a
        Python number is a blocking host-to-device copy inside the step)."""
        return self.xp.full((), value, dtype=dtype, device=self.device)

    def dscalar(self, x):
        """A3.3: an added constant or an ``add`` alpha. For a 16-bit tensor PyTorch converts it
        to the tensor's own dtype first (a factor stays float32), so round to D, then widen."""
        if not self.low:
            return x
        xp = self.xp
        x = self.const(x, self.sdtype) if isinstance(x, (int, float)) else xp.astype(x, self.sdtype)
        return xp.astype(xp.astype(x, self.dtype), self.work)

    def scalar(self, x):
        """A4: a scalar computed in the scalar dtype, rounded to W where it is applied."""
        return self.xp.astype(x, self.work)

    def step_count(self, step):
        """S0/D0: the 1-based step count t, as a 0-d array of the scalar dtype."""
        return self.xp.astype(step + 1, self.sdtype)

    def one_minus_pow(self, b: float, t):
        """``1 - b**t`` (S3, D5). In float64 exactly the reference's expression; without float64
        (JAX without x64) a cancellation-free form, since ``1 - b**t`` in float32 loses ~4 digits."""
        xp = self.xp
        if b == 0.0:
            return xp.ones_like(t)
        if self.sdtype == xp.float64:
            return 1.0 - b**t
        return -xp.expm1(t * math.log1p(-(1.0 - b)))


def trailing_mean(xp, x, torch_empty_axis_mean: bool):
    """A1: mean over axes 1..ndim-1, keepdims. With no trailing axes PyTorch reduces over ALL
    axes (quirk ``torch_empty_axis_mean``); the array API's ``axis=()`` reduces over none."""
    if x.ndim > 1:
        return xp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    if torch_empty_axis_mean:
        return xp.mean(x, axis=None, keepdims=True) if x.ndim else xp.mean(x)
    return x


def self_lerp(xp, x):
    """Q1: the reference interpolates a tensor with itself; ``x - x`` is NaN where x is infinite."""
    nan = xp.full((), math.nan, dtype=x.dtype, device=aac.device(x))  # made on the device, no copy
    return xp.where(xp.isinf(x), nan, x)


def normalizer_std(xp, x, channels: bool):
    """A2: the std that S2/D2 divide by, or None when the clause does not act (static on shape).

    Channel-wise over axes 1.. when ``ndim > 1 and channels``; else global when numel > 2.
    Correction 1, so a one-element channel gives NaN (as the reference does)."""
    if x.ndim > 1 and channels:
        return xp.std(x, axis=tuple(range(1, x.ndim)), correction=1, keepdims=True)
    if math.prod(x.shape) > 2:
        return xp.std(x, correction=1)
    return None
