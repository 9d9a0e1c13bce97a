"""The torch.optim.Optimizer machinery shared by refopt.torch.SAVEUS and refopt.torch.DOPE:
hyperparameters validated by the core, checks before any write, state, state_dict format."""
from __future__ import annotations

import contextlib
import inspect
import math

import torch

from .. import _docs
from .._optimizer import bind_hparams
from . import _kernels as K
from . import _plan

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FORMAT_KEY = "refopt_format"
FORMAT_VERSION = 1


ADAPTER_NOTES = """
    Differences from the original PyTorch code, all deliberate:

    * ``p.grad`` is left untouched (the original centralizes, normalizes and clips it in place);
      the processed gradient is built in the optimizer's scratch buffers.
    * Hyperparameters are validated (spec/errors.md), also for groups added later and at each
      step (a scheduler may have changed them); sparse gradients raise RuntimeError.
    * A step checks every group before writing anything, so a step that raises leaves all
      parameters and state unchanged.
    * ``state_dict()`` carries a format tag (param group key ``refopt_format``);
      ``load_state_dict`` rejects another optimizer's or another version's state with ValueError.

    Options: ``profile`` and ``quirks`` as in the core; ``foreach`` (None or True: group small
    tensors into multi-tensor ``torch._foreach_*`` calls; False: one tensor at a time; the
    results are the same on CPU); ``cpu_threads`` (default 1). On CPU a step runs its ops on
    ``cpu_threads`` intra-op threads (it calls ``torch.set_num_threads`` for the step's duration
    and restores the setting after; ``cpu_threads=None`` leaves torch's setting alone, which
    suits machines with many cores, where one thread cannot use the memory bandwidth) and processes
    large tensors in blocks of rows that stay in cache: faster than whole-tensor ops on all
    threads, which are bound by memory bandwidth, and immune to the stalls of many short
    parallel regions on a busy machine. Per element nothing changes (the trailing-axis reductions are per row), only DOPE's
    whole-tensor D3 norm is summed block by block. The optimizer keeps reusable scratch buffers
    (``scratch_bytes()``: one tensor's worth for DOPE's processed gradient plus a few blocks);
    they are not part of the state.

    Parameters may be float16, bfloat16, float32 or float64, on any device; parameters whose
    ``grad`` is None are skipped; empty parameters only count the step (A6).
"""


_OPTIONS = (("profile", "reference"), ("quirks", None), ("foreach", None), ("cpu_threads", 1))


class TorchOptimizer(torch.optim.Optimizer):
    """Base class: ``Core`` is the refopt optimizer that validates a group's hyperparameters and
    defines its semantics; ``BUFFERS`` are the state buffers after ``step``, in the core's order.
    A subclass's signature and docstring are built from the registry (refopt.registry)."""

    Core: type
    BUFFERS: tuple[str, ...]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Core" in cls.__dict__:
            cls.BUFFERS = cls.Core.facts.buffers
            cls.__init__ = _make_init(cls)
            cls.__doc__ = _class_doc(cls)

    def _setup(self, params, hparams: dict, *, profile="reference", quirks=None, foreach=None,
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
        return f"refopt.torch.{cls.Core.facts.name}/{version}"

    def _core(self, group: dict):
        """The core optimizer for ``group``'s values: the core's validation, errors and all."""
        foreach = group.get("foreach")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        hp = {h.name: group[h.name] for h in self.Core.facts.hparams if h.name in group}
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
        grad, name = p.grad, self.Core.facts.name
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
        name = self.Core.facts.name
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
        name, want = self.Core.facts.name, self._format_tag()
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


def _make_init(cls):
    facts = cls.Core.facts

    def __init__(self, params, *args, profile="reference", quirks=None, foreach=None, cpu_threads=1, **hparams):
        values = bind_hparams(facts, args, hparams, f"refopt.torch.{facts.name}()")
        self._setup(params, values, profile=profile, quirks=quirks, foreach=foreach, cpu_threads=cpu_threads)

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    params += [P(h.name, P.POSITIONAL_OR_KEYWORD, default=h.default) for h in facts.hparams]
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in _OPTIONS]
    __init__.__signature__ = inspect.Signature(params)
    __init__.__qualname__ = f"{cls.__name__}.__init__"
    return __init__


def _class_doc(cls) -> str:
    facts = cls.Core.facts
    head = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    options = ("    foreach (None | bool): group small tensors into multi-tensor torch._foreach_* calls "
               "(None, True) or step one tensor at a time (False).\n"
               "    cpu_threads (int | None, default 1): intra-op threads for a CPU step (see below).")
    parts = [head, "    params: an iterable of tensors or of parameter-group dicts, as for any torch.optim "
                   "optimizer.", _docs.args_section(facts, extra=options),
             _docs.update_section(facts, cls.Core.UPDATE), _docs.state_section(facts).replace(
                 f"State: {facts.name}State(", "State per parameter (``opt.state[p]``): ("),
             _docs.ZERO_GRADIENT_NOTE]
    if facts.key == "dope":
        parts.append(_docs.DOPE_DECAY_NOTE)
    parts.append(inspect.cleandoc(ADAPTER_NOTES))
    return "\n\n".join(p for p in parts if p)
