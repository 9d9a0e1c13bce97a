"""refopt.torch follows torch.optim's conventions: tensor learning rates (and the lr_scheduler
classes that write them), a 0-d tensor ``step``, ``maximize``/``differentiable`` refused
clearly, and the documented zero-gradient behaviours. (Checkpoints: test_torch_checkpoints.py;
torch.compile: test_torch_compile.py.)"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import refopt  # noqa: E402
import refopt.torch as rt  # noqa: E402
from refopt.torch import _optim  # noqa: E402

OPTS = {"SAVEUS": rt.SAVEUS, "DOPE": rt.DOPE}
#: one configuration per optimizer that reaches every use of lr (S8 decoupled and S10; D13, D14
#: and the cautious D12/D14 phase), plus DOPE without cautious
LR_CONFIGS = [
    ("SAVEUS", {"weight_decay": 0.1, "decouple_weight_decay": True}),
    ("SAVEUS", {"weight_decay": 0.05, "clip_gradients": True}),
    ("DOPE", {}),
    ("DOPE", {"cautious": False}),
]
SHAPES = [(3, 5), (17,), (), (2, 2, 3, 3)]


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def _run(cls, params, steps=4, seed=1, **kw):
    """``steps`` updates with seeded gradients; returns the parameters' values and the optimizer."""
    opt = cls(params, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


def _max_rel(got, want):
    """max |a - b| / max |b| over the tensors, where both are finite (float16 DOPE overflows to
    NaN in both paths: the same elements must)."""
    out = 0.0
    for a, b in zip(got, want):
        a, b = a.double(), b.double()
        assert torch.equal(a.isfinite(), b.isfinite())
        a, b = a[b.isfinite()], b[b.isfinite()]
        if b.numel():
            out = max(out, float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)))
    return out


# ---- tensor lr ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hp", LR_CONFIGS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("foreach", [False, True])
def test_cpu_tensor_lr_equals_the_float_of_its_value(name, hp, shape, foreach):
    """A 1-element CPU tensor lr (any number of dims, as torch.optim takes it) is read on the host:
    bit for bit the result of a float lr of the same value."""
    lr = torch.tensor(3e-3, dtype=torch.float32).reshape(shape)
    want, _ = _run(OPTS[name], _params(), foreach=foreach, lr=float(lr), **hp)
    got, opt = _run(OPTS[name], _params(), foreach=foreach, lr=lr, **hp)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert opt.param_groups[0]["lr"] is lr  # kept as given: a scheduler writes into it


@pytest.mark.parametrize("name,hp", LR_CONFIGS)
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-14), (torch.float32, 2e-6),
                                         (torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_device_tensor_lr_path_follows_the_float_path(name, hp, dtype, bound, monkeypatch):
    """A tensor lr on the parameters' (GPU) device is applied by tensor ops, without reading it
    on the host. Forced here on the CPU: within an ulp per op of the float path, the bounds of
    test_torch.LOW_BOUNDS (measured after 4 steps: float64 6e-17, float32 3.4e-8, SAVEUS 16-bit
    bit-identical, DOPE bfloat16 2.8e-3 and float16 2.4e-4: one 16-bit ulp where an unfused
    multiply-add rounds a float32 intermediate the other way)."""
    want, _ = _run(OPTS[name], _params(dtype), lr=2e-3, fused=False, **hp)
    monkeypatch.setattr(_optim, "step_lr", lambda lr, device: torch.as_tensor(lr, dtype=torch.float64).reshape(()))
    got, _ = _run(OPTS[name], _params(dtype), lr=torch.tensor(2e-3, dtype=torch.float64), fused=False, **hp)
    assert all(a.dtype == dtype for a in got)
    assert _max_rel(got, want) <= bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,hp", LR_CONFIGS)
def test_cuda_tensor_lr_steps_without_a_host_sync(name, hp):
    """On the GPU a tensor lr there is never read on the host (torch's sync debug mode raises
    on any synchronising call); the result follows the float lr's."""
    cuda = [torch.nn.Parameter(p.detach().float().cuda()) for p in _params()]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in cuda]
    opt = OPTS[name](cuda, lr=torch.tensor(2e-3, device="cuda"), **hp)
    ref = OPTS[name](twin, lr=2e-3, **hp)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(cuda, twin):
            p.grad = torch.randn(p.shape, generator=g).cuda()
            q.grad = p.grad.clone()
        ref.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert _max_rel([p.cpu() for p in cuda], [q.cpu() for q in twin]) <= 2e-6


def test_step_lr_reads_the_host_only_where_that_is_free():
    cpu, lr = torch.device("cpu"), torch.tensor([0.25])
    assert _optim.step_lr(0.5, cpu) == 0.5 and type(_optim.step_lr(lr, cpu)) is float
    meta = torch.device("meta")  # stands in for a GPU: the lr goes to the device, no .item()
    lr_dev = torch.empty((1,), device=meta)
    got = _optim.step_lr(lr_dev, meta)
    assert isinstance(got, torch.Tensor) and got.device == meta and got.dtype == torch.float64 and got.dim() == 0


@pytest.mark.parametrize("name", OPTS)
def test_tensor_lr_with_more_than_one_element_is_refused_as_torch_does(name):
    cls, p = OPTS[name], torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls([p], lr=torch.tensor([1e-3, 1e-3]))
    opt = cls([p], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": torch.ones(2)})
    with pytest.raises(ValueError, match="Invalid learning rate"):
        cls([p], lr=torch.tensor(-1.0))
    with pytest.raises(TypeError, match="real"):
        cls([p], lr=torch.tensor(1e-3 + 0j))
    p.grad = torch.randn(3, 2)
    before = p.detach().clone()
    opt.param_groups[0]["lr"].fill_(float("nan"))  # a CPU tensor is checked at each step (free)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()
    opt.param_groups[0]["lr"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="1-element"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
}


def _scheduled(cls, lr, sched, steps=6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    opt = cls(model.parameters(), lr=lr)
    s = SCHEDULERS[sched](opt)
    x, lrs = torch.randn(8, 6, dtype=torch.float64), []
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        s.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    return model, opt, lrs


@pytest.mark.parametrize("sched", SCHEDULERS)
@pytest.mark.parametrize("name", OPTS)
def test_lr_schedulers_drive_a_tensor_lr(name, sched):
    """A scheduler writes into the tensor lr (OneCycleLR cycles betas[0] too); the learning
    rates are AdamW's under the same scheduler, and the result is the float lr's."""
    lr = torch.tensor(1e-3, dtype=torch.float64)
    model, opt, lrs = _scheduled(OPTS[name], lr, sched)
    assert opt.param_groups[0]["lr"] is lr
    assert lrs == _scheduled(torch.optim.AdamW, torch.tensor(1e-3, dtype=torch.float64), sched)[2]
    ref, _, ref_lrs = _scheduled(OPTS[name], 1e-3, sched)
    assert lrs == pytest.approx(ref_lrs, rel=1e-15)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


# ---- state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
def test_step_is_a_0d_int64_cpu_tensor_and_foreach_equals_forloop(name):
    """torch's form (a 0-d tensor), exact as the core's integer count; foreach and the per-tensor
    loop agree bit for bit, state included, with a parameter left out of some steps."""
    runs = []
    for foreach in (False, True):
        params = _params()
        opt = OPTS[name](params, foreach=foreach)
        g = torch.Generator().manual_seed(3)
        for k in range(5):
            for i, p in enumerate(params):
                p.grad = None if (k == 2 and i == 1) else torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k, v in oa.state[a].items():
            assert torch.equal(v, ob.state[b][k]), k
    steps = [oa.state[p]["step"] for p in pa]
    assert all(s.dim() == 0 and s.dtype == torch.int64 and s.device.type == "cpu" for s in steps)
    assert [int(s) for s in steps] == [5, 4, 5, 5]
    assert len({id(s) for s in steps}) == len(steps)  # one counter per parameter


@pytest.mark.parametrize("count", [3, 3.0, torch.tensor(3.0), torch.tensor(3, dtype=torch.int32),
                                   torch.tensor(3.0, dtype=torch.float64)])
def test_a_hand_set_step_count_is_read_and_converted(count):
    """An int (refopt 1.0, the original code), a whole float (torch's ``.item()``) or a 0-d
    tensor of another dtype (torch's float32) counts as that step; it is replaced in refopt's form."""
    a, b = _params()[:1], _params()[:1]
    _run(rt.DOPE, a, steps=4)
    _, opt = _run(rt.DOPE, b, steps=3)
    opt.state[b[0]]["step"] = count
    b[0].grad = a[0].grad.clone()
    opt.step()
    assert torch.equal(a[0], b[0])
    assert _optim.is_step_tensor(opt.state[b[0]]["step"]) and int(opt.state[b[0]]["step"]) == 4


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan"), True, "3", torch.tensor([3]), torch.tensor(-2.0)])
def test_a_bad_step_count_is_refused_before_any_write(bad):
    params = _params()[:2]
    _, opt = _run(rt.SAVEUS, params, steps=2)
    opt.state[params[1]]["step"] = bad
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="step"):
        opt.step()
    assert all(torch.equal(p, v) for p, v in zip(params, before))


# ---- maximize, differentiable -----------------------------------------------------------------
@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("flag", ["maximize", "differentiable"])
def test_maximize_and_differentiable_are_false_or_refused(name, flag):
    cls, p = OPTS[name], torch.nn.Parameter(torch.randn(3, 2))
    opt = cls([p], **{flag: False})
    assert opt.param_groups[0][flag] is False
    with pytest.raises(ValueError, match=f"does not support {flag}=True"):
        cls([p], **{flag: True})
    with pytest.raises(ValueError, match=f"{flag}=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], flag: True})
    with pytest.raises(TypeError, match=flag):
        cls([p], **{flag: 1})
    opt.param_groups[0][flag] = True  # set on a group later: refused at the step
    p.grad = torch.randn(3, 2)
    with pytest.raises(ValueError, match=flag):
        opt.step()
    assert not opt.state


# ---- the documented zero-gradient behaviours ----------------------------------------------------
def _zero_grad_step(cls, shape, **kw):
    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    before = p.detach().clone()
    opt = cls([p], **kw)
    p.grad = torch.zeros_like(p)
    opt.step()
    return before, p.detach()


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("profile", ["reference", "documented"])
def test_one_element_channels_turn_nan_and_the_documented_remedies_avoid_it(name, profile):
    """A2, in both profiles: (k, 1) and (k, 1, 1, 1) parameters become NaN whatever the gradient;
    normalize_channels=False or normalization=0 avoid it (a true no-op with no weight decay)."""
    cls = OPTS[name]
    for shape in [(5, 1), (4, 1, 1, 1)]:
        assert _zero_grad_step(cls, shape, profile=profile)[1].isnan().all()
        for fix in ({"normalize_channels": False}, {"normalization": 0.0}):
            before, after = _zero_grad_step(cls, shape, profile=profile, weight_decay=0.0, **fix)
            assert torch.equal(before, after)
    before, after = _zero_grad_step(cls, (5, 3), profile=profile, weight_decay=0.0)
    assert torch.equal(before, after)


@pytest.mark.parametrize("profile", ["reference", "documented"])
def test_dope_default_weight_decay_moves_zero_gradient_parameters(profile):
    """D13 at the defaults, in both profiles: without gradient history the D7 denominators are
    exactly eps and eps2, so p changes by -lr * wd * p / (eps * eps2) = -150 p."""
    before, after = _zero_grad_step(rt.DOPE, (5, 3), profile=profile)
    assert torch.allclose(after - before, -1.5e-4 * 0.01 / (1e-6 * 1e-2) * before, rtol=1e-9)
    assert torch.equal(*_zero_grad_step(rt.DOPE, (5, 3), profile=profile, weight_decay=0.0))


def test_saveus_coupled_weight_decay_moves_zero_gradient_parameters():
    """S8 after S7: -lr / (1 - beta1) * wd * p / eps at step 1 (1e5 p); decoupled: a factor."""
    before, after = _zero_grad_step(rt.SAVEUS, (5, 3), weight_decay=0.1)
    assert torch.allclose(after - before, -1e-3 / 0.1 * 0.1 / 1e-8 * before, rtol=1e-9)
    before, after = _zero_grad_step(rt.SAVEUS, (5, 3), weight_decay=0.1, decouple_weight_decay=True)
    assert torch.allclose(after, before * (1 - 1e-3 / 0.1 * 0.1), rtol=1e-15)


@pytest.mark.parametrize("cls", [rt.SAVEUS, rt.DOPE, refopt.SAVEUS, refopt.DOPE])
def test_class_docstrings_state_the_zero_gradient_behaviours(cls):
    doc = cls.__doc__
    assert "(k, 1)" in doc and "normalize_channels=False" in doc and "0/0" in doc
    if cls.__name__ == "DOPE":
        assert "weight_decay=0.01" in doc and "-150 p" in doc and "weight_decay=0" in doc
    else:
        assert "coupled weight decay" in doc and "decouple_weight_decay=True" in doc
