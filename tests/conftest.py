"""Session-wide test setup: JAX in float64 mode, and the ``xp`` backend fixture.

``xp`` is parametrised over every array library refopt claims to support, in the manner of
scipy's and array-api-extra's ``xp`` fixtures. A backend whose library is not installed (or needs a
GPU that is not there) is skipped with a reason, never failed. Each parameter is a ``Backend``:
``b.asarray(numpy_array, dtype_name)`` moves test data in, ``b.to_numpy(x)`` brings results back,
``b.step(opt, p, g, s)`` runs one step (under ``jax.jit`` for the ``jax_jit`` backend).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from refopt.conformance import backends, encoding

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
    pytest.importorskip("ml_dtypes", reason="bfloat16 on NumPy needs ml_dtypes")
    return encoding.np_dtype(name)


class Backend:
    """A library backend (refopt.conformance.backends.Backend) with the test suite's helpers:
    dtypes a library lacks are skipped, and JAX is run on a menu of shapes."""

    def __init__(self, lib: backends.Backend, name: str, on_enter=lambda: None, on_exit=lambda: None):
        self.lib, self.name, self.on_enter, self.on_exit = lib, name, on_enter, on_exit
        self.xp, self.dtypes, self.jit, self.device = lib.xp, lib.dtypes, lib.jit, lib.device

    def asarray(self, a, dtype: str = "float64"):
        """A backend array holding ``a`` (a NumPy array, rounded to ``dtype`` once)."""
        if dtype not in self.dtypes:
            pytest.skip(f"{self.name} has no {dtype}")
        return self.lib.to(np.asarray(np.asarray(a, dtype=np.float64).astype(np_dtype(dtype))))

    def to_numpy(self, x) -> np.ndarray:
        """A NumPy copy (bfloat16 stays bfloat16 through ml_dtypes)."""
        return self.lib.back(x)

    def dtype(self, name: str):
        return getattr(self.xp, name)

    def pick(self, shapes, dtype: str = "float64") -> list:
        """The subset of ``shapes`` this backend is run on: JAX compiles per shape and dtype
        (about 1-3 s each on 2 cores), so it gets the shapes in ``JAX_MENU``; others get all."""
        if not self.name.startswith("jax"):
            return list(shapes)
        return [s for s in shapes if tuple(s) in JAX_MENU.get(dtype, ())]

    def step(self, opt, p, g, s):
        return self.lib.step(opt, p, g, s)

    def state_to_numpy(self, state) -> dict:
        return {k: self.to_numpy(v) for k, v in state.items()}

    def __repr__(self) -> str:
        return self.name


# --- per-library constructors (imports happen only when the backend is requested) --------------

def _strict(device_name: str | None) -> Backend:
    xps = pytest.importorskip("array_api_strict")

    def enter():
        # the strictest flags this version knows: newest standard, no data-dependent output
        # shapes, no boolean indexing, no extensions (refopt must need none of them)
        from array_api_strict import _flags

        newest = max(getattr(_flags, "supported_versions", (xps.__array_api_version__,)))
        xps.set_array_api_strict_flags(api_version=newest, boolean_indexing=False,
                                       data_dependent_shapes=False, enabled_extensions=())

    name = "array_api_strict" + (f"[{device_name}]" if device_name else "")
    return Backend(backends.strict_backend(device_name), name, enter, xps.reset_array_api_strict_flags)


def _torch(device: str) -> Backend:
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch: no CUDA device")
    return Backend(backends.torch_backend(device), f"torch_{device}")


def _jax(jit: bool) -> Backend:
    pytest.importorskip("jax")
    return Backend(backends.jax_backend(jit), "jax_jit" if jit else "jax")


def _cupy() -> Backend:
    pytest.importorskip("cupy")
    try:
        return Backend(backends.cupy_backend(), "cupy")
    except Exception:
        pytest.skip("cupy: no GPU")


BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": lambda: Backend(backends.numpy_backend(False), "numpy"),
    "numpy_readonly": lambda: Backend(backends.numpy_backend(True), "numpy_readonly"),
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
