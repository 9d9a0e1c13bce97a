"""Exact, language-neutral encoding of arrays in the vector files.

A tensor is ``{"dtype": "float32", "shape": [3, 5], "b64": "..."}``: the raw little-endian bytes
of the values in C order, base64-encoded. bfloat16 is the upper half of a float32, 2 bytes.
Nothing is ever written as decimal text, so the files are bit-identical on every machine and a
C++/Rust reader needs only a base64 decoder.
"""
from __future__ import annotations

import base64
import binascii
import math

import ml_dtypes
import numpy as np

#: dtype name -> little-endian numpy dtype.
DTYPES = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def np_dtype(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def dtype_name(dtype) -> str:
    dt = np.dtype(dtype)
    if dt == DTYPES["bfloat16"]:
        return "bfloat16"
    name = {("f", 8): "float64", ("f", 4): "float32", ("f", 2): "float16", ("i", 8): "int64"}.get((dt.kind, dt.itemsize))
    if name is None:
        raise ValueError(f"dtype {dt} cannot be stored in a vector file")
    return name


def encode(x: np.ndarray, dtype: str | None = None) -> dict:
    """The JSON form of ``x`` (cast to ``dtype`` first when given; the cast must be exact)."""
    x = np.asarray(x)
    name = dtype or dtype_name(x.dtype)
    y = x.astype(np_dtype(name), order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if name in FLOAT_DTYPES and x.dtype != y.dtype:
        same = (y.astype(np.float64) == x.astype(np.float64)) | (np.isnan(x) & np.isnan(y.astype(np.float64)))
        if not bool(np.all(same)):
            raise ValueError(f"encode: values are not exact in {name}")
    return {"dtype": name, "shape": list(y.shape), "b64": base64.b64encode(y.tobytes()).decode("ascii")}


def decode(obj, where: str = "tensor") -> np.ndarray:
    """The array from its JSON form; ValueError naming ``where`` when it is malformed."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "b64"}:
        raise ValueError(f"{where}: expected an object with keys dtype, shape, b64")
    if not isinstance(obj["dtype"], str):
        raise ValueError(f"{where}: dtype must be a string")
    dt = np_dtype(obj["dtype"])
    if not isinstance(obj["shape"], list):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {obj['shape']!r}")
    shape = tuple(obj["shape"])
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{where}: shape must be non-negative integers, got {obj['shape']!r}")
    try:
        raw = base64.b64decode(obj["b64"], validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"{where}: bad base64 ({exc})") from None
    n = math.prod(shape)
    if len(raw) != n * dt.itemsize:
        raise ValueError(f"{where}: {len(raw)} bytes for shape {list(shape)} of {obj['dtype']} "
                         f"(expected {n * dt.itemsize})")
    return np.frombuffer(raw, dtype=dt).reshape(shape)
