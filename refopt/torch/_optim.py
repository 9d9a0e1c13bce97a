"""The torch.optim.Optimizer machinery shared by refopt.torch.SAVEUS and refopt.torch.DOPE:
hyperparameters validated by the core, checks before any write, state, state_dict format."""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings

import torch

from .. import _docs, registry
from .._optimizer import bind_hparams
from . import _fused
from . import _kernels as K
from . import _plan, _sharded

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FORMAT_KEY = "refopt_format"
#: 2: ``step`` is a 0-d int64 CPU tensor and ``state_dict()`` names ``clip_lambda`` by a string.
#: 1 (refopt 1.0): ``step`` a Python int and ``clip_lambda`` the callable itself. Both load.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
#: What ``state_dict()`` stores for SAVEUS's default ``clip_lambda`` (registry.clip_lambda_default)
CLIP_DEFAULT = "refopt.registry.clip_lambda_default"
#: ... and, followed by its module and name, for a user's own callable, which is not saved
CLIP_NOT_SAVED = "not saved: "
#: Group options, with the value a saved group without them gets (as torch's __setstate__ does)
GROUP_OPTIONS = {"profile": "reference", "quirks": None, "foreach": None, "maximize": False,
                 "differentiable": False}
#: Flags torch.optim optimizers take that refopt.torch accepts only as False, and why
REFUSED_FLAGS = {
    "maximize": "the specification defines minimization; minimize the negated objective instead",
    "differentiable": "the step updates parameters and state in place under torch.no_grad(), so no "
                      "gradient flows through it",
}


ADAPTER_NOTES = """
    Differences from the original PyTorch code, all deliberate:

    * ``p.grad`` is left untouched (the original centralizes, normalizes and clips it in place);
      the processed gradient is built in the optimizer's scratch buffers.
    * Hyperparameters are validated (spec/errors.md), also for groups added later and at each
      step (a scheduler may have changed them); sparse gradients raise RuntimeError.
    * A step checks every group before writing anything, so a step that raises leaves all
      parameters and state unchanged.

    As a torch.optim optimizer:

    * ``lr`` may be a float or a 1-element tensor, as torch.optim accepts it (a scheduler then
      writes into the tensor); any other tensor raises ``ValueError("Tensor lr must be
      1-element")``. A CPU tensor is read on the host at each step, which is no device sync, and
      gives the same result as a float of its value. A tensor on the parameters' GPU is applied by
      tensor operations on the GPU, without a host sync (within an ulp of the float path per
      operation); its value is checked (finite, >= 0) when the group is created, added or loaded,
      not at each step.
    * ``opt.state[p]`` holds the reference's buffers and ``step``, a 0-d int64 tensor on the CPU
      (torch's own optimizers keep a float32 one, which stops counting at 2**24; reading a CPU
      tensor is no device sync). A step count given as an int, a whole float or a 0-d tensor of
      any dtype is accepted and converted.
    * ``state_dict()`` loads with ``torch.load(weights_only=True)``: SAVEUS's default
      ``clip_lambda`` is stored as the string ``"refopt.registry.clip_lambda_default"`` and
      restored on load. A ``clip_lambda`` of your own is code, not state, and is **not saved**
      (only its name, as ``"not saved: module.name"``): construct the optimizer that loads with
      the same ``clip_lambda=``; ``load_state_dict`` raises ValueError if it has none, and warns if
      its name differs.
    * ``state_dict()`` carries a format tag (param group key ``refopt_format``, now
      ``refopt.torch.<NAME>/2``). ``load_state_dict`` reads format 2, format 1 (refopt 1.0: int
      ``step``) and the original public code's state (no tag, int ``step``; DOPE's ``mask`` is
      dropped, it is recomputed every step); it fills the options a saved group lacks
      (``foreach``, ``maximize``, ``differentiable``, ``profile``, ``quirks``) as torch's
      optimizers do, and rejects another optimizer's state, another format, a group without one
      of the hyperparameters, or state that does not match the parameters, with ValueError and
      before changing anything.
    * ``maximize`` and ``differentiable`` are accepted as False only (ValueError for True):
      the specification defines minimization (minimize the negated objective instead), and the
      step updates in place under ``torch.no_grad()``.
    * ``torch.compile``: a compiled function that calls ``opt.step()`` compiles everything but
      the step, which runs eagerly (a graph break: the step plans its work on the host), so the
      results are those of eager mode; ``fullgraph=True`` cannot include it. For one graph,
      compile the core's pure step: ``torch.compile(refopt.DOPE().step, fullgraph=True)``.

    The fused path. A plain, contiguous CPU parameter is stepped by one compiled kernel: the
    core's own clause functions traced and compiled to C (refopt.fused; built with the system C
    compiler on first use and cached in ``~/.cache/refopt/kernels``); a CUDA parameter by Triton
    kernels of the same schedule (one launch per sweep; triton ships with CUDA builds of torch;
    compiled on first use, ~1-3 s per kernel, and cached by Triton). It reads the gradient once
    per sweep over the tensor (one sweep for SAVEUS with per-channel normalization, three for
    DOPE: its D3 norm and D12 count are whole-tensor), writes the parameter and state in place,
    keeps no temporary of the parameter's size, and computes per element what the core computes
    (sums in another order); on CUDA without a host sync, a tensor ``lr`` included. ``fused``
    (default None: where possible; True: raise if a parameter cannot be fused, e.g. on a device
    other than CPU and CUDA, or without a C compiler / triton; False: never) chooses; otherwise,
    or for a ``clip_lambda`` that is not arithmetic on its argument, parameters take the eager
    kernels (``torch._foreach_*`` ops in the reference's order).

    Options: ``profile`` and ``quirks`` as in the core; ``foreach`` (eager kernels: None or True
    group small tensors into multi-tensor ``torch._foreach_*`` calls; False, one tensor at a
    time; the results are the same on CPU); ``cpu_threads`` (default None: torch's setting,
    ``torch.get_num_threads()``): the threads of a CPU step, for the fused kernels and the eager
    ops alike (with an int the step sets ``torch.set_num_threads`` for its duration and restores
    it after; with 1 the eager kernels process large tensors in cache-sized blocks of rows). The
    eager kernels keep reusable scratch buffers (``scratch_bytes()``); they are not state.

    Parameters may be float16, bfloat16, float32 or float64, on any device; parameters whose
    ``grad`` is None are skipped; empty parameters only count the step (A6).

    Sharded parameters (``DTensor``: FSDP2's ``fully_shard``, tensor parallelism, HSDP) are
    stepped on their local shards with every per-tensor statistic global over the mesh (partial
    sums all-reduced, nothing gathered); their state buffers are DTensors laid out like them, which
    ``torch.distributed.checkpoint`` saves sharded. Before torch's ``get_state_dict`` on an
    optimizer that has not stepped, call ``init_state()``: torch would create the state by a
    zero-gradient step with lr=0, which counts. See backends/README.md.
"""


_OPTIONS = (("profile", "reference"), ("quirks", None), ("foreach", None), ("maximize", False),
            ("differentiable", False), ("cpu_threads", None), ("fused", None))


class TorchOptimizer(torch.optim.Optimizer):
    """Base class: ``Core`` is the refopt optimizer that validates a group's hyperparameters and
    defines its semantics; ``BUFFERS`` are the state buffers after ``step``, in the core's order;
    ``PUBLIC_SCRATCH`` the per-parameter entries the original code keeps that refopt recomputes
    each step (dropped when its state is loaded). A subclass's signature and docstring are built
    from the registry (refopt.registry)."""

    Core: type
    BUFFERS: tuple[str, ...]
    PUBLIC_SCRATCH: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Core" in cls.__dict__:
            cls.BUFFERS = cls.Core.facts.buffers
            cls._STATE_KEYS = frozenset(("step", *cls.BUFFERS))
            cls.__init__ = _make_init(cls)
            cls.__doc__ = _class_doc(cls)

    def _setup(self, params, hparams: dict, *, cpu_threads=None, fused=None, **options):
        if cpu_threads is not None and (isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int)
                                        or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be None or a positive int, got {cpu_threads!r}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        self._cpu_threads = cpu_threads
        self._fused = fused
        defaults = dict(hparams, **options)
        self._core(defaults)  # raises before torch sees the parameters
        defaults[FORMAT_KEY] = self._format_tag()
        self._scratch = _plan.Scratch()
        super().__init__(params, defaults)
        if fused:
            _fused.check_required(self.param_groups)

    def __getstate__(self):  # pickling, deepcopy: torch keeps defaults, state, groups; and this
        return dict(super().__getstate__(), _cpu_threads=self._cpu_threads, _fused=self._fused)

    def __setstate__(self, state):
        """Unpickling, deepcopy and load_state_dict: options a group lacks are filled, step
        counts become fresh 0-d int64 CPU tensors; the scratch is not part of the state."""
        super().__setstate__(state)
        self._scratch = _plan.Scratch()
        self.__dict__.setdefault("_cpu_threads", None)
        self.__dict__.setdefault("_fused", None)
        where = f"refopt.torch.{self.Core.facts.name}"
        for group in self.param_groups:
            for k, v in GROUP_OPTIONS.items():
                group.setdefault(k, v)
            group[FORMAT_KEY] = self._format_tag()
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = step_tensor(step_count(st["step"], where))

    # ---- hyperparameters -------------------------------------------------------------------
    @classmethod
    def _format_tag(cls, version=FORMAT_VERSION) -> str:
        return f"refopt.torch.{cls.Core.facts.name}/{version}"

    def _core(self, group: dict, *, read_device: bool = True):
        """The core optimizer for ``group``'s values: the core's validation, errors and all.
        A tensor ``lr`` is checked for its shape always and for its value where reading it is
        free (a CPU tensor) or ``read_device`` (a group being set up or loaded)."""
        name = self.Core.facts.name
        foreach = group.get("foreach")
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
        for flag, why in REFUSED_FLAGS.items():
            value = group.get(flag, False)
            if value is not False:
                if not isinstance(value, bool):
                    raise TypeError(f"{flag} must be True or False, got {value!r}")
                raise ValueError(f"refopt.torch.{name} does not support {flag}=True: {why}")
        hp = {h.name: group[h.name] for h in self.Core.facts.hparams if h.name in group}
        if isinstance(hp.get("lr"), torch.Tensor):
            lr = tensor_lr_value(hp["lr"], name, read_device)
            hp["lr"] = self.Core.facts.hparam("lr").default if lr is None else lr
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
    @torch._disable_dynamo  # under torch.compile: a graph break, the step itself runs eagerly
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
        """Checks and step scalars for ``group``: (core, foreach, params, t, scalars) buckets,
        no writes."""
        core = self._core(group, read_device=False)
        buckets = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            sharded = _sharded.is_dtensor(p)
            t = self._check(p, sharded) + 1
            buckets.setdefault((p.device, p.dtype, t, sharded), []).append(p)
        foreach = group.get("foreach") is not False
        jobs = []
        for (dev, _, t, sharded), ps in buckets.items():
            if sharded:  # DTensors: the core's update on local shards, its lr read on the host
                jobs.append((self._core(group), foreach, ps, t, None))
            else:
                jobs.append((core, foreach, ps, t, self._scalars(core, t, step_lr(group["lr"], dev))))
        return jobs

    def _check(self, p, sharded: bool) -> int:
        """Raises on what the step cannot take; returns the parameter's step count so far.
        ``sharded``: whether ``p`` is a DTensor. (Per parameter and step: kept cheap.)"""
        grad, name = p.grad, self.Core.facts.name
        if sharded or _sharded.is_dtensor(grad):
            _sharded.check(p, f"refopt.torch.{name}")
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(f"refopt.torch.{name} does not support sparse gradients")
        if p.dtype not in FLOATS:
            raise TypeError(f"refopt.torch.{name}: parameter dtype must be float16, bfloat16, float32 "
                            f"or float64, got {p.dtype}")
        if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
            raise ValueError(f"refopt.torch.{name}: grad ({grad.dtype}, {tuple(grad.shape)}, {grad.device}) "
                             f"does not match its parameter ({p.dtype}, {tuple(p.shape)}, {p.device})")
        st = self.state.get(p)
        return self._check_state(st, p.shape, p) if st else 0

    def _check_state(self, st, shape, p=None) -> int:
        """Raises unless ``st`` is this optimizer's state for a parameter of ``shape`` (and, given
        ``p``, of its dtype and device); returns its step count."""
        name = self.Core.facts.name
        if st.keys() != self._STATE_KEYS:
            raise ValueError(f"refopt.torch.{name}: parameter state has keys {sorted(st)}, expected "
                             f"{['step', *self.BUFFERS]} (is it another optimizer's state?)")
        t = step_count(st["step"], f"refopt.torch.{name}")
        for k in self.BUFFERS:
            b = st[k]
            if not isinstance(b, torch.Tensor) or b.shape != shape:
                what = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"refopt.torch.{name}: state[{k!r}] is {what} but the parameter has shape {tuple(shape)}")
            if p is not None and (b.dtype != p.dtype or b.device != p.device):
                raise ValueError(f"refopt.torch.{name}: state[{k!r}] is {b.dtype} on {b.device} but the "
                                 f"parameter is {p.dtype} on {p.device}")
        return t

    def _init_state(self, p) -> None:
        """S0/D0 for ``p`` if it has no state: step 0 and zero buffers laid out like ``p``."""
        if not self.state.get(p):
            st = self.state[p]
            st["step"] = step_tensor(0)
            for k in self.BUFFERS:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state (step 0, zero buffers) of every parameter that has none, without a step.

        Call it before ``torch.distributed.checkpoint.state_dict.get_state_dict`` (or
        ``get_optimizer_state_dict``/``set_optimizer_state_dict``) on an optimizer that has not
        stepped yet: torch otherwise creates the state by a real ``step()`` with zero gradients and
        lr=0, which counts as step 1 (the first real step then uses t=2) and, with ``eps=0``, turns
        the parameters NaN (the reference's 0/0; refopt computes that step as specified)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:  # as torch's checkpoint initialisation chooses them
                    self._init_state(p)

    def _run(self, core, foreach, params, t, scalars):
        """One step of ``params`` (one device, dtype and count); ``scalars`` None: DTensors."""
        for p in params:
            self._init_state(p)
        state_of = {id(p): self.state[p] for p in params}  # one lookup each (hashing a tensor is slow)
        live = [p for p in params if p.numel()]  # A6 (a DTensor's numel is global): only count the step
        if live and scalars is None:  # DTensors: the core on local shards, reductions global
            _sharded.update(core, live, [state_of[id(p)] for p in live], self.BUFFERS, t,
                            f"refopt.torch.{self.Core.facts.name}")
            live = []
        if live and self._fused is not False:
            rest = _fused.step(core, live, [p.grad for p in live], [state_of[id(p)] for p in live], self.BUFFERS,
                               t, scalars["lr"], torch.get_num_threads(), bool(self._fused))
            live = [live[i] for i in rest]
        if live:
            states = [state_of[id(p)] for p in live]
            self._update(core, foreach, live, [p.grad for p in live], states, scalars)
        counts = []
        for st in state_of.values():
            if is_step_tensor(st["step"]):
                counts.append(st["step"])
            else:  # a hand-set count (an int, a float tensor): replaced in refopt's form
                st["step"] = step_tensor(t)
        if counts:
            torch._foreach_add_(counts, 1)

    def _scalars(self, core, t: int, lr):  # pragma: no cover - overridden
        """The step scalars (see _kernels): floats, and ``lr`` as step_lr gives it."""
        raise NotImplementedError

    def _update(self, core, foreach, params, grads, states, scalars):  # pragma: no cover - overridden
        raise NotImplementedError

    def scratch_bytes(self) -> int:
        """Bytes of the reusable scratch buffers this optimizer holds (beyond its state)."""
        return self._scratch.nbytes()

    # ---- state_dict ------------------------------------------------------------------------
    def state_dict(self):
        """torch's state_dict, in format 2 (see the class docstring): per-parameter tensors and a
        0-d tensor ``step``, and ``clip_lambda`` as a string, so that the checkpoint loads with
        ``torch.load(weights_only=True)``; a user's own ``clip_lambda`` is not saved."""
        sd = super().state_dict()
        for group in sd["param_groups"]:  # fresh dicts (torch packs copies of the groups)
            if "clip_lambda" in group:
                group["clip_lambda"] = saved_clip_lambda(group["clip_lambda"])
        return sd

    def load_state_dict(self, state_dict) -> None:
        """torch's load, after checking that ``state_dict`` comes from this optimizer class (in
        format 2 or 1, or from the original public code), with valid hyperparameters and state
        matching the parameters. Nothing changes when it raises; ``state_dict`` is not modified."""
        name = self.Core.facts.name
        where = f"refopt.torch.{name}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (from state_dict())")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        public = [self._saved_format(saved, where) is None for saved in saved_groups]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: {len(saved_groups)} parameter groups saved, "
                             f"{len(self.param_groups)} in this optimizer")
        groups, state = [], dict(saved_state)
        for saved, mine, from_public_code in zip(saved_groups, self.param_groups, public):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"{where}: a saved group has {len(saved['params'])} parameters, "
                                 f"this one {len(mine['params'])}")
            missing = [h.name for h in self.Core.facts.hparams if h.name not in saved]
            if missing:
                raise ValueError(f"{where}: a saved group lacks the hyperparameter(s) {', '.join(missing)}")
            group = dict(GROUP_OPTIONS, **saved)
            group[FORMAT_KEY] = self._format_tag()
            if "clip_lambda" in group:
                group["clip_lambda"] = loaded_clip_lambda(group["clip_lambda"], mine.get("clip_lambda"), where)
            self._core(group)
            for pid, p in zip(saved["params"], mine["params"]):
                st = state.get(pid)
                if st and from_public_code and any(k in st for k in self.PUBLIC_SCRATCH):
                    st = state[pid] = {k: v for k, v in st.items() if k not in self.PUBLIC_SCRATCH}
                if st:
                    self._check_state(st, p.shape)
            groups.append(group)
        super().load_state_dict(dict(state_dict, state=state, param_groups=groups))

    def _saved_format(self, group, where):
        """The format version of a saved group, or None for the original public code's state
        (no tag, the reference's hyperparameter names); ValueError for anything else."""
        want = f"refopt.torch.{self.Core.facts.name}/"
        tag = group.get(FORMAT_KEY)
        readable = " or ".join(self._format_tag(v) for v in READ_VERSIONS)
        if tag is None:
            if all(h.name in group for h in self.Core.facts.hparams):
                return None
            raise ValueError(f"{where}: the state dict is not from refopt.torch (no format tag) nor from "
                             f"the original {self.Core.facts.name} (its groups lack some of its "
                             f"hyperparameters); this optimizer reads {readable}")
        version = tag[len(want):] if isinstance(tag, str) and tag.startswith(want) else None
        if version not in {str(v) for v in READ_VERSIONS}:
            raise ValueError(f"{where}: the state dict is format {tag!r}; this optimizer reads {readable}")
        return int(version)


def tensor_lr_value(lr, name: str, read_device: bool):
    """A tensor ``lr``'s value as a float for the core's validation: 1-element and real, or
    ValueError/TypeError as torch.optim raises them. Read when on the CPU (no device sync) or
    when ``read_device``; None for a tensor on another device at a step (no host sync then)."""
    if lr.numel() != 1:
        raise ValueError(f"refopt.torch.{name}: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if lr.dtype.is_complex or lr.dtype == torch.bool:
        raise TypeError(f"refopt.torch.{name}: lr must be a real number or a 1-element real tensor, "
                        f"got a {lr.dtype} tensor")
    if lr.device.type == "cpu" or read_device:
        return float(lr)
    return None


def step_lr(lr, device):
    """The learning rate as the kernels take it for parameters on ``device``: a float read on the
    host from a number or a CPU tensor (no device sync), else a 0-d float64 tensor on ``device``
    (no host sync). A non-CPU tensor lr with CPU parameters is read (one sync per step)."""
    if not isinstance(lr, torch.Tensor):
        return float(lr)
    if lr.device.type == "cpu" or device.type == "cpu":
        return float(lr)
    return lr.detach().reshape(()).to(device=device, dtype=torch.float64)


def step_tensor(n: int):
    """``step`` as refopt.torch keeps it: a 0-d int64 tensor on the CPU."""
    return torch.tensor(n, dtype=torch.int64)


def is_step_tensor(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.dim() == 0
            and value.device.type == "cpu")


def step_count(value, where: str) -> int:
    """A step count as an int: from a 0-d tensor (refopt's int64; torch's float32 too), an int
    (refopt 1.0, the original code) or a whole float (``tensor.item()`` of torch's); ValueError
    for anything else or a negative count."""
    if is_step_tensor(value):
        value = int(value)
    elif isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{where}: state['step'] must be a 0-d real tensor or a number, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value) or value < 0:
        raise ValueError(f"{where}: state['step'] must be a non-negative whole number, got {value!r}")
    return int(value)


def _callable_name(fn) -> str:
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def saved_clip_lambda(fn):
    """``clip_lambda`` as state_dict() stores it: None, CLIP_DEFAULT for the default, or, for a
    user's callable, which is code and not saved, ``"not saved: module.name"``."""
    if fn is None or isinstance(fn, str):
        return fn
    if fn is registry.clip_lambda_default:
        return CLIP_DEFAULT
    return CLIP_NOT_SAVED + _callable_name(fn)


def loaded_clip_lambda(saved, current, where: str):
    """The ``clip_lambda`` a loaded group gets: the default for CLIP_DEFAULT; for a callable
    that was not saved, the loading group's own (ValueError when it has none, a warning when its
    name differs); a callable or None as it is (format 1, the original code, in memory)."""
    if not isinstance(saved, str):
        return saved
    if saved == CLIP_DEFAULT:
        return registry.clip_lambda_default
    if not saved.startswith(CLIP_NOT_SAVED):
        raise ValueError(f"{where}: clip_lambda {saved!r} is neither {CLIP_DEFAULT!r} nor a callable")
    name = saved[len(CLIP_NOT_SAVED):]
    if not callable(current) or current is registry.clip_lambda_default:
        raise ValueError(f"{where}: the state dict was saved with clip_lambda={name}, a callable that "
                         "state_dict() does not save; construct this optimizer with that clip_lambda "
                         "before loading")
    if _callable_name(current) != name:
        warnings.warn(f"{where}: the state dict was saved with clip_lambda={name}; keeping this "
                      f"optimizer's {_callable_name(current)}", UserWarning, stacklevel=3)
    return current


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

    # Run eagerly inside a compiled function too: Dynamo loses attributes that __init__ sets on a
    # new object around the graph break of torch's (disabled) add_param_group.
    @torch._disable_dynamo
    def __init__(self, params, *args, profile="reference", quirks=None, foreach=None, maximize=False,
                 differentiable=False, cpu_threads=None, fused=None, **hparams):
        values = bind_hparams(facts, args, hparams, f"refopt.torch.{facts.name}()")
        self._setup(params, values, profile=profile, quirks=quirks, foreach=foreach, maximize=maximize,
                    differentiable=differentiable, cpu_threads=cpu_threads, fused=fused)

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
               "    maximize, differentiable (False): accepted as False only (see below).\n"
               "    cpu_threads (int | None, default None): threads for a CPU step (see below).\n"
               "    fused (bool | None, default None): the compiled CPU/CUDA kernels (see below).")
    parts = [head, "    params: an iterable of tensors or of parameter-group dicts, as for any torch.optim "
                   "optimizer.", _docs.args_section(facts, extra=options),
             _docs.update_section(facts, cls.Core.UPDATE), _docs.state_section(facts).replace(
                 f"State: {facts.name}State(", "State per parameter (``opt.state[p]``): ("),
             _docs.reference_notes(facts), inspect.cleandoc(ADAPTER_NOTES)]
    return "\n\n".join(p for p in parts if p)
