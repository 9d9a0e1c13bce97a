"""refopt.fused's Triton kernels under Triton's interpreter, on CPU tensors: per element what the
core computes (as tests/adapters/test_fused.py asks of the C kernel), and refopt.torch's Triton
path passes the golden vectors.

Triton chooses between compiling and interpreting when it is imported (``TRITON_INTERPRET=1``),
so test_triton.py runs this file in a process of its own; anywhere else it is skipped. The
interpreter executes each program in Python with NumPy: its sums run in another order than the
GPU's (freedom 1), and it has no libdevice (``pow`` is NumPy's); everything else is the code the
GPU runs. Each interpreted launch costs ~0.1 s, so the default run is a spread; the ``slow``
ones sweep every configuration and every vector.
"""
from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import textwrap
import zlib

import numpy as np
import pytest

import refopt
from refopt import fused
from refopt.conformance.encoding import np_dtype

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from refopt.fused import gpu  # noqa: E402
from refopt.torch import _triton  # noqa: E402


@triton.jit
def _probe(out, n):
    acc = tl.full((), 0, tl.int64)
    for _ in range(tl.program_id(0), n, 1):  # a loop with run-time bounds, as every sweep has
        acc += 1
    tl.store(out, acc)


def _interpreter_problem() -> str | None:
    if os.environ.get("TRITON_INTERPRET") != "1" or not gpu.interpreting():
        return "needs TRITON_INTERPRET=1 before triton is imported (test_triton.py runs it so)"
    out = torch.zeros(1, dtype=torch.int64)
    try:
        _probe[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - e.g. triton 3.5's interpreter under NumPy 2.4
        return f"triton {triton.__version__}'s interpreter cannot run the kernels here ({exc})"
    return None


SKIP = _interpreter_problem()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fused_tests = _load("test_fused")  # the C kernel's cases, core runs and comparison
#: float64 sums here run in NumPy's order over padded tiles: DOPE's D10 centring cancels the
#: difference up to 1.5e-13 of the tensor's scale (the C kernel happens to sum these in the core's order)
BOUND = dict(fused_tests.BOUND, float64=1e-12)
#: tiles of a few elements: many programs, masked edges, columns split between programs
SMALL = gpu.Tiling(elements=16, max_cols=8, min_programs=4, num_warps=1)


def _to_torch(a):
    a = np.ascontiguousarray(a)
    if a.dtype == np_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _to_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16")).copy()
    return t.numpy().copy()


def _runs(opt, shape, dtype, tiling=None):
    p0, grads, core = fused_tests.core_runs(opt, shape, dtype)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    kernel = fused.kernel_for(opt, len(shape), dtype, rows, cols, target="triton")
    tensors = {"param": _to_torch(np.asarray(p0).reshape(-1)),
               **{k: _to_torch(np.zeros(math.prod(shape), np_dtype(dtype))) for k in opt.facts.buffers}}
    got = []
    for i, g in enumerate(grads):
        tensors["grad"] = _to_torch(np.asarray(g).reshape(-1))
        values = fused.values_of(opt, i, rows, cols)
        params = torch.tensor([float(values[name]) for name in kernel.params], dtype=torch.float64)
        kernel({k: _triton._flat(v) for k, v in tensors.items()}, rows, cols, params, tiling)
        got.append([_to_numpy(tensors["param"]).reshape(shape)] +
                   [_to_numpy(tensors[k]).reshape(shape) for k in opt.facts.buffers])
    return core, got


@pytest.mark.parametrize("opt,shape,dtype", [
    (fused_tests.CONFIGS[3], (9, 33), "float32"), (fused_tests.CONFIGS[3], (2, 3, 4), "bfloat16"),
    (fused_tests.CONFIGS[0], (7,), "float64"), (fused_tests.CONFIGS[0], (9, 33), "float16"),
], ids=["dope-9x33-float32", "dope-2x3x4-bfloat16", "saveus-7-float64", "saveus-9x33-float16"])
def test_triton_kernels_compute_what_the_core_computes(opt, shape, dtype):
    fused_tests.compare(*_runs(opt, shape, dtype), dtype, BOUND)


@pytest.mark.parametrize("shape,dtype", [((5, 11), "float16"), ((37,), "float32")], ids=str)
def test_small_tiles_split_rows_and_columns_alike(shape, dtype):
    """Many programs per tensor: rows in tiles, 1-D columns split, masked edges everywhere."""
    fused_tests.compare(*_runs(fused_tests.CONFIGS[3], shape, dtype, SMALL), dtype, BOUND)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", fused_tests.SHAPES + [(131, 1)], ids=str)
@pytest.mark.parametrize("opt", fused_tests.CONFIGS, ids=lambda o: f"{o.name}-{o.profile}-{zlib.crc32(repr(o).encode()) % 1000}")
def test_triton_kernels_compute_what_the_core_computes_everywhere(opt, shape, dtype):
    fused_tests.compare(*_runs(opt, shape, dtype), dtype, BOUND)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (13, 1)], ids=str)
@pytest.mark.parametrize("opt", fused_tests.CONFIGS, ids=lambda o: f"{o.name}-{o.profile}-{zlib.crc32(repr(o).encode()) % 1000}")
def test_small_tiles_everywhere(opt, shape, dtype):
    fused_tests.compare(*_runs(opt, shape, dtype, SMALL), dtype, BOUND)


# ---- refopt.torch through the Triton kernels, against the vectors -----------------------------

PORTS = textwrap.dedent(
    """
    import functools
    import refopt.torch

    for _base in (refopt.torch.DOPE, refopt.torch.SAVEUS):
        _init = functools.partialmethod(_base.__init__, fused=True)
        globals()[_base.__name__ + "Triton"] = type(_base.__name__ + "Triton", (_base,), {"__init__": _init})
    """
)


@pytest.fixture
def ports(tmp_path, monkeypatch):
    (tmp_path / "refopt_triton_ports.py").write_text(PORTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_triton, "ON_CPU", True)  # CPU parameters take the Triton path, interpreted
    taken = []
    real = gpu.TritonKernel.__call__
    monkeypatch.setattr(gpu.TritonKernel, "__call__", lambda *a, **k: taken.append(1) or real(*a, **k))
    yield "refopt_triton_ports", taken


def _check(module, cls, capsys, *options):
    from refopt.cli import main

    rc = main(["check", "--port", f"torch:{module}:{cls}", "-q", "--in-process", *options])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


@pytest.mark.parametrize("cls,dtype", [("DOPETriton", "float32"), ("SAVEUSTriton", "bfloat16")])
def test_torch_triton_path_passes_a_sample_of_the_vectors(ports, cls, dtype, capsys):
    from refopt.conformance import load, runner

    module, taken = ports
    ids = ",".join(v.id for v in runner.sample(load(optimizer=[cls[:-6].lower()], dtype=[dtype]), per_group=1))
    _check(module, cls, capsys, "--ids", ids, "--no-multi-tensor")
    assert taken, "no parameter reached the Triton kernels"


@pytest.mark.slow  # every vector, alone and in the multi-tensor run: ~0.1 s an interpreted launch
@pytest.mark.parametrize("cls", ["DOPETriton", "SAVEUSTriton"])
def test_torch_triton_path_passes_every_vector(ports, cls, capsys):
    _check(ports[0], cls, capsys)


def test_the_gpu_profile_script_runs(capsys):
    """backends/triton_profile.py, as gpu_check.sh's dry run runs it: a line per optimizer."""
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    try:
        from backends import triton_profile
    finally:
        sys.path.remove(str(root))
    was = _triton.ON_CPU
    try:
        assert triton_profile.main(["--device", "cpu", "--rows", "4", "--cols", "16", "--steps", "1"]) == 0
    finally:
        _triton.ON_CPU = was
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["DOPE", "SAVEUS", "AdamW"]
    assert all("host until step() returns" in line for line in lines[1:])


def test_launch_buffers_are_kept_per_shape(monkeypatch):
    """A step allocates nothing once a shape has been seen: the row results and sums of a shape's
    launches are built once and shared by its tensors, step after step."""
    import refopt.torch

    monkeypatch.setattr(_triton, "ON_CPU", True)
    params = [torch.nn.Parameter(torch.randn(3, 5)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(4))]
    opt = refopt.torch.DOPE(params, fused=True)
    kernels = set()
    real = gpu.TritonKernel.__call__
    monkeypatch.setattr(gpu.TritonKernel, "__call__", lambda self, *a, **k: kernels.add(self) or real(self, *a, **k))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    def buffers(kernel):  # per plan, each sweep's (partial sums, row results, totals)
        return {key: [tuple(id(t) for t in sweep[4:5] + sweep[7:]) for sweep in plan] for key, plan in kernel._plans.items()}

    first = {id(k): buffers(k) for k in kernels}
    shapes = sorted(key[:2] for b in first.values() for key in b)
    assert (3, 5) in shapes and (1, 4) in shapes and len(kernels) == 2  # one plan for the three 3x5 tensors
    opt.step()
    assert {id(k): buffers(k) for k in kernels} == first
