"""torch.compile of the core's pure step: one graph (fullgraph=True, no graph breaks), same numbers
as eager. The default test traces with Dynamo and runs AOTAutograd's graph (backend aot_eager,
seconds); the Inductor variant compiles C++ kernels (a minute on a cold cache) and is marked slow.

And of a training step that calls refopt.torch's ``opt.step()``: the step is a graph break and
runs eagerly (see refopt/torch/__init__.py), so with the same gradients the results are eager's,
bit for bit, with a tensor lr that a scheduler drives, and without recompiling per step."""
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


# ---- a compiled training step that calls refopt.torch's opt.step() ----------------------------
def _training(cls, lr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = cls(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, sched, train_step


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["SAVEUS", "DOPE"])
def test_compiled_training_step_equals_eager(name, backend):
    import refopt.torch as rt
    from torch._dynamo.utils import counters

    cls = getattr(rt, name)
    model, opt, sched, step = _training(cls, torch.tensor(1e-2))
    for _ in range(5):
        step()
        sched.step()
    torch._dynamo.reset()
    counters.clear()
    model_c, opt_c, sched_c, step_c = _training(cls, torch.tensor(1e-2))
    compiled = torch.compile(step_c, backend=backend)
    graphs = []
    for _ in range(5):
        compiled()
        sched_c.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1]  # no recompilation as the step count and the lr change
    for a, b in zip(model.parameters(), model_c.parameters()):
        assert torch.equal(a, b)
        assert all(torch.equal(v, opt_c.state[b][k]) for k, v in opt.state[a].items())


def test_optimizer_built_inside_a_compiled_function():
    """What PyTorch's tests do under PYTORCH_TEST_WITH_DYNAMO: construction inside a traced frame
    keeps every attribute (the constructor runs eagerly)."""
    import refopt.torch as rt

    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(4, 3))
    for cls in (rt.SAVEUS, rt.DOPE):
        opt = torch.compile(lambda: cls([p], lr=1e-3, cpu_threads=None), backend="eager")()
        p.grad = torch.randn(4, 3)
        opt.step()
        assert opt._cpu_threads is None and int(opt.state[p]["step"]) == 1

