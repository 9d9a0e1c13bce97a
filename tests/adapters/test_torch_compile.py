"""torch.compile of the core's pure step: one graph (fullgraph=True, no graph breaks), same numbers
as eager. The default test traces with Dynamo and runs AOTAutograd's graph (backend aot_eager,
seconds); the Inductor variant compiles C++ kernels (a minute on a cold cache) and is marked slow.
refopt.torch's own ``step`` is eager by design (see refopt/torch/__init__.py)."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import refopt  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Dynamo detected a call to a `functools.lru_cache`",
    "ignore::UserWarning",
)


def _check(cls, dtype, backend, steps=3):
    torch._dynamo.reset()
    opt = cls()
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, generator=g, dtype=dtype)
    grads = [torch.randn(3, 5, generator=g, dtype=dtype) for _ in range(steps)]
    step = torch.compile(opt.step, fullgraph=True, backend=backend)  # raises on a graph break
    pe, se = p, opt.init(p)
    pc, sc = p, opt.init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for gr in grads:
            pe, se = opt.step(pe, gr, se)
            pc, sc = step(pc, gr, sc)
    assert int(sc.step) == steps and pc.dtype == dtype
    # aot_eager runs the traced aten ops as they are; Inductor may fuse and contract them
    tol = 0 if backend == "aot_eager" else (1e-12 if dtype == torch.float64 else 1e-5)
    scale = float(pe.abs().max())
    assert float((pc - pe).abs().max()) <= tol * scale
    for a, b in zip(sc[1:], se[1:]):
        assert float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("cls,dtype", [(refopt.DOPE, torch.float32), (refopt.DOPE, torch.float64),
                                       (refopt.SAVEUS, torch.float32)])
def test_core_step_compiles_without_graph_breaks(cls, dtype):
    _check(cls, dtype, "aot_eager")


@pytest.mark.slow
def test_core_step_compiles_with_inductor():
    _check(refopt.DOPE, torch.float32, "inductor")
