"""Session-wide test setup: JAX in float64 mode, and the ``xp`` backend fixture.

``xp`` is parametrised over every array library refopt claims to support, in the manner of
scipy's and array-api-extra's ``xp`` fixtures. A backend whose library is not installed (or needs a
GPU that is not there) is skipped with a reason, never failed. Each parameter is a ``Backend``:
``b.asarray(numpy_array, dtype_name)`` moves test data in, ``b.to_numpy(x)`` brings results back,
``b.step(opt, p, g, s)`` runs one step (under ``jax.jit`` for the ``jax_jit`` backend).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

try:  # the whole session computes float64 in JAX (refopt needs it for A4's float64 scalars)
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - JAX is optional
    jax = None

REPO = Path(__file__).resolve().parents[1]
#: Reference material shared by the project (semantics, trajectories); may be absent (CI).
SHARED = REPO.parent / "shared"

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Shapes JAX is tested on per dtype (chosen to coincide with the recorded trajectories, so the
#: compiled kernels are shared between tests and the suite stays fast).
JAX_MENU = {
    "float64": ((), (17,), (3, 5), (4, 6), (0, 3)),
    "float32": ((2, 2, 3, 3), (0, 3)),
    "float16": ((3, 5),),
    "bfloat16": ((3, 5),),
}


def np_dtype(name: str):
    """NumPy dtype for a dtype name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 on NumPy needs ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class Backend:
    """One array library (and device) under test."""

    name: str
    xp: Any
    dtypes: tuple[str, ...]
    _in: Callable[[np.ndarray, str], Any]
    _out: Callable[[Any], np.ndarray]
    jit: bool = False
    device: Any = None
    on_enter: Callable[[], None] = field(default=lambda: None)
    on_exit: Callable[[], None] = field(default=lambda: None)

    def asarray(self, a, dtype: str = "float64"):
        """A backend array holding ``a`` (a NumPy array, rounded to ``dtype`` once)."""
        if dtype not in self.dtypes:
            pytest.skip(f"{self.name} has no {dtype}")
        return self._in(np.asarray(np.asarray(a, dtype=np.float64).astype(np_dtype(dtype))), dtype)

    def to_numpy(self, x) -> np.ndarray:
        """A NumPy copy (bfloat16 stays bfloat16 through ml_dtypes)."""
        return self._out(x)

    def dtype(self, name: str):
        return getattr(self.xp, name)

    def pick(self, shapes, dtype: str = "float64") -> list:
        """The subset of ``shapes`` this backend is run on: JAX compiles per shape and dtype
        (about 1-3 s each on 2 cores), so it gets the shapes in ``JAX_MENU``; others get all."""
        if not self.name.startswith("jax"):
            return list(shapes)
        return [s for s in shapes if tuple(s) in JAX_MENU.get(dtype, ())]

    def step(self, opt, p, g, s):
        return _jitted(opt)(p, g, s) if self.jit else opt.step(p, g, s)

    def state_to_numpy(self, state) -> dict:
        return {k: self.to_numpy(v) for k, v in state.items()}

    def __repr__(self) -> str:
        return self.name


@functools.lru_cache(maxsize=None)
def _jitted(opt):
    return jax.jit(opt.step)


# --- per-library constructors (imports happen only when the backend is requested) --------------

def _numpy(readonly: bool) -> Backend:
    def into(a, dtype):
        a = np.array(a, copy=True)
        a.flags.writeable = not readonly
        return a

    return Backend("numpy_readonly" if readonly else "numpy", np, FLOAT_DTYPES, into,
                   lambda x: np.array(x, copy=True))


def _strict(device_name: str | None) -> Backend:
    xps = pytest.importorskip("array_api_strict")
    device = xps.Device(device_name) if device_name else None

    def enter():
        # the strictest flags this version knows: newest standard, no data-dependent output
        # shapes, no boolean indexing, no extensions (refopt must need none of them)
        from array_api_strict import _flags

        newest = max(getattr(_flags, "supported_versions", (xps.__array_api_version__,)))
        xps.set_array_api_strict_flags(api_version=newest, boolean_indexing=False,
                                       data_dependent_shapes=False, enabled_extensions=())

    def into(a, dtype):
        return xps.asarray(np.array(a, dtype=np.dtype(dtype)), dtype=getattr(xps, dtype), device=device)

    def out(x):
        return np.asarray(xps.asarray(x, device=xps.Device("CPU_DEVICE")) if device else x).copy()

    name = "array_api_strict" + (f"[{device_name}]" if device_name else "")
    return Backend(name, xps, ("float64", "float32"), into, out, device=device,
                   on_enter=enter, on_exit=xps.reset_array_api_strict_flags)


def _torch(device: str) -> Backend:
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device")
    from array_api_compat import torch as xpt

    def into(a, dtype):
        t = torch.from_numpy(np.array(a.astype(np.float32) if dtype == "bfloat16" else a))
        return t.to(device=device, dtype=getattr(torch, dtype))

    def out(x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.float().numpy().astype(np_dtype("bfloat16"))
        return x.numpy().copy()

    return Backend(f"torch_{device}", xpt, FLOAT_DTYPES, into, out, device=torch.device(device))


def _jax(jit: bool) -> Backend:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return Backend("jax_jit" if jit else "jax", jnp, FLOAT_DTYPES,
                   lambda a, dtype: jnp.asarray(a), lambda x: np.array(x, copy=True), jit=jit)


def _cupy() -> Backend:
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip("cupy: no GPU")
    return Backend("cupy", cp, ("float64", "float32", "float16"),
                   lambda a, dtype: cp.asarray(a), lambda x: cp.asnumpy(x))


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": lambda: _numpy(False),
    "numpy_readonly": lambda: _numpy(True),
    "array_api_strict": lambda: _strict(None),
    "array_api_strict[device1]": lambda: _strict("device1"),
    "torch_cpu": lambda: _torch("cpu"),
    "torch_cuda": lambda: _torch("cuda"),
    "jax": lambda: _jax(False),
    "jax_jit": lambda: _jax(True),
    "cupy": _cupy,
}


def available(name: str) -> bool:
    """Whether a backend's library can be imported (for tests that pick backends themselves)."""
    mod = {"array_api_strict": "array_api_strict", "torch": "torch", "jax": "jax", "cupy": "cupy"}
    key = next((m for k, m in mod.items() if name.startswith(k)), None)
    return key is None or importlib.util.find_spec(key) is not None


def make_backend(name: str) -> Backend:
    return BACKENDS[name]()


@pytest.fixture(params=list(BACKENDS))
def xp(request) -> Backend:
    """Every supported backend (skipped, with the reason, where its library is missing)."""
    b = make_backend(request.param)
    b.on_enter()
    yield b
    b.on_exit()


@pytest.fixture(scope="session")
def backend_factory():
    """``make_backend(name)``: for tests that choose backends themselves (skips when missing)."""
    return make_backend


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """<repo>/../shared (the reference material); tests using it skip when it is absent."""
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"shared reference material not found at {SHARED}")
    return SHARED
