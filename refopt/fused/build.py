"""Compiling the generated C and calling it (ctypes; no Python headers, no torch headers).

A kernel is compiled once per distinct source with the system C compiler and kept in a cache
directory (``$REFOPT_KERNEL_CACHE``, else ``~/.cache/refopt/kernels``), so later processes load it
in milliseconds. Flags: ``-O3 -march=native`` (the library is built on the machine that runs it),
``-ffp-contract=off`` (no fused multiply-add: every operation rounds as the core's), no
``-ffast-math`` (IEEE semantics: NaN, infinities, subnormals), ``-fno-math-errno`` (sqrt may be
vectorized; it still rounds correctly), ``-fopenmp`` (rows in parallel), and
``-fno-tree-slp-vectorize``: GCC 12's straight-line vectorizer drops the rounding of a double to
float that is widened again (``1.0 / (double)(float)s`` became ``1.0 / s`` in the scalars before a
sweep; the loops are vectorized by the loop vectorizer, which this leaves on).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-tree-slp-vectorize", "-fopenmp",
         "-fPIC", "-shared")
_LOCK = threading.Lock()
_LOADED: dict[str, ctypes.CDLL] = {}


class CompilerUnavailable(RuntimeError):
    """No working C compiler: the fused path is not available here."""


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise CompilerUnavailable("no C compiler found (set CC, or install gcc)")
    return cc


def cache_dir() -> pathlib.Path:
    root = os.environ.get("REFOPT_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "refopt", "kernels")
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags. Part of the cache key,
    so a cache directory shared between machines (a network home) never hands a kernel built for
    AVX-512 to a CPU without it."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


@functools.lru_cache(maxsize=None)
def _version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompilerUnavailable(f"{cc} does not run: {exc}") from None


def load(source: str, name: str, include: str | None = None) -> ctypes.CDLL:
    """The shared library built from ``source`` (compiled on first use, then cached);
    ``include``: a directory of headers it needs (jaxlib's, for the XLA FFI handler)."""
    cc = compiler()
    flags = FLAGS + (("-I", include) if include else ())
    key = hashlib.sha256("\0".join((source, cc, _version(cc), _machine(), *flags)).encode()).hexdigest()[:24]
    with _LOCK:
        lib = _LOADED.get(key)
        if lib is not None:
            return lib
        target = cache_dir() / f"{name}-{key}.so"
        if not target.exists():
            _compile(cc, source, target, flags)
        lib = ctypes.CDLL(str(target))
        _LOADED[key] = lib
        return lib


def _compile(cc: str, source: str, target: pathlib.Path, flags=FLAGS) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        c_file = pathlib.Path(tmp) / "kernel.c"
        c_file.write_text(source)
        out = pathlib.Path(tmp) / target.name
        proc = subprocess.run([cc, *flags, "-o", str(out), str(c_file), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise CompilerUnavailable(f"{cc} failed on a generated kernel: {proc.stderr.strip()[-600:]}")
        os.replace(out, target)  # atomic: another process may be building the same kernel
