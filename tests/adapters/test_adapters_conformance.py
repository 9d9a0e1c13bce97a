"""The adapters' fast paths against the golden vectors (issue 5: speed must not cost conformance).

Runs `refopt check --port ...` on refopt.torch (single-tensor and multi-tensor paths) and
refopt.optax, exactly as a port author would (`--in-process`, so that the test can reach inside).
Both take profile= and quirks=, so they are given every vector with its own configuration."""
from __future__ import annotations

import textwrap

import pytest

from refopt.cli import main

pytest.importorskip("torch")

PATHS = textwrap.dedent(
    """
    import functools
    import refopt.torch

    # One class per (optimizer, path); the class name tells the runner which optimizer it is.
    for _base in (refopt.torch.DOPE, refopt.torch.SAVEUS):
        for _suffix, _foreach in (("Foreach", True), ("Single", False)):
            _init = functools.partialmethod(_base.__init__, foreach=_foreach)
            globals()[_base.__name__ + _suffix] = type(_base.__name__ + _suffix, (_base,), {"__init__": _init})
    """
)


@pytest.fixture
def paths_module(tmp_path, monkeypatch):
    (tmp_path / "refopt_fastpaths.py").write_text(PATHS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "refopt_fastpaths"


@pytest.mark.parametrize("cls", ["DOPEForeach", "DOPESingle", "SAVEUSForeach", "SAVEUSSingle"])
def test_torch_adapter_paths_pass_every_vector(paths_module, cls, capsys):
    # the foreach classes also take the multi-tensor run (many tensors, param groups: their path)
    more = ["--no-multi-tensor"] if cls.endswith("Single") else []
    rc = main(["check", "--port", f"torch:{paths_module}:{cls}", "-q", "--in-process", *more])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


@pytest.mark.slow  # one jit compilation per vector
@pytest.mark.parametrize("factory", ["dope", "saveus"])
def test_optax_adapter_passes_the_float64_vectors(factory, capsys):
    pytest.importorskip("optax")
    rc = main(["check", "--port", f"optax:refopt.optax:{factory}", "--dtype", "float64", "-q", "--in-process"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


@pytest.mark.slow  # one jit compilation per vector
def test_optax_rowblocked_dope_path_passes_the_vectors(monkeypatch, capsys):
    """The large-leaf DOPE path of refopt.optax, forced onto every vector leaf of 2 or more axes."""
    optax_adapter = pytest.importorskip("refopt.optax")
    monkeypatch.setattr(optax_adapter._rowblock, "MIN_NUMEL", 1)
    taken = []
    real = optax_adapter._rowblock.step
    monkeypatch.setattr(optax_adapter._rowblock, "step", lambda *a: taken.append(1) or real(*a))
    rc = main(["check", "--port", "optax:refopt.optax:dope", "--dtype", "float64,float32", "--profile", "reference",
               "-q", "--in-process"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert taken, "no vector reached the row-blocked path"
