"""refopt.fused's Triton kernels (the CUDA fused path), checked without a GPU:

* the kernels compile for an NVIDIA GPU (sm_90) with Triton's own compiler and ptxas, which run
  on the CPU, and the PTX holds no approximate or fused operation (div.full, sqrt.approx, FMA,
  flush-to-zero arithmetic);
* their numbers, under Triton's interpreter (triton_interpreted.py, in a process started with
  TRITON_INTERPRET=1): per element what the core computes, and the golden vectors;
* the schedule they run and the launch shapes, from the generated source alone (no triton).

On a GPU, backends/gpu_check.sh runs the vectors through them on CUDA tensors.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import refopt
from refopt import fused
from refopt.fused import gpu
from refopt.fused.c_source import Program
from refopt.fused.symbolic import trace
from refopt.fused.triton_source import TritonProgram

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = [refopt.SAVEUS(), refopt.DOPE(), refopt.SAVEUS(clip_gradients=True, weight_decay=0.1, centralization=-0.5),
           refopt.DOPE(normalize_channels=False, clip=0.0, cautious=False, eps_floor=1e-3)]


def _triton():
    triton = pytest.importorskip("triton")
    if gpu.interpreting():
        pytest.skip("triton is interpreting in this process")
    return triton


# ---- the generated source -------------------------------------------------------------------

@pytest.mark.parametrize("opt", CONFIGS, ids=lambda o: f"{o.name}-{CONFIGS.index(o)}")
@pytest.mark.parametrize("ndim", [1, 2])
def test_no_loop_reads_what_another_loop_of_its_sweep_wrote(opt, ndim):
    """Outputs are written in the last loop of a sweep (a program's threads do not wait for each
    other between loops); later sweeps read them back, and nothing is kept in row buffers."""
    program = TritonProgram(trace(opt, ndim, "float32", {"rows": 4, "cols": 6}))
    assert program.schedule.n_buffers == 0
    for sweep in program.schedule.sweeps:
        *early, last = sweep.loops
        assert all(not loop.stores and not loop.reuse for loop in early)
        assert {name for name, _ in last.stores} == {name for name, _ in sweep.outs}
    compile(program.source(), "<triton>", "exec")  # valid Python


def test_the_kernels_are_the_c_kernels_schedule():
    """Same sweeps, same global reductions, same row passes as the C kernel."""
    for opt in CONFIGS:
        traced = trace(opt, 2, "float32", {"rows": 4, "cols": 6})
        c, t = Program(traced).schedule, TritonProgram(traced).schedule
        assert [(len(s.globals), len(s.passes), [n for n, _ in s.outs]) for s in c.sweeps] == \
            [(len(s.globals), len(s.passes), [n for n, _ in s.outs]) for s in t.sweeps]


@pytest.mark.parametrize("rows,cols,splits,want", [
    (4096, 4096, False, ((4096, 1), 4096, 1, 1024)),      # a row a program, columns in 4 blocks
    (4096, 4096, True, ((4096, 1), 4096, 1, 1024)),       # enough programs already: no split
    (1, 1 << 20, True, ((1, 1024), 1024, 1, 1024)),       # a 1-D tensor spread over 1024 programs
    (1, 1 << 20, False, ((1, 1), 1 << 20, 1, 1024)),      # (with row reductions it cannot be)
    (131101, 1, False, ((129, 1), 1, 1024, 1)),           # short rows: 1024 rows a program
    (3, 5, True, ((1, 1), 5, 4, 8)),
])
def test_launch_shapes(rows, cols, splits, want):
    assert gpu.launch_shape(rows, cols, splits, gpu.GPU) == want


# ---- compiled for a GPU, on the CPU -----------------------------------------------------------

#: arithmetic that would not round as the core does: approximate division/square root/reciprocal,
#: fused multiply-add in float32, flush-to-zero float32 arithmetic or comparisons
FORBIDDEN = re.compile(r"\b(div\.(full|approx)|sqrt\.approx|rcp\.approx(\.ftz)?\.f32|(ex2|lg2)\.approx|"
                       r"(fma|mad)\.\w*\.?f32|(add|sub|mul|div|sqrt|setp\.\w+|neg|min|max|cvt\.\w+)\.ftz)")


def _check_ptx(opt, dtype, r, c):
    kernel = fused.kernel_for(opt, 2, dtype, 4, 6, target="triton")
    for source, ptx in zip(_kernel_sources(kernel), gpu.compile_ahead(kernel, dtype, r, c)):
        bad = sorted({m.group(0) for m in FORBIDDEN.finditer(ptx)})
        assert not bad, f"{opt.name} {dtype}: {bad}"
        assert "pow_f64(" in source or not re.search(r"\bfma\.rn\.f64", ptx), \
            "a float64 FMA outside libdevice's pow: contraction is on"


def _kernel_sources(kernel):
    text = kernel.program_source
    return [text[text.index(f"def {s['kernel']}("):] for s in kernel.program.sweeps]


def test_dope_compiles_for_sm90_rounding_as_the_core():
    """Three kernels (~3 s): DOPE's sweeps, float32, one row a program."""
    _triton()
    _check_ptx(refopt.DOPE(), "float32", 1, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("opt", CONFIGS, ids=lambda o: f"{o.name}-{CONFIGS.index(o)}")
def test_every_kernel_compiles_for_sm90_rounding_as_the_core(opt, dtype):
    _triton()
    _check_ptx(opt, dtype, 8, 128)


def test_a_launch_binds_every_argument_as_itself():
    """Triton's launch binder (not used when compiling ahead, nor by the interpreter) names locals
    of its own; a kernel argument of such a name reached the specialiser as a dict on a GPU."""
    _triton()
    torch = pytest.importorskip("torch")
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:
        pytest.skip(f"this triton has no launch binder of the known form ({exc})")
    kernel = fused.kernel_for(refopt.DOPE(), 2, "float32", 8, 128, target="triton")
    for fn in kernel._kernels:
        binder = create_function_from_signature(fn.signature, fn.params, BaseBackend)
        pointers = [torch.zeros(8, dtype=torch.float64) for _ in range(4)]
        arrays = [torch.zeros(1024) for _ in kernel.inputs]
        bound, _, _ = binder(*pointers, 8, 128, 128, *arrays, R=8, C=128, num_warps=4)
        assert all(a is b for a, b in zip(bound.values(), [*pointers, 8, 128, 128, *arrays]))


# ---- numbers, under the interpreter ---------------------------------------------------------

def _interpreted(*options):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parents[1])] + [p for p in (os.environ.get("PYTHONPATH"),) if p]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-W", "ignore",
                           str(HERE / "triton_interpreted.py"), *options], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    if " passed" not in last:  # every test skipped: an interpreter that cannot run them, say why
        reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
        pytest.skip(reasons[0] if reasons else last)


def test_interpreted_kernels_compute_what_the_core_computes():
    """A spread of configurations, tiles and two vector samples (~10 s, mostly the interpreter)."""
    _interpreted()


@pytest.mark.slow
def test_interpreted_kernels_everywhere_and_every_vector():
    _interpreted("-m", "slow")
