"""The torch.optim.Optimizer machinery shared by refopt.torch.SAVEUS and refopt.torch.DOPE:
hyperparameters validated by the core, checks before any write, state, state_dict format."""
from __future__ import annotations

import contextlib
import math

import torch

from . import _kernels as K
from . import _plan

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FORMAT_KEY = "refopt_format"
FORMAT_VERSION = 1


class TorchOptimizer(torch.optim.Optimizer):
    """Base class: ``Core`` is the refopt optimizer that validates a group's hyperparameters and
    defines its semantics; ``BUFFERS`` are the state buffers after ``step``, in the core's order."""

    Core: type
    BUFFERS: tuple[str, ...]

    def __init__(self, params, hparams: dict, *, profile="reference", quirks=None, foreach=None,
                 cpu_threads=1):
        if cpu_threads is not None and (isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int)
                                        or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be None or a positive int, got {cpu_threads!r}")
        self._cpu_threads = cpu_threads
        defaults = dict(hparams, profile=profile, quirks=quirks, foreach=foreach)
        self._core(defaults)  # raises before torch sees the parameters
        defaults[FORMAT_KEY] = self._format_tag()
        self._scratch = _plan.Scratch()
        super().__init__(params, defaults)

    def __setstate__(self, state):  # unpickling / deepcopy: the scratch is not part of the state
        super().__setstate__(state)
        self._scratch = _plan.Scratch()
        self.__dict__.setdefault("_cpu_threads", 1)

    # ---- hyperparameters -------------------------------------------------------------------
    @classmethod
    def _format_tag(cls, version=FORMAT_VERSION) -> str:
        return f"refopt.torch.{cls.Core.name}/{version}"

    def _core(self, group: dict):
        """The core optimizer for ``group``'s values: the core's validation, errors and all."""
        foreach = group.get("foreach")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        hp = {k: group[k] for k, _ in self.Core.DEFAULTS if k in group}
        return self.Core(**hp, profile=group.get("profile", "reference"), quirks=group.get("quirks"))

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = dict(getattr(self, "defaults", {}), **{k: v for k, v in param_group.items() if k != "params"})
        self._core(merged)  # a group with its own hyperparameters is validated like the defaults
        param_group = dict(param_group)
        param_group[FORMAT_KEY] = self._format_tag()
        super().add_param_group(param_group)

    # ---- step ------------------------------------------------------------------------------
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()``'s loss (the
        closure runs under ``torch.enable_grad()``). Every group is checked before anything is
        written, so a step that raises leaves all parameters and state as they were."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        jobs = [job for group in self.param_groups for job in self._prepare(group)]
        on_cpu = any(p.device.type == "cpu" for job in jobs for p in job[2])
        with torch.no_grad(), _cpu_threads(on_cpu, self._cpu_threads):
            for job in jobs:
                self._run(*job)
        return loss

    def _prepare(self, group):
        """Checks and step scalars for ``group``: (core, foreach, params, t) buckets, no writes."""
        core = self._core(group)
        buckets = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check(p)
            st = self.state.get(p)
            t = (st["step"] if st else 0) + 1
            buckets.setdefault((p.device, p.dtype, t), []).append(p)
        foreach = group["foreach"] is not False
        return [(core, foreach, ps, t, self._scalars(core, t, dev, dt)) for (dev, dt, t), ps in buckets.items()]

    def _check(self, p):
        grad, name = p.grad, self.Core.name
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(f"refopt.torch.{name} does not support sparse gradients")
        if p.dtype not in FLOATS:
            raise TypeError(f"refopt.torch.{name}: parameter dtype must be float16, bfloat16, float32 "
                            f"or float64, got {p.dtype}")
        if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
            raise ValueError(f"refopt.torch.{name}: grad ({grad.dtype}, {tuple(grad.shape)}, {grad.device}) "
                             f"does not match its parameter ({p.dtype}, {tuple(p.shape)}, {p.device})")
        st = self.state.get(p)
        if st:
            self._check_state(st, p.shape, p)

    def _check_state(self, st, shape, p=None):
        name = self.Core.name
        if set(st) != {"step", *self.BUFFERS}:
            raise ValueError(f"refopt.torch.{name}: parameter state has keys {sorted(st)}, expected "
                             f"{['step', *self.BUFFERS]} (is it another optimizer's state?)")
        if isinstance(st["step"], bool) or not isinstance(st["step"], int) or st["step"] < 0:
            raise ValueError(f"refopt.torch.{name}: state['step'] must be a non-negative int, got {st['step']!r}")
        for k in self.BUFFERS:
            b = st[k]
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != tuple(shape):
                what = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"refopt.torch.{name}: state[{k!r}] is {what} but the parameter has shape {tuple(shape)}")
            if p is not None and (b.dtype != p.dtype or b.device != p.device):
                raise ValueError(f"refopt.torch.{name}: state[{k!r}] is {b.dtype} on {b.device} but the "
                                 f"parameter is {p.dtype} on {p.device}")

    def _run(self, core, foreach, params, t, scalars):
        for p in params:
            if not self.state.get(p):  # S0/D0
                st = self.state[p]
                st["step"] = 0
                for k in self.BUFFERS:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        live = [p for p in params if p.numel()]  # A6: empty tensors only count the step
        if live:
            states = [self.state[p] for p in live]
            self._update(core, foreach, live, [p.grad for p in live], states, scalars)
        for p in params:
            self.state[p]["step"] = t

    def _scalars(self, core, t, device, dtype):  # pragma: no cover - overridden
        raise NotImplementedError

    def _update(self, core, foreach, params, grads, states, scalars):  # pragma: no cover - overridden
        raise NotImplementedError

    def scratch_bytes(self) -> int:
        """Bytes of the reusable scratch buffers this optimizer holds (beyond its state)."""
        return self._scratch.nbytes()

    # ---- state_dict ------------------------------------------------------------------------
    def load_state_dict(self, state_dict) -> None:
        """torch's load, after checking that ``state_dict`` comes from this optimizer class in
        this format version, with valid hyperparameters and state matching the parameters."""
        name, want = self.Core.name, self._format_tag()
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"refopt.torch.{name}.load_state_dict: expected a dict with 'state' and "
                             "'param_groups' (from state_dict())")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"refopt.torch.{name}.load_state_dict: {len(groups)} parameter groups "
                             f"saved, {len(self.param_groups)} in this optimizer")
        for saved, mine in zip(groups, self.param_groups):
            got = saved.get(FORMAT_KEY)
            if got != want:
                raise ValueError(
                    f"refopt.torch.{name}.load_state_dict: the state dict is "
                    + (f"format {got!r}" if got else "not from refopt.torch (no format tag)")
                    + f"; this optimizer reads {want!r}")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"refopt.torch.{name}.load_state_dict: a saved group has "
                                 f"{len(saved['params'])} parameters, this one {len(mine['params'])}")
            self._core(saved)
            for pid, p in zip(saved["params"], mine["params"]):
                st = state_dict["state"].get(pid)
                if st:
                    self._check_state(st, p.shape)
        super().load_state_dict(state_dict)


def bias_scalars(core, t: int) -> dict:
    """S3/D5 in float64 (A4): ``1 - b**t`` and their square roots."""
    b1, b2 = core.betas
    bc1, bc2 = K.one_minus_pow(b1, t), K.one_minus_pow(b2, t)
    return {"bc1": bc1, "bc2": bc2, "bc1_sqrt": math.sqrt(bc1), "bc2_sqrt": math.sqrt(bc2)}


@contextlib.contextmanager
def _cpu_threads(active: bool, n):
    """CPU ops on ``n`` intra-op threads for the duration of a step (default 1), then torch's
    setting again; ``n=None`` leaves torch's setting alone (then no row blocking, see _plan).

    The step is ~35 ops per cache-sized block (_plan.row_blocks); with several threads every op
    is a parallel region that waits for all of them, which stalls when the cores are shared with
    other work (4096x4096 DOPE, 2 threads, one core busy elsewhere: 3.5 s a step). One thread on
    blocks is faster than several threads on whole tensors, which are bound by memory bandwidth
    (same machine, idle: 0.11 s against 0.26 s), and does not stall."""
    old = torch.get_num_threads()
    if not active or n is None or old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
