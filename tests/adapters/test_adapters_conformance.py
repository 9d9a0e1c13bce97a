"""The adapters' fast paths against the golden vectors (issue 5: speed must not cost conformance).

Runs `refopt check --port ...` on refopt.torch (the fused kernels, and the eager single-tensor
and multi-tensor paths) and
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
        for _suffix, _options in (("Fused", {"fused": True}), ("Foreach", {"fused": False, "foreach": True}),
                                  ("Single", {"fused": False, "foreach": False})):
            _init = functools.partialmethod(_base.__init__, **_options)
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


def _sample_ids():
    from refopt.conformance import load, runner

    return ",".join(v.id for v in runner.sample(load(), per_group=1))


@pytest.mark.parametrize("cls", ["DOPEFused", "SAVEUSFused"])
def test_fused_path_passes_a_sample_of_the_vectors(paths_module, cls, capsys):
    """A sample (each kernel configuration is compiled once, ~0.5 s, then cached on disk);
    the next test runs every vector."""
    rc = main(["check", "--port", f"torch:{paths_module}:{cls}", "-q", "--in-process", "--ids", _sample_ids()])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err


@pytest.mark.slow  # one kernel compilation per vector configuration (~130 on a cold cache)
@pytest.mark.parametrize("cls", ["DOPEFused", "SAVEUSFused"])
def test_fused_path_passes_every_vector(paths_module, cls, capsys):
    rc = main(["check", "--port", f"torch:{paths_module}:{cls}", "-q", "--in-process"])
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
    monkeypatch.setattr(optax_adapter, "_fused_leaf", lambda opt, p: False)  # the walk backs up the kernel
    monkeypatch.setattr(optax_adapter._rowblock, "MIN_NUMEL", 1)
    taken = []
    real = optax_adapter._rowblock.step
    monkeypatch.setattr(optax_adapter._rowblock, "step", lambda *a: taken.append(1) or real(*a))
    rc = main(["check", "--port", "optax:refopt.optax:dope", "--dtype", "float64,float32", "--profile", "reference",
               "-q", "--in-process"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert taken, "no vector reached the row-blocked path"
