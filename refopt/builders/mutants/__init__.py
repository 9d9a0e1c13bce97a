"""Deliberately broken ports: refopt's core with ONE plausible porting mistake each.

A mutant replaces clause functions or named operations of the core by name, never its text: the
core's update resolves the names of its clause functions (``normalize``, ``fisher_estimates``,
``acts``, ``Arithmetic``, ...) in its module's namespace, and a mutant optimizer is the core class
with its ``step`` and ``_update`` re-bound to a copy of those namespaces in which the named entries
are replaced (``relinked``). Reformatting or renaming inside a clause cannot disarm a mutant; a
renamed clause function makes building the mutant fail loudly. ``"Arithmetic.round"`` replaces one
named operation of A3/A4.

The mistakes live beside what they break: ``common.py`` for rules A1-A6 (and both optimizers'
shared clauses), ``saveus.py`` for S0-S10, ``dope.py`` for D0-D14; quirk mutants flip one switch of
spec/quirks.md. ``CATALOGUE`` covers every clause and quirk id (a test checks it), each mutant is
rejected by some vector (``refopt check --self-test``), and the diagnosis of a failing port names
the mutant whose trajectory the port follows.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np

from ... import _optimizer
from ... import common as core_common
from ... import dope as core_dope
from ... import saveus as core_saveus
from ..._arithmetic import Arithmetic
from ...registry import OPTIMIZERS

#: The modules whose namespaces a mutant's names are resolved in.
CORE_MODULES = (_optimizer, core_common, core_saveus, core_dope)
CORE_CLASSES = {"saveus": core_saveus.SAVEUS, "dope": core_dope.DOPE}


@dataclass(frozen=True)
class Mutant:
    name: str
    optimizer: str            # "saveus" | "dope"
    breaks: tuple             # the clause and quirk ids whose rule the mistake breaks
    mistake: str              # what the port does, as a sentence fragment
    #: () -> {name: replacement}: clause functions (by their name in the core modules), or
    #: "Arithmetic.<method>" for one named operation. A factory, so replacements that share
    #: state (a value one clause sees and a later one uses) start fresh for each optimizer.
    replaces: Callable[[], dict] | None = None
    #: quirk flips: the quirks whose setting the port has the opposite of (spec/quirks.md)
    quirks: tuple = ()
    #: dtypes where the mistake can show at all (empty: every dtype)
    only: tuple = field(default=())

    @property
    def clause(self) -> str:
        return ", ".join(self.breaks)


def relinked(cls, replacements: dict, modules=CORE_MODULES) -> type:
    """A subclass of the core class ``cls`` whose ``step`` and ``_update`` run with the names in
    ``replacements`` bound to the given objects, in every core module's namespace."""
    replacements = dict(replacements)
    ops_methods = {k.split(".", 1)[1]: replacements.pop(k) for k in list(replacements) if k.startswith("Arithmetic.")}
    for method in ops_methods:
        if not callable(getattr(Arithmetic, method, None)):
            raise RuntimeError(f"mutant: Arithmetic has no operation {method!r}")
    if ops_methods:
        replacements["Arithmetic"] = type("MutantArithmetic", (Arithmetic,), ops_methods)
    spaces = {m.__name__: dict(vars(m)) for m in modules}
    copies = {}
    for m in modules:
        for name, obj in vars(m).items():
            if isinstance(obj, types.FunctionType) and obj.__module__ == m.__name__:
                copies[obj] = _rebind(obj, spaces[m.__name__])
    for space in spaces.values():
        for name, obj in list(space.items()):
            if isinstance(obj, types.FunctionType) and obj in copies:
                space[name] = copies[obj]
    missing = [n for n in replacements if not any(n in s for s in spaces.values())]
    if missing:
        raise RuntimeError(f"mutant: no core function named {missing[0]!r} (renamed? update the mutant)")
    for space in spaces.values():
        for name, obj in replacements.items():
            if name in space:
                space[name] = obj
    methods = {"_update": _rebind(cls._update, spaces[cls._update.__module__]),
               "step": _rebind(_optimizer.Optimizer.step, spaces[_optimizer.__name__])}
    return type(f"{cls.__name__}Mutant", (cls,), methods)


def _rebind(fn, namespace):
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


def _catalogue():
    from .common import MUTANTS as common_mistakes
    from .dope import MUTANTS as dope_mistakes
    from .saveus import MUTANTS as saveus_mistakes

    return (*common_mistakes, *saveus_mistakes, *dope_mistakes)


CATALOGUE: tuple[Mutant, ...] = _catalogue()
BY_NAME = {m.name: m for m in CATALOGUE}
if len(BY_NAME) != len(CATALOGUE):  # pragma: no cover - caught when the catalogue is edited
    raise RuntimeError("mutant names must be unique")


def mutant_class(name: str, modules=CORE_MODULES):
    """The core optimizer class with mutant ``name``'s replacements (a new class per call, so
    replacements that share state start fresh)."""
    m = BY_NAME[name]
    cls = CORE_CLASSES[m.optimizer]
    if modules is not CORE_MODULES:
        cls = next(getattr(mod, cls.__name__) for mod in modules if hasattr(mod, cls.__name__))
    if m.replaces is None:
        return cls
    return relinked(cls, m.replaces(), modules)


@lru_cache(maxsize=None)
def _checked(name: str):
    """Build each mutant once eagerly, so a mutant that no longer applies fails at first use."""
    return mutant_class(name)


def make_optimizer(name: str, hparams: dict, quirks: dict | None = None, profile: str = "reference"):
    """Mutant ``name`` on top of ``quirks`` (default: those of ``profile``), its flips applied."""
    m = BY_NAME[name]
    _checked(name)
    from ...quirks import Quirks

    settings = Quirks.for_profile(profile, quirks).as_dict()
    for q in m.quirks:
        settings[q] = not settings[q]
    return mutant_class(name)(**hparams, quirks=settings)


def port_function(name: str):
    """Mutant ``name`` as a python-port function ``fn(optimizer, param, grad, state, hparams)``.
    One optimizer per configuration, built at its first step (building relinks the core)."""
    m = BY_NAME[name]
    facts = OPTIMIZERS[m.optimizer]
    built = {}

    def fn(optimizer, param, grad, state, hparams):
        if optimizer != m.optimizer:
            raise ValueError(f"mutant {name} implements {m.optimizer}, not {optimizer}")
        key = repr(sorted(hparams.items()))
        opt = built.get(key)
        if opt is None:
            opt = built[key] = make_optimizer(name, hparams)
        st = opt.State(step=np.asarray(state["step"]), **{k: state[k] for k in facts.buffers})
        p, new = opt.step(param, grad, st)
        return p, dict(new.items(), step=int(new.step))

    fn.__name__ = name
    fn.__doc__ = f"{m.clause}: {m.mistake}"
    return fn


def __getattr__(attr):
    """``refopt.builders.mutants:NAME`` works as a python port (``refopt check --port``)."""
    if attr in BY_NAME:
        return port_function(attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
