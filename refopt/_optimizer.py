"""What SAVEUS and DOPE share: hyperparameters from the registry, profiles, ``init`` and the
checked ``step``. A subclass declares its registry facts, its state type and its update."""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

from . import _docs, _sharded, _validate
from ._arrays import device_of, dtype_name, namespace
from .common import empty_tensor_step
from .quirks import Quirks
from .registry import DTYPES, OptimizerFacts

_OPTIONS = (("profile", "reference"), ("quirks", None), ("check_finite", False))


class Optimizer:
    """Immutable description of an optimizer: hyperparameters plus quirk settings.

    ``init(param)`` and ``step(param, grad, state)`` are pure; the object holds no arrays, so a
    bound ``step`` can be handed to ``jax.jit`` or ``torch.compile`` as it is."""

    facts: OptimizerFacts
    State: type
    #: (clause id, function) in the order the update runs them: the docstring's "Update" table.
    UPDATE: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "facts" in cls.__dict__:  # an optimizer (not a derived variant): signature and docs
            cls.__init__ = _make_init(cls)
            cls.__doc__ = _class_doc(cls)

    def _setup(self, hparams: dict, profile, quirks, check_finite):
        values = {h.name: h.validate(h.name, hparams[h.name]) for h in self.facts.hparams}
        setattr_ = object.__setattr__
        setattr_(self, "_hparams", values)
        setattr_(self, "quirks", Quirks.for_profile(profile, quirks))
        setattr_(self, "profile", profile)
        setattr_(self, "_quirk_overrides", dict(quirks or {}))
        setattr_(self, "check_finite", _validate.flag("check_finite", check_finite))

    @property
    def name(self) -> str:
        return self.facts.name

    def __getattr__(self, key):
        try:
            return self.__dict__["_hparams"][key]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError(f"refopt.{self.facts.name} is immutable: use opt.replace({key}=...) for a copy "
                             f"with another value")

    @property
    def hparams(self) -> dict:
        """The hyperparameters, by the reference's names (a copy)."""
        return dict(self._hparams)

    def replace(self, **changes) -> "Optimizer":
        """A copy with some hyperparameters (or ``profile``/``quirks``/``check_finite``) changed.

        The quirks given when this optimizer was built stay overrides of the (possibly new)
        profile: ``opt.replace(profile="documented")`` is the documented profile with them."""
        kw = dict(self._hparams, profile=self.profile, quirks=self._quirk_overrides or None,
                  check_finite=self.check_finite)
        kw.update(changes)
        return type(self)(**kw)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams.items())
        extra = f", quirks={self._quirk_overrides!r}" if self._quirk_overrides else ""
        return f"refopt.{self.facts.name}({args}, profile={self.profile!r}{extra})"

    def __eq__(self, other):
        return (type(other) is type(self) and other._hparams == self._hparams
                and other.quirks == self.quirks and other.check_finite == self.check_finite)

    def __hash__(self):
        try:
            return hash((type(self), tuple(self._hparams.items()), self.quirks, self.check_finite))
        except TypeError:  # an unhashable hyperparameter (a custom clip_lambda object)
            return id(self)

    def init(self, param):
        """S0/D0: step 0 and zero buffers in ``param``'s namespace, dtype and device."""
        xp = namespace(param)
        if dtype_name(param.dtype) not in DTYPES:
            raise TypeError(f"{self.facts.name}.init: param dtype must be one of {', '.join(DTYPES)}, "
                            f"got {dtype_name(param.dtype)}")
        zeros = [xp.zeros_like(param) for _ in self.facts.buffers]
        return self.State(xp.asarray(0, device=device_of(param)), *zeros)

    def step(self, param, grad, state):
        """One update; returns ``(new_param, new_state)``. The inputs are never modified.

        A torch ``DTensor`` param (FSDP2, tensor parallelism), with grad and buffers laid out like
        it, is stepped on its local shards with every per-tensor reduction global over the mesh
        (refopt._sharded); the new param and buffers are DTensors laid out as the inputs."""
        xp = _validate.step_inputs(self.facts.name, self.State, param, grad, state)
        if _sharded.is_dtensor(param, grad, *state):  # checked and stepped on its local shards
            return _sharded.step(self, param, grad, state)
        self._check_values(xp, param, grad, state)
        if math.prod(param.shape) == 0:  # A6
            return empty_tensor_step(xp, param, state)
        return self._update(param, grad, state)

    def _check_values(self, xp, param, grad, state):
        """``check_finite``'s checks (they read values: a host sync), else the step count's range
        where reading it is free."""
        if self.check_finite:
            _validate.finite_inputs(self.facts.name, xp, param, grad, state)
        else:
            _validate.host_step_count(self.facts.name, state)

    def _update(self, param, grad, state, xp=None):  # pragma: no cover - overridden
        raise NotImplementedError


def count_step(ops, step):
    """S0 <saveus.md#s0>, D0 <dope.md#d0>: step' = step + 1 and t = step + 1 in the scalar dtype."""
    return ops.xp.asarray(step + 1), ops.step_count(step)


def _signature(cls, leading=()) -> inspect.Signature:
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in leading]
    params += [P(h.name, P.POSITIONAL_OR_KEYWORD, default=h.default) for h in cls.facts.hparams]
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in _OPTIONS]
    return inspect.Signature(params)


def bind_hparams(facts: OptimizerFacts, args: tuple, kwargs: dict, where: str) -> dict:
    """Positional and keyword hyperparameters -> {name: value} with the registry's defaults;
    TypeError naming an unknown or repeated one."""
    names = [h.name for h in facts.hparams]
    if len(args) > len(names):
        raise TypeError(f"{where} takes at most {len(names)} positional hyperparameters, got {len(args)}")
    values = dict(zip(names, args))
    for k in kwargs:
        if k in values:
            raise TypeError(f"{where} got multiple values for hyperparameter {k!r}")
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise TypeError(f"{where} got an unexpected hyperparameter {unknown[0]!r}; known: {', '.join(names)}")
    values.update(kwargs)
    return {h.name: values.get(h.name, h.default) for h in facts.hparams}


def _make_init(cls):
    facts = cls.facts

    def __init__(self, *args, profile: str = "reference", quirks: Mapping[str, bool] | None = None,
                 check_finite: bool = False, **hparams: Any):
        values = bind_hparams(facts, args, hparams, f"{facts.name}()")
        self._setup(values, profile, quirks, check_finite)

    __init__.__signature__ = _signature(cls, ("self",))
    __init__.__qualname__ = f"{cls.__name__}.__init__"
    return __init__


def _class_doc(cls) -> str:
    facts = cls.facts
    head = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    options = ("    check_finite (bool, default False): raise ValueError before a step whose param, grad or "
               "state holds NaN/inf or whose step count is out of range (reads values: a host sync).")
    parts = [head, _docs.args_section(facts, extra=options), _docs.update_section(facts, cls.UPDATE),
             _docs.state_section(facts), _docs.reference_notes(facts), _example(facts)]
    return "\n\n".join(p for p in parts if p)


def _example(facts) -> str:
    return f"""Example:
    >>> import numpy as np
    >>> import refopt
    >>> opt = refopt.{facts.name}(lr=1e-3)
    >>> param = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    >>> state = opt.init(param)
    >>> param, state = opt.step(param, np.cos(param), state)   # pure: returns new arrays
    >>> int(state.step), param.shape
    (1, (2, 3))"""
