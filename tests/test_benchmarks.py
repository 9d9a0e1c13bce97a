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
