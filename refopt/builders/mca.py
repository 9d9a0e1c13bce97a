"""Monte Carlo arithmetic (MCA) for error budgets: the core run on a randomised array namespace.

``MCANamespace`` is an array-API namespace whose arrays hold float64 NumPy values but carry a
*virtual* dtype (float64, float32, float16, bfloat16, int, bool). After every floating operation
the result is rounded to the virtual dtype's precision **at random**:

* float32/float16/bfloat16: stochastic rounding to one of the two neighbouring representable
  values, with probability proportional to proximity (unbiased; error below one ulp), including
  the format's subnormals and overflow to infinity;
* float64 (no wider type to round from): the round-to-nearest result is moved one ulp up or down
  with probability 1/4 each (the size of the difference a fused multiply-add, another libm or
  another evaluation order makes);
* reductions (sum, mean, std) add their terms in a random order, sequentially or pairwise, with
  the above rounding after every addition;
* float32 values in a float64 run are rounded to nearest, deterministically: they are the
  quirk scalars of D11/D12, whose float32 semantics are specified (quirk Q5), not noise.

Every sample runs the SAME core code (refopt.SAVEUS/DOPE) on this namespace; the samples live in
one hidden leading axis, so N samples cost about one run. The spread of the samples around the
high-precision golden is the per-element error budget (spec/tolerance.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_FORMATS = {  # name -> (explicit mantissa bits, min normal exponent, max finite)
    "float32": (23, -126, float(np.finfo(np.float32).max)),
    "float16": (10, -14, float(np.finfo(np.float16).max)),
    "bfloat16": (7, -126, 3.3895313892515355e38),
}
_FLOAT_RANK = {"bfloat16": 1, "float16": 1, "float32": 2, "float64": 3}
#: Reductions over more terms than this draw their sequential rounding errors in one pass
#: (``MCANamespace._sequential_long``) instead of a Python loop over the terms.
LONG_REDUCTION = 4096
#: Arrays of more values than this (all samples together) are rounded on their bit patterns
#: (``_stochastic_bits``, ``_jitter_bits``): the same distributions, drawn from raw random words.
#: Smaller ones (every vector of format 1) keep the arithmetic form, so their budgets do not move.
BIT_ROUNDING_SIZE = 1 << 16


@dataclass(frozen=True)
class MDtype:
    name: str

    def __repr__(self) -> str:
        return f"mca.{self.name}"

    @property
    def floating(self) -> bool:
        return self.name in _FLOAT_RANK


BOOL, INT32, INT64 = MDtype("bool"), MDtype("int32"), MDtype("int64")
FLOAT16, BFLOAT16, FLOAT32, FLOAT64 = (MDtype(n) for n in ("float16", "bfloat16", "float32", "float64"))


def _promote(a: MDtype, b: MDtype) -> MDtype:
    if a == b:
        return a
    if a.floating and b.floating:
        ra, rb = _FLOAT_RANK[a.name], _FLOAT_RANK[b.name]
        if ra == rb:  # float16 with bfloat16
            return FLOAT32
        return a if ra > rb else b
    if a.floating or b.floating:
        return a if a.floating else b
    if BOOL in (a, b):
        return b if a == BOOL else a
    return INT64


class MArray:
    """An array of N samples (hidden axis 0) with a virtual dtype."""

    __slots__ = ("v", "dtype", "_ns", "const")

    def __init__(self, ns, v, dtype: MDtype, const: bool = False):
        # const: made from a Python number (a literal or hyperparameter), the same in every
        # sample; converting it rounds to nearest, as every port converts its constants.
        self._ns, self.v, self.dtype, self.const = ns, v, dtype, const

    def __array_namespace__(self, api_version=None):
        return self._ns

    shape = property(lambda self: tuple(self.v.shape[1:]))
    ndim = property(lambda self: self.v.ndim - 1)
    size = property(lambda self: math.prod(self.v.shape[1:]))
    device = property(lambda self: "cpu")

    def __repr__(self) -> str:
        return f"MArray({self.dtype.name}{list(self.shape)}, {self.v.shape[0]} samples)"

    def _bin(self, other, op, reverse=False):
        return self._ns._binary(other, self, op) if reverse else self._ns._binary(self, other, op)

    __add__ = lambda s, o: s._bin(o, np.add)
    __radd__ = lambda s, o: s._bin(o, np.add, True)
    __sub__ = lambda s, o: s._bin(o, np.subtract)
    __rsub__ = lambda s, o: s._bin(o, np.subtract, True)
    __mul__ = lambda s, o: s._bin(o, np.multiply)
    __rmul__ = lambda s, o: s._bin(o, np.multiply, True)
    __truediv__ = lambda s, o: s._bin(o, np.divide)
    __rtruediv__ = lambda s, o: s._bin(o, np.divide, True)
    __pow__ = lambda s, o: s._bin(o, np.power)
    __rpow__ = lambda s, o: s._bin(o, np.power, True)
    __gt__ = lambda s, o: s._ns._compare(s, o, np.greater)
    __ge__ = lambda s, o: s._ns._compare(s, o, np.greater_equal)
    __lt__ = lambda s, o: s._ns._compare(s, o, np.less)
    __le__ = lambda s, o: s._ns._compare(s, o, np.less_equal)
    __and__ = lambda s, o: s._ns._compare(s, o, np.logical_and)
    __or__ = lambda s, o: s._ns._compare(s, o, np.logical_or)

    def __neg__(self):
        return MArray(self._ns, -self.v, self.dtype)

    def __invert__(self):
        return MArray(self._ns, ~self.v, self.dtype)

    def __bool__(self):
        raise TypeError("MCA arrays hold many samples; a step must not branch on array values")

    __float__ = __int__ = __index__ = __bool__


class MCANamespace:
    """The array-API subset refopt's core uses, randomised as the module docstring says."""

    __name__ = "refopt.builders.mca"
    nan, inf, pi, e = math.nan, math.inf, math.pi, math.e
    bool, int32, int64 = BOOL, INT32, INT64
    float16, bfloat16, float32, float64 = FLOAT16, BFLOAT16, FLOAT32, FLOAT64

    def __init__(self, target: str, samples: int, seed):
        self.target = MDtype(target)
        self.n = samples
        self.rng = np.random.Generator(np.random.PCG64(seed))

    # --- rounding -------------------------------------------------------------------------
    def _round(self, v: np.ndarray, dtype: MDtype) -> np.ndarray:
        if not dtype.floating:
            return v
        if dtype == FLOAT64:
            return self._jitter(v)
        if dtype == FLOAT32 and self.target == FLOAT64:
            return v.astype(np.float32).astype(np.float64)  # Q5 scalars: specified float32 RN
        return self._stochastic(v, *_FORMATS[dtype.name])

    def _jitter(self, v):
        if v.size > BIT_ROUNDING_SIZE:
            return self._jitter_bits(v)
        r = self.rng.integers(0, 4, size=v.shape)  # 0, 1: stay; 2: up; 3: down
        up, down = np.nextafter(v, np.inf), np.nextafter(v, -np.inf)
        out = np.where(r == 2, up, np.where(r == 3, down, v))
        return np.where((v == 0) | ~np.isfinite(v), v, out)

    def _jitter_bits(self, v):
        """``_jitter`` on the bit patterns: +-1 on the magnitude's bits is one ulp away from zero
        or towards it (what ``nextafter`` gives), with probability 1/4 each."""
        v = np.ascontiguousarray(v, dtype=np.float64)
        r = self.rng.bit_generator.random_raw(v.size).reshape(v.shape) & np.uint64(3)
        step = (r == 2).astype(np.int64) - (r == 3)
        moved = (v.view(np.int64) + step).view(np.float64)
        return np.where((v == 0) | ~np.isfinite(v), v, moved)

    def _stochastic(self, v, nmant, minexp, fmax):
        if v.size > BIT_ROUNDING_SIZE:
            return self._stochastic_bits(v, nmant, minexp, fmax)
        return self._stochastic_arithmetic(v, nmant, minexp, fmax)

    def _stochastic_bits(self, v, nmant, minexp, fmax):
        """``_stochastic`` on the bit patterns, for large arrays: adding a uniform random integer
        below the format's last mantissa bit to the magnitude's float64 bits and clearing those bits
        rounds away from zero with probability equal to the distance from the value below, which
        is stochastic rounding. Values in the format's subnormal range (whose quantum is fixed)
        go through ``_stochastic``'s arithmetic."""
        v = np.ascontiguousarray(v, dtype=np.float64)
        drop = np.uint64(52 - nmant)
        bits = self.rng.bit_generator.random_raw(v.size).reshape(v.shape)
        bits >>= np.uint64(64) - drop
        bits += v.view(np.uint64)  # an infinity or NaN keeps its exponent bits, and stays one
        bits &= ~((np.uint64(1) << drop) - np.uint64(1))
        out = bits.view(np.float64)
        magnitude = bits & np.uint64(0x7FFFFFFFFFFFFFFF)  # |out|'s bits, ordered as |out| is
        over = magnitude > np.float64(fmax).view(np.uint64)
        over &= magnitude < np.float64(np.inf).view(np.uint64)  # not NaN or already infinite
        if over.any():
            out[over] = np.copysign(np.inf, out[over])
        magnitude = v.view(np.uint64) & np.uint64(0x7FFFFFFFFFFFFFFF)
        magnitude -= np.uint64(1)  # zero wraps to the largest word: not tiny
        tiny = magnitude < np.float64(2.0**minexp).view(np.uint64) - np.uint64(1)
        if tiny.any():
            out[tiny] = self._stochastic_arithmetic(v[tiny], nmant, minexp, fmax)
        return out

    def _stochastic_arithmetic(self, v, nmant, minexp, fmax):
        with np.errstate(invalid="ignore", over="ignore"):
            finite = np.isfinite(v)
            a = np.where(finite, v, 0.0)
            _, e = np.frexp(a)
            quantum = np.ldexp(1.0, np.maximum(e - 1, minexp) - nmant)
            s = a / quantum
            lo = np.floor(s)
            r = self.rng.random(size=v.shape)
            out = (lo + (r < (s - lo))) * quantum
            out = np.where(np.abs(out) > fmax, np.copysign(np.inf, out), out)
            return np.where(finite, out, v)

    # --- construction ---------------------------------------------------------------------
    def _wrap(self, x, dtype=None) -> MArray:
        if isinstance(x, MArray):
            return x if dtype is None or dtype == x.dtype else self.astype(x, dtype)
        if dtype is None:
            dtype = BOOL if isinstance(x, bool) else INT64 if isinstance(x, int) else FLOAT64
        v = np.asarray(x, dtype=bool if dtype == BOOL else np.int64 if not dtype.floating else np.float64)
        v = np.broadcast_to(v, (self.n, *v.shape)).copy()
        return MArray(self, self._round_exact(v, dtype), dtype, const=True)

    def _round_exact(self, v, dtype):
        """Literal constants are rounded to nearest (a port writes the same literal)."""
        if dtype in (FLOAT32, FLOAT16, BFLOAT16):
            from ..conformance.encoding import np_dtype

            return v.astype(np_dtype(dtype.name)).astype(np.float64)
        return v

    def from_numpy(self, x: np.ndarray, dtype: str) -> MArray:
        """The N-sample array of one exact input (values must be exact in ``dtype``)."""
        v = np.asarray(x, dtype=np.float64)
        return MArray(self, np.broadcast_to(v, (self.n, *v.shape)).copy(), MDtype(dtype))

    def asarray(self, x, dtype=None, device=None, copy=None):
        return self._wrap(x, dtype)

    def full(self, shape, fill_value, dtype=None, device=None):
        if tuple(shape) != ():
            raise NotImplementedError("the core only asks for 0-d constants")
        return self._wrap(fill_value, dtype)

    def zeros_like(self, x, dtype=None, device=None):
        return MArray(self, np.zeros_like(x.v, dtype=x.v.dtype), dtype or x.dtype)

    def ones_like(self, x, dtype=None, device=None):
        return MArray(self, np.ones_like(x.v), dtype or x.dtype)

    def astype(self, x, dtype, copy=True, device=None):
        x = self._wrap(x)
        if dtype == x.dtype:
            return x
        if dtype == BOOL:
            return MArray(self, x.v != 0, dtype)
        if not dtype.floating:
            return MArray(self, x.v.astype(np.int64), dtype)
        v = x.v.astype(np.float64)
        if x.const:
            return MArray(self, self._round_exact(v, dtype), dtype, const=True)
        return MArray(self, self._round(v, dtype) if x.dtype.floating else v, dtype)

    def isdtype(self, dtype, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        for k in kinds:
            if isinstance(k, MDtype) and k == dtype:
                return True
            if k == "real floating" and dtype.floating:
                return True
            if k in ("integral", "signed integer") and dtype in (INT32, INT64):
                return True
            if k == "bool" and dtype == BOOL:
                return True
        return False

    # --- elementwise ----------------------------------------------------------------------
    def _align(self, a: MArray, b: MArray):
        nd = max(a.ndim, b.ndim)
        va = a.v.reshape(a.v.shape[0], *(1,) * (nd - a.ndim), *a.shape)
        vb = b.v.reshape(b.v.shape[0], *(1,) * (nd - b.ndim), *b.shape)
        return va, vb

    def _operands(self, a, b):
        if not isinstance(a, MArray):
            a = self._scalar_like(a, b)
        if not isinstance(b, MArray):
            b = self._scalar_like(b, a)
        return a, b

    def _scalar_like(self, x, arr: MArray) -> MArray:
        # Python scalars take the array's dtype (array-API rule), ints with floats become floats.
        dtype = arr.dtype if (arr.dtype.floating or isinstance(x, (bool, int))) else FLOAT64
        v = np.full((self.n,), float(x) if dtype.floating else x,
                    dtype=np.float64 if dtype.floating else np.int64)
        return MArray(self, v, dtype)

    def _binary(self, a, b, op):
        a, b = self._operands(a, b)
        dtype = _promote(a.dtype, b.dtype)
        va, vb = self._align(a, b)
        with np.errstate(all="ignore"):
            v = op(np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)) if dtype.floating \
                else op(va, vb)
        return MArray(self, self._round(v, dtype), dtype)

    def _compare(self, a, b, op):
        a, b = self._operands(a, b)
        va, vb = self._align(a, b)
        return MArray(self, op(va, vb), BOOL)

    def _unary(self, x, fn):
        with np.errstate(all="ignore"):
            return MArray(self, self._round(fn(x.v), x.dtype), x.dtype)

    sqrt, expm1, exp, log, log1p = (
        (lambda op: lambda self, x: self._unary(x, op))(op) for op in (np.sqrt, np.expm1, np.exp, np.log, np.log1p))
    pow, add, subtract, multiply, divide = (
        (lambda op: lambda self, a, b: self._binary(a, b, op))(op)
        for op in (np.power, np.add, np.subtract, np.multiply, np.divide))
    minimum, maximum = ((lambda op: lambda self, a, b: self._select(a, b, op))(op) for op in (np.minimum, np.maximum))

    def abs(self, x):
        return MArray(self, np.abs(x.v), x.dtype)

    def isfinite(self, x):
        return MArray(self, np.isfinite(x.v), BOOL)

    def isnan(self, x):
        return MArray(self, np.isnan(x.v), BOOL)

    def isinf(self, x):
        return MArray(self, np.isinf(x.v), BOOL)

    def negative(self, x):
        return -x

    def square(self, x):
        return self._binary(x, x, np.multiply)

    def full_like(self, x, fill_value, dtype=None, device=None):
        c = self._wrap(fill_value, dtype or x.dtype)
        return MArray(self, np.broadcast_to(c.v.reshape(-1, *(1,) * x.ndim), x.v.shape).copy(), c.dtype, const=True)

    def any(self, x, axis=None, keepdims=False):
        return MArray(self, np.any(x.v.reshape(x.v.shape[0], -1), axis=1), BOOL)

    def _select(self, a, b, op):
        a, b = self._operands(a, b)
        va, vb = self._align(a, b)
        return MArray(self, op(va, vb), _promote(a.dtype, b.dtype))

    def where(self, cond, a, b):
        a, b = self._operands(a, b)
        nd = max(cond.ndim, a.ndim, b.ndim)
        vc, va, vb = (x.v.reshape(x.v.shape[0], *(1,) * (nd - x.ndim), *x.shape) for x in (cond, a, b))
        return MArray(self, np.where(vc, va, vb), _promote(a.dtype, b.dtype))

    def all(self, x, axis=None, keepdims=False):
        return MArray(self, np.all(x.v.reshape(x.v.shape[0], -1), axis=1), BOOL)

    # --- reductions -----------------------------------------------------------------------
    def _axes(self, x, axis):
        if axis is None:
            return tuple(range(x.ndim))
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return tuple(sorted(a % x.ndim for a in axes)) if x.ndim else ()

    def _sum(self, x: MArray, axis, keepdims):
        """Returns (sum as float64 samples [N, kept...], count of terms, output shape)."""
        axes = self._axes(x, axis)
        keep = [d for d in range(x.ndim) if d not in axes]
        n = math.prod(x.shape[d] for d in axes)
        v = np.transpose(x.v, (0, *(d + 1 for d in keep), *(d + 1 for d in axes)))
        v = v.reshape(*v.shape[: 1 + len(keep)], n)
        out_shape = tuple(1 if d in axes else x.shape[d] for d in range(x.ndim)) if keepdims else \
            tuple(x.shape[d] for d in keep)
        if not x.dtype.floating:
            return v.sum(axis=-1), n, out_shape
        # random order per sample and element, then sequential or pairwise accumulation
        if n > LONG_REDUCTION:
            v = self.rng.permuted(v, axis=-1)
            seq = self._sequential_long(v, x.dtype)
        else:
            order = np.argsort(self.rng.random(size=v.shape), axis=-1)
            v = np.take_along_axis(v, order, axis=-1)
            seq = v[..., 0] if n else np.zeros(v.shape[:-1])
            for i in range(1, n):
                with np.errstate(all="ignore"):
                    seq = self._round(seq + v[..., i], x.dtype)
        tree = v
        while tree.shape[-1] > 1:
            m = tree.shape[-1]
            with np.errstate(all="ignore"):
                pairs = self._round(tree[..., 0:m - 1:2] + tree[..., 1:m:2], x.dtype)
            tree = np.concatenate([pairs, tree[..., m - 1:]], axis=-1) if m % 2 else pairs
        tree = tree[..., 0] if n else seq
        pick = self.rng.random(size=(x.v.shape[0],) + (1,) * (seq.ndim - 1)) < 0.5
        return np.where(pick, seq, tree), n, out_shape

    def _sequential_long(self, v, dtype):
        """A sequential sum of a long reduction, each addition rounded as ``_round`` does, without
        a Python loop over the terms: the partial sums are the exact prefix sums (float64
        ``cumsum``) and each addition's rounding error is drawn at its partial sum, independently.
        For a 16/32-bit format the float64 prefix sums are exact to far below the format's ulp;
        the drift of the rounded partial sum from the exact one (a random walk of a few ulps of the
        sum) moves where each error is drawn, not its distribution. For float64, ``cumsum`` is the
        round-to-nearest sequential sum itself and the draws are ``_jitter``'s one-ulp moves."""
        with np.errstate(all="ignore"):
            partial = np.cumsum(v, axis=-1)
            total = partial[..., -1]
            partial = partial[..., 1:]  # the first term is not an addition
            if dtype == FLOAT64:
                r = self.rng.integers(0, 4, size=partial.shape)
                moves = (r == 2).astype(np.float64) - (r == 3)
                out = total + np.sum(moves * np.spacing(np.abs(partial)), axis=-1)
            elif dtype == FLOAT32 and self.target == FLOAT64:  # deterministic float32 (Q5)
                return np.cumsum(v.astype(np.float32), axis=-1)[..., -1].astype(np.float64)
            else:
                nmant, minexp, fmax = _FORMATS[dtype.name]
                _, e = np.frexp(partial)
                quantum = np.ldexp(1.0, np.maximum(e - 1, minexp) - nmant)
                scaled = partial / quantum
                below = scaled - np.floor(scaled)  # where the exact partial sum sits in its gap
                up = self.rng.random(size=partial.shape) < below
                out = total + np.sum(quantum * (up - below), axis=-1)
                out = self._stochastic(out, nmant, minexp, fmax)
                # a partial sum beyond the format's range overflows, and stays infinite
                over = np.abs(partial) > fmax
                first = np.argmax(over, axis=-1)[..., None]
                signed = np.copysign(np.inf, np.take_along_axis(partial, first, axis=-1)[..., 0])
                out = np.where(over.any(axis=-1), signed, out)
        return np.where(np.isfinite(total), out, total)

    def sum(self, x, axis=None, keepdims=False, dtype=None):
        s, _, shape = self._sum(x, axis, keepdims)
        return MArray(self, s.reshape(s.shape[0], *shape), x.dtype if x.dtype.floating else INT64)

    def mean(self, x, axis=None, keepdims=False):
        s, n, shape = self._sum(x, axis, keepdims)
        with np.errstate(all="ignore"):
            m = self._round(s / n if n else np.full_like(s, np.nan), x.dtype)
        return MArray(self, m.reshape(m.shape[0], *shape), x.dtype)

    def std(self, x, axis=None, correction=0, keepdims=False):
        """Two-pass: mean, squared deviations, random-order sum, / (n - correction), sqrt."""
        m = self.mean(x, axis=axis, keepdims=True)
        d = x - m
        ss, n, shape = self._sum(d * d, axis, keepdims)
        with np.errstate(all="ignore"):
            var = self._round(ss / (n - correction) if n - correction > 0 else ss * np.nan, x.dtype)
            s = self._round(np.sqrt(var), x.dtype)
        return MArray(self, s.reshape(s.shape[0], *shape), x.dtype)


def run(optimizer, param0: np.ndarray, grads, *, dtype: str, state0: dict | None = None,
        samples: int = 32, seed=0):
    """N-sample MCA trajectory: a list, per step, of (param [N, *shape], {state name: [N, *shape]})."""
    ns = MCANamespace(dtype, samples, seed)
    p = ns.from_numpy(param0, dtype)
    state = optimizer.init(p)
    if state0 is not None:
        fields = {k: (ns.from_numpy(v, dtype) if k != "step" else ns.asarray(int(v)))
                  for k, v in state0.items()}
        state = type(state)(**fields)
    out = []
    for g in grads:
        p, state = optimizer.step(p, ns.from_numpy(g, dtype), state)
        out.append((p.v.copy(), {k: getattr(state, k).v.copy() for k in state._fields if k != "step"}))
    return out


def budget(samples: np.ndarray, golden: np.ndarray) -> np.ndarray:
    """Per-element budget: the largest deviation of any sample from the golden (spec/tolerance.md).

    Where the golden is not finite the budget is 0 (non-finite values are judged exactly); where
    a sample is non-finite but the golden is finite the budget is +inf (an unstable element, which
    the generator refuses to write)."""
    g = np.asarray(golden, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        dev = np.abs(samples - g[None])
        dev = np.where(np.isfinite(samples), dev, np.inf)
        b = dev.max(axis=0) if samples.shape[0] else np.zeros_like(g)
    return np.where(np.isfinite(g), b, 0.0)
