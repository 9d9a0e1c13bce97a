"""Counter-based inputs: arrays any language regenerates bit for bit from (seed, stream).

Format-2 vector files do not store large inputs; they name them (conformance/PORTING.md, "Generated
inputs"). Element ``j`` of stream ``s`` depends on nothing but ``(seed, s, j)``, so a reader can
make any slice of an array in any order, on a CPU or a GPU, and every value is exactly
representable in the vector's dtype, so no rounding step can differ between languages:

    mix(z)       = z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9;  z ^= z >> 27;  z *= 0x94D049BB133111EB;
                   z ^= z >> 31                                   (all arithmetic modulo 2**64)
    word(key, i) = mix(key + (i + 1) * 0x9E3779B97F4A7C15)         (SplitMix64's (i+1)-th output)
    key          = word(seed, stream)
    a_r          = word(key, 4*j + r) >> (64 - q)                  r = 0, 1, 2, 3;  q = p - 2
    x_j          = (a_0 + a_1 + a_2 + a_3 - c) * 2**(exponent - q)    c = 2**(q+1) if centred, else 0

``p`` is the dtype's number of significant bits (float64 53, float32 24, float16 11, bfloat16 8).
Centred, ``x_j`` is an Irwin-Hall(4) variable ("normal-ish": mean 0, standard deviation
``0.577 * 2**exponent``, support ``[-2**(exponent+1), 2**(exponent+1))``); not centred, the same
shifted to ``[0, 2**(exponent+2))`` (mean ``2**(exponent+1)``), for buffers that must not be
negative. Either way it lies on the grid ``2**(exponent - q)`` with an integer numerator of at
most ``p`` bits, so it is exact in the dtype (the exponent keeps it in the normal range).
"""
from __future__ import annotations

import numpy as np

from .encoding import np_dtype

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
#: Significant bits (with the implicit one) of each float dtype.
PRECISION = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
GENERATOR = "splitmix64-irwin-hall4"


def _u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64)


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping)."""
    z = _u64(z)
    with np.errstate(over="ignore"):  # wrapping is the algorithm
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def word(key, index) -> np.ndarray:
    """The (index+1)-th SplitMix64 output from state ``key``: ``mix(key + (index+1) * GAMMA)``."""
    with np.errstate(over="ignore"):
        return mix(_u64(key) + (_u64(index) + np.uint64(1)) * np.uint64(GAMMA))


def stream_key(seed: int, stream: int) -> np.uint64:
    return word(seed, stream)[()]


def values(seed: int, stream: int, count: int, dtype: str, exponent: int = 0, centred: bool = True,
           start: int = 0) -> np.ndarray:
    """Elements ``start .. start+count-1`` of a stream, as float64 values exact in ``dtype``."""
    q = PRECISION[dtype] - 2
    key = stream_key(seed, stream)
    j = np.arange(start, start + count, dtype=np.uint64)
    total = np.zeros(count, dtype=np.int64)
    for r in range(4):
        a = word(key, np.uint64(4) * j + np.uint64(r)) >> np.uint64(64 - q)
        total += a.astype(np.int64)  # q <= 51: four of them fit in int64
    if centred:
        total -= 1 << (q + 1)
    return np.ldexp(total.astype(np.float64), exponent - q)  # exact: |total| < 2**(q+2) <= 2**53


def array(seed: int, stream: int, shape, dtype: str, exponent: int = 0, centred: bool = True) -> np.ndarray:
    """A generated tensor in ``dtype`` (C order: element j is the j-th of the stream)."""
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    x = values(seed, stream, n, dtype, exponent, centred).astype(np_dtype(dtype))
    return x.reshape(tuple(shape))


def parse_seed(text) -> int:
    """A seed as written in a vector file: 16 hex digits (a JSON number cannot hold 64 bits)."""
    if not isinstance(text, str) or len(text) != 16 or text.strip("0123456789abcdef"):
        raise ValueError(f"seed must be 16 lowercase hex digits, got {text!r}")
    return int(text, 16)


def format_seed(seed: int) -> str:
    return f"{seed & (2**64 - 1):016x}"
