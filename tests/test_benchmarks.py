"""benchmarks/run.py's --compare loads a port the way refopt check does (it broke silently once,
when the loader moved, and the benchmark then printed no ratio against the public code)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("refopt_bench_run", ROOT / "benchmarks" / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_compare_loads_a_torch_port_for_the_torch_worker_only():
    pytest.importorskip("torch")
    run = _run_module()
    [(label, build, opts)] = run._compare_builders("torch", ["torch:refopt.torch:DOPE", "optax:refopt.optax:dope"])
    assert label == "torch:refopt.torch:DOPE" and opts == ("DOPE",) and callable(build)
    assert run._compare_builders("numpy", ["torch:refopt.torch:DOPE"]) == []


def test_sweep_profile_times_every_sweep_of_both_kernels(capsys):
    """benchmarks/sweeps.py: a row per sweep, the sweeps' passes and divider operations as the
    schedule has them, and a ratio to AdamW(fused=True) from the same rounds."""
    pytest.importorskip("torch")
    from refopt import fused

    if not fused.available():
        pytest.skip("no C compiler")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import sweeps
    finally:
        sys.path.remove(str(ROOT))
    assert sweeps.main(["--rows", "64", "--cols", "256", "--rounds", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "x torch.optim.AdamW(fused=True)" in out
    dope = [line for line in out[out.index("== DOPE"):out.index("== SAVEUS")].splitlines()[2:] if line.strip()]
    assert [line.split()[0] for line in dope] == ["1", "2", "3"]
    assert [line.split()[1:4] for line in dope] == [["1", "(1+0)", "1"], ["9", "(5+4)", "5"], ["6", "(5+1)", "6"]]
    assert all(line.split()[-1] in ("memory", "computation") for line in dope)
