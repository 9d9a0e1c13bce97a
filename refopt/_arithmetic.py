"""A3 and A4 as code: the rounded operations every clause is written with.

The reference computes in place on tensors of the parameter's dtype D, one PyTorch operation at a
time. For float32 and float64 each operation is simply an operation in D. For float16 and
bfloat16, PyTorch computes each operation in float32 (the work dtype W) and rounds the result back
to D, once per operation; the spec writes that rounding as R(.) (common.md, A3.2).

``Arithmetic`` holds the dtypes of one tensor and offers one method per PyTorch operation the
reference uses (``mul``, ``add`` with ``alpha``, ``addcmul``, ``lerp``, ...). Each method is one
R(.) of the spec: it evaluates the operation in W, with each elementary step rounded to W, and
then rounds to D. A clause is therefore one statement per R(.), and "compute in float32, round to
D" lives here and nowhere else. Scalars enter as A3.3 says: a factor or divisor as a number (the
array library rounds it to W), an added constant or an ``alpha`` rounded to D first
(``in_storage``), a step-dependent scalar computed in the scalar dtype S and rounded to W where it
is applied (``in_work``).

Nothing here looks at array values: the choices depend on dtypes and devices only, so a step can
be traced by ``jax.jit`` or captured by ``torch.compile``.
"""
from __future__ import annotations

import math

from ._arrays import device_of, namespace, scalar_dtype, work_dtype


class Arithmetic:
    """The arithmetic of one parameter tensor: storage dtype D, work dtype W, scalar dtype S."""

    def __init__(self, param, xp=None):
        """``xp``: the namespace to compute in, when not ``param``'s own (refopt._sharded gives a
        namespace whose reductions are global over the shards of a DTensor)."""
        own = namespace(param)  # the dtypes are the array library's, whichever namespace computes
        self.xp = own if xp is None else xp
        self._global_size = getattr(self.xp, "global_size", None)
        self.storage = param.dtype
        self.work = work_dtype(own, param.dtype)
        self.rounds_to_storage = self.work != self.storage
        self.device = device_of(param)
        self.scalar = scalar_dtype(own, self.device)

    def size(self, x) -> int:
        """n, the number of elements of ``x`` as the spec counts them: those of the whole tensor,
        also when the step runs on one shard of it (the sharded namespace counts globally)."""
        return self._global_size(x) if self._global_size is not None else math.prod(x.shape)

    # ---- moving between D and W (A3.2) ------------------------------------------------------
    def widen(self, x):
        """``x`` (in D) exactly in W."""
        return self.xp.astype(x, self.work) if self.rounds_to_storage else x

    def round(self, x):
        """R(x): round a W value to D and widen it back; the identity when D is W."""
        if not self.rounds_to_storage:
            return x
        return self.xp.astype(self.xp.astype(x, self.storage), self.work)

    def store(self, x):
        """A result (exact in D, A3.2) as an array of dtype D."""
        return self.xp.asarray(self.xp.astype(x, self.storage) if self.rounds_to_storage else x)

    # ---- scalars (A3.3, A4) -----------------------------------------------------------------
    def constant(self, value: float, dtype):
        """A 0-d constant made on the device (``full``, not ``asarray``: on CUDA an asarray of a
        Python number is a blocking host-to-device copy inside the step)."""
        return self.xp.full((), value, dtype=dtype, device=self.device)

    def in_work(self, s):
        """<s>_W: a scalar computed in S, rounded to W where it is applied."""
        return self.xp.astype(s, self.work)

    def in_storage(self, c):
        """<c>_D: an added constant or an ``add`` alpha. PyTorch converts it to a 16-bit tensor's
        own dtype first, through float32 (a binary64 number becomes a float, then a bfloat16 or
        half), so it is rounded to W, then to D, then widened exactly to W (A3.3)."""
        if not self.rounds_to_storage:
            return c
        xp = self.xp
        c = self.constant(c, self.work) if isinstance(c, (int, float)) else xp.astype(c, self.work)
        return xp.astype(xp.astype(c, self.storage), self.work)

    def step_count(self, step):
        """t = step + 1 (S0, D0), as a 0-d array of the scalar dtype."""
        return self.xp.astype(step + 1, self.scalar)

    def one_minus_pow(self, b: float, t):
        """``1 - b**t`` (S3, D5). In float64 exactly the reference's expression; without float64
        (JAX without x64) the cancellation-free ``-expm1(t * log(b))`` (A4)."""
        xp = self.xp
        if b == 0.0:
            return xp.ones_like(t)
        if self.scalar == xp.float64:
            return 1.0 - b**t
        return -xp.expm1(t * math.log1p(-(1.0 - b)))

    # ---- rounded tensor operations: each is one R(.) of the spec -------------------------------
    def mul(self, x, y):
        """``torch.mul``: R(x * y); ``y`` a tensor, a number (rounded to W) or an <s>_W."""
        return self.round(x * y)

    def div(self, x, y):
        """``torch.div``: R(x / y)."""
        return self.round(x / y)

    def reciprocal(self, x):
        """``number / tensor`` as PyTorch evaluates it, a reciprocal first: R(1 / x)."""
        return self.round(1.0 / x)

    def sub(self, x, y):
        """``torch.sub``: R(x - y)."""
        return self.round(x - y)

    def add(self, x, y, alpha=None):
        """``torch.add(x, y, alpha=alpha)``: R(x + <alpha>_D * y), or R(x + y)."""
        if alpha is None:
            return self.round(x + y)
        return self.round(x + self.in_storage(alpha) * y)

    def add_constant(self, x, c):
        """``x.add(c)`` for a number or scalar ``c``: R(x + <c>_D)."""
        return self.round(x + self.in_storage(c))

    def addcmul(self, x, y, z, value):
        """``torch.addcmul(x, y, z, value=value)``: R(x + value * y * z)."""
        return self.round(x + value * y * z)

    def subcdiv(self, x, y, z, value):
        """``x.addcdiv(y, z, value=-value)``: R(x - <value>_W * (y / z)); ``value`` in S."""
        return self.round(x - self.in_work(value) * (y / z))

    def lerp(self, x, y, weight):
        """``torch.lerp(x, y, weight)``: R(x + weight * (y - x))."""
        return self.round(x + weight * (y - x))

    def sqrt(self, x):
        """``torch.sqrt``: R(sqrt(x))."""
        return self.round(self.xp.sqrt(x))

    def clamp(self, x, low, high):
        """``torch.clamp``: R(min(max(x, low), high)) (the bounds are W values)."""
        return self.round(self.xp.minimum(self.xp.maximum(x, low), high))

    def norm(self, x):
        """``torch.linalg.vector_norm``: R(sqrt(sum of x*x)), the sum in W without rescaling."""
        return self.round(self.xp.sqrt(self.xp.sum(x * x)))
