"""refopt.torch checkpoints as torch users make them: ``torch.save(opt.state_dict())`` read back
with ``torch.load(weights_only=True)``, SAVEUS's ``clip_lambda`` (the default restored, a user's
own not saved), refopt 1.0's format and the original code's state read, options a saved group
lacks filled as torch does, and torch.distributed.checkpoint."""
from __future__ import annotations

import copy
import io
import warnings

import pytest

torch = pytest.importorskip("torch")

import refopt.torch as rt  # noqa: E402
from refopt import registry  # noqa: E402
from refopt.torch import _optim  # noqa: E402

OPTS = {"SAVEUS": rt.SAVEUS, "DOPE": rt.DOPE}
CONFIGS = [  # (name, group options): quirks dicts, None, a tensor lr, the clip switch
    ("SAVEUS", {}),
    ("SAVEUS", {"clip_gradients": True, "quirks": {"aliased_lerp": False}, "lr": torch.tensor(2e-3)}),
    ("SAVEUS", {"clip_lambda": None, "profile": "documented"}),
    ("DOPE", {}),
    ("DOPE", {"eps_floor": 1e-4, "lr": torch.tensor([1e-3])}),
]


def my_clip(t):
    return t**0.5


def other_clip(t):
    return t**0.5


class Run:
    """Two parameter groups on a small model, seeded gradients, ``steps`` at a time."""

    def __init__(self, name, steps=0, seed=0, **options):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
        first, last = list(self.model[0].parameters()), list(self.model[2].parameters())
        options = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in options.items()}
        self.opt = OPTS[name]([{"params": first}, {"params": last, "weight_decay": 0.02}], **options)
        self.k = 0
        self.step(steps)

    def step(self, n):
        for _ in range(n):
            g = torch.Generator().manual_seed(1000 + self.k)
            for p in self.model.parameters():
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            self.opt.step()
            self.k += 1
        return self

    def same_as(self, other):
        params = zip(self.model.parameters(), other.model.parameters())
        return all(torch.equal(a, b) and all(torch.equal(v, other.opt.state[b][k]) for k, v in self.opt.state[a].items())
                   for a, b in params)


def _through_file(obj, weights_only=True):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def _resume(name, sd, options, k=3):
    """A fresh optimizer (other parameter values, default options) that loads ``sd`` taken after
    ``k`` steps and catches up with the model values of the run that made it."""
    r = Run(name, seed=1, **options)
    r.opt.load_state_dict(sd)
    r.k = k
    return r


@pytest.mark.parametrize("name,options", CONFIGS)
def test_state_dict_loads_with_weights_only_and_resumes_bit_identically(name, options):
    full = Run(name, 6, **options)
    half = Run(name, 3, **options)
    sd = _through_file(half.opt.state_dict())  # torch.load's default, weights_only=True
    with torch.no_grad():
        resumed = _resume(name, sd, options)
        for p, q in zip(resumed.model.parameters(), half.model.parameters()):
            p.copy_(q)
    assert resumed.step(3).same_as(full)
    st = next(iter(sd["state"].values()))
    assert _optim.is_step_tensor(st["step"]) and int(st["step"]) == 3
    assert all(torch.is_tensor(v) for v in st.values())  # what torch.distributed.checkpoint takes
    if "lr" in options:
        assert torch.is_tensor(resumed.opt.param_groups[0]["lr"])


def test_default_clip_lambda_is_saved_as_its_name_and_restored():
    r = Run("SAVEUS", 2, clip_gradients=True)
    sd = r.opt.state_dict()
    assert [g["clip_lambda"] for g in sd["param_groups"]] == ["refopt.registry.clip_lambda_default"] * 2
    assert r.opt.param_groups[0]["clip_lambda"] is registry.clip_lambda_default  # the live group keeps it
    other = Run("SAVEUS", clip_lambda=None)
    other.opt.load_state_dict(sd)
    assert all(g["clip_lambda"] is registry.clip_lambda_default for g in other.opt.param_groups)


def test_a_users_clip_lambda_is_not_saved_and_must_be_given_again():
    full = Run("SAVEUS", 6, clip_gradients=True, clip_lambda=my_clip)
    half = Run("SAVEUS", 3, clip_gradients=True, clip_lambda=my_clip)
    sd = _through_file(half.opt.state_dict())
    assert sd["param_groups"][0]["clip_lambda"] == f"not saved: {__name__}.my_clip"
    plain = Run("SAVEUS", seed=1)
    snap = copy.deepcopy(plain.opt.state_dict())
    with pytest.raises(ValueError, match="my_clip.*construct this optimizer with that clip_lambda"):
        plain.opt.load_state_dict(sd)
    assert plain.opt.state_dict() == snap  # unchanged
    resumed = Run("SAVEUS", seed=1, clip_lambda=my_clip)
    resumed.opt.load_state_dict(sd)
    with torch.no_grad():
        for p, q in zip(resumed.model.parameters(), half.model.parameters()):
            p.copy_(q)
    resumed.k = 3
    assert resumed.step(3).same_as(full)
    renamed = Run("SAVEUS", seed=1, clip_lambda=other_clip)
    with pytest.warns(UserWarning, match="keeping this optimizer's .*other_clip"):
        renamed.opt.load_state_dict(sd)
    assert renamed.opt.param_groups[0]["clip_lambda"] is other_clip


def _as_format_1(sd):
    """What refopt 1.0 saved: tag /1, int steps, the callable clip_lambda."""
    old = copy.deepcopy(sd)
    for g in old["param_groups"]:
        g["refopt_format"] = g["refopt_format"].replace("/2", "/1")
        if "clip_lambda" in g:
            g["clip_lambda"] = registry.clip_lambda_default
    for st in old["state"].values():
        st["step"] = int(st["step"])
    return old


def _as_public_code(name, sd):
    """The original code's state_dict: no tag, no refopt options, int steps, DOPE's mask."""
    old = _as_format_1(sd)
    for g in old["param_groups"]:
        for k in ("refopt_format", *_optim.GROUP_OPTIONS):
            del g[k]
    for st in old["state"].values():
        if name == "DOPE":
            st["mask"] = torch.ones_like(st["exp_avg"])
    return old


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("form", ["format 1", "public code"])
def test_older_state_dicts_load_and_resume_bit_identically(name, form):
    full, half = Run(name, 6), Run(name, 3)
    sd = half.opt.state_dict()
    old = _as_format_1(sd) if form == "format 1" else _as_public_code(name, sd)
    kept = copy.deepcopy(old)
    resumed = _resume(name, old, {})
    assert old.keys() == kept.keys() and [g.keys() for g in old["param_groups"]] == [g.keys() for g in kept["param_groups"]]
    assert all(st.keys() == kept["state"][k].keys() for k, st in old["state"].items())  # not modified
    with torch.no_grad():
        for p, q in zip(resumed.model.parameters(), half.model.parameters()):
            p.copy_(q)
    assert resumed.step(3).same_as(full)
    assert resumed.opt.state_dict()["param_groups"][0]["refopt_format"] == f"refopt.torch.{name}/2"
    assert {k: resumed.opt.param_groups[0][k] for k in _optim.GROUP_OPTIONS} == _optim.GROUP_OPTIONS


@pytest.mark.parametrize("name", OPTS)
def test_options_a_saved_group_lacks_are_filled_as_torch_does(name):
    """torch's test_can_load_older_state_dict deletes the flags newer than a class; each is
    filled with its default and the optimizer steps."""
    r = Run(name, 2, foreach=False)
    sd = copy.deepcopy(r.opt.state_dict())
    for g in sd["param_groups"]:
        for flag in ("foreach", "maximize", "differentiable", "capturable", "fused"):
            g.pop(flag, None)
    r.opt.load_state_dict(sd)
    assert all(g["foreach"] is None and g["maximize"] is False and g["differentiable"] is False
               for g in r.opt.param_groups)
    r.step(1)


def _edited(name, edit):
    sd = copy.deepcopy(Run(name, 2).opt.state_dict())
    edit(sd)
    return sd


def _set(where, key, value):
    where[key] = value


EDITS = {
    "future format": lambda sd: _set(sd["param_groups"][0], "refopt_format", "refopt.torch.DOPE/3"),
    "other optimizer's tag": lambda sd: _set(sd["param_groups"][0], "refopt_format", "refopt.torch.SAVEUS/2"),
    "missing hyperparameter": lambda sd: sd["param_groups"][1].pop("eps"),
    "invalid hyperparameter": lambda sd: _set(sd["param_groups"][0], "betas", (1.0, 0.9)),
    "maximize": lambda sd: _set(sd["param_groups"][0], "maximize", True),
    "tensor lr of 2 elements": lambda sd: _set(sd["param_groups"][0], "lr", torch.ones(2)),
    "fractional step": lambda sd: _set(sd["state"][0], "step", 2.5),
    "negative step": lambda sd: _set(sd["state"][0], "step", torch.tensor(-1)),
    "step of shape (1,)": lambda sd: _set(sd["state"][0], "step", torch.tensor([2])),
    "buffer shape": lambda sd: _set(sd["state"][0], "fim", torch.zeros(2)),
    "extra state key": lambda sd: _set(sd["state"][1], "mask", torch.zeros(6)),  # with a tag: not the public form
    "no tag, not the reference's names": lambda sd: [g.pop(k) for g in sd["param_groups"] for k in ("refopt_format", "gamma")],
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_bad_or_foreign_state_dict_is_refused_and_changes_nothing(edit):
    sd = _edited("DOPE", EDITS[edit])
    r = Run("DOPE", 1, seed=3)
    snap = copy.deepcopy(r.opt.state_dict())
    with pytest.raises(ValueError):
        r.opt.load_state_dict(sd)
    now = r.opt.state_dict()
    assert now["param_groups"] == snap["param_groups"]
    assert all(torch.equal(v, snap["state"][i][k]) for i, st in now["state"].items() for k, v in st.items())


def test_torch_adam_state_is_refused():
    adam = torch.optim.Adam([{"params": g["params"]} for g in Run("DOPE").opt.param_groups])
    with pytest.raises(ValueError, match="not from refopt.torch"):
        Run("SAVEUS").opt.load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", OPTS)
def test_distributed_checkpoint_round_trip(name, tmp_path):
    """torch.distributed.checkpoint (one process, no process group): get_state_dict, dcp.save,
    dcp.load into a fresh model and optimizer, set_state_dict; the resumed run is the original's."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    full, half = Run(name, 5, lr=torch.tensor(3e-3)), Run(name, 3, lr=torch.tensor(3e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        model_sd, optim_sd = get_state_dict(half.model, half.opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
        fresh = Run(name, seed=2, lr=torch.tensor(1.0))
        model_sd, optim_sd = get_state_dict(fresh.model, fresh.opt)  # (takes a zero-lr step first)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(tmp_path))
        set_state_dict(fresh.model, fresh.opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    fresh.k = 3
    assert fresh.step(2).same_as(full)
    assert float(fresh.opt.param_groups[0]["lr"]) == pytest.approx(3e-3)


@pytest.mark.parametrize("name", OPTS)
def test_init_state_creates_step_zero_state_without_a_step(name):
    """init_state() is S0/D0 for every parameter that trains (and has no state yet): torch's
    checkpoint helpers then find state and take no zero-gradient step of their own."""
    r = Run(name)
    frozen = r.model[2].bias
    frozen.requires_grad_(False)
    before = [p.detach().clone() for p in r.model.parameters()]
    r.opt.init_state()
    assert frozen not in r.opt.state
    for p, b in zip(r.model.parameters(), before):
        assert torch.equal(p, b)
        st = r.opt.state.get(p)
        if p is not frozen:
            assert _optim.is_step_tensor(st["step"]) and int(st["step"]) == 0
            assert all(torch.equal(v, torch.zeros_like(p)) for k, v in st.items() if k != "step")
    frozen.requires_grad_(True)
    assert r.step(2).same_as(Run(name, 2))  # the steps after it are a fresh optimizer's
