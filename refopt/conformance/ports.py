"""The kinds of port `refopt check --port` checks: a ``torch.optim.Optimizer`` class, an optax
factory, or a Python function on NumPy arrays (conformance/PORTING.md). refopt's own backends are
in ``backends.py``."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import numpy as np

from .. import registry
from .backends import torch_backend
from .encoding import np_dtype
from .targets import STATE_NAMES, ConfigError, PortFailure, SkipVector, call_port, checked_output


def load_object(spec: str, kind: str):
    """``MODULE:NAME`` -> the object; ConfigError naming what is missing."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr or ":" in attr:
        raise ConfigError(f"--port {kind}:{spec}: expected {kind}:MODULE:NAME")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"--port {kind}:{spec}: cannot import module {mod_name!r} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a module that fails while importing
        raise ConfigError(f"--port {kind}:{spec}: importing {mod_name!r} raised "
                          f"{type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--port {kind}:{spec}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def rename(hparams: dict, mapping: dict[str, str]) -> dict:
    """Reference names -> the port's names (``--hparam-map lr=learning_rate``)."""
    return {mapping.get(k, k): v for k, v in hparams.items()}


def parse_hparam_map(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        old, sep, new = item.strip().partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConfigError(f"--hparam-map {text!r}: expected OLD=NEW[,OLD=NEW...]")
        out[old.strip()] = new.strip()
    return out


def _fresh_or_given(vector):
    """S0/D0: a fresh state is step 0 with zero buffers."""
    if vector.state0 is not None:
        return dict(vector.state0)
    zeros = {k: np.zeros(vector.shape, np_dtype(vector.dtype)) for k in STATE_NAMES[vector.optimizer]}
    return dict(zeros, step=0)


class PythonPort:
    """``FUNCTION(optimizer, param, grad, state, hparams) -> (new_param, new_state)`` on NumPy."""

    kind = "python"

    def __init__(self, spec: str, fn: Callable | None = None, hparam_map: dict | None = None):
        self.spec = f"python:{spec}"
        self.name = self.spec
        self.fn = fn if fn is not None else load_object(spec, "python")
        if not callable(self.fn):
            raise ConfigError(f"--port {self.spec}: {spec.split(':')[-1]!r} is not callable")
        self.hparam_map = hparam_map or {}

    def skip_reason(self, vector) -> str | None:
        return None

    def run(self, vector) -> list[Output]:
        h = rename(vector.optimizer_hparams(), self.hparam_map)
        p, state = np.array(vector.param0), _fresh_or_given(vector)
        out = []
        for k, s in enumerate(vector.steps):
            res = call_port(self.name, self.fn, vector.optimizer, p.copy(), np.array(s.grad), dict(state), dict(h))
            if not (isinstance(res, tuple) and len(res) == 2 and hasattr(res[1], "keys")):
                raise PortFailure(f"step {k + 1}: {self.name} must return (new_param, new_state dict), "
                                  f"got {type(res).__name__}")
            o = checked_output(vector, k, res[0], {n: res[1][n] for n in res[1].keys() if n != "step"},
                               where=self.name, count=res[1].get("step"))
            p, state = o.param, dict(o.state, step=res[1].get("step", state.get("step", 0)))
            out.append(o)
        return out


class TorchPort:
    """A ``torch.optim.Optimizer`` subclass built as ``CLASS([param], **hyperparameters)``."""

    kind = "torch"

    def __init__(self, spec: str, cls=None, hparam_map: dict | None = None):
        self.spec = f"torch:{spec}"
        self.name = self.spec
        try:
            import torch
        except ImportError:
            raise ConfigError(f"--port {self.spec}: torch is not installed") from None
        self.torch = torch
        self.cls = cls if cls is not None else load_object(spec, "torch")
        if not (isinstance(self.cls, type) and issubclass(self.cls, torch.optim.Optimizer)):
            raise ConfigError(f"--port {self.spec}: {self.cls!r} is not a torch.optim.Optimizer subclass")
        self.hparam_map = hparam_map or {}
        self.backend = torch_backend("cpu")

    def skip_reason(self, vector) -> str | None:
        return None

    def run(self, vector) -> list[Output]:
        torch, b = self.torch, self.backend
        h = rename(vector.optimizer_hparams(), self.hparam_map)
        p = torch.nn.Parameter(b.to(np.array(vector.param0)))
        opt = call_port(self.name, self.cls, [p], **h)
        if vector.state0 is not None:
            self._restore(opt, p, vector)
        out = []
        for k, s in enumerate(vector.steps):
            p.grad = b.to(np.array(s.grad))  # a fresh tensor: many ports modify p.grad in place
            call_port(self.name, opt.step)
            st = opt.state.get(p, {})
            names = [n for n in STATE_NAMES[vector.optimizer] if torch.is_tensor(st.get(n))]
            out.append(checked_output(vector, k, _np(p, b), {n: _np(st[n], b) for n in names},
                                      where=self.name, count=st.get("step")))
        return out

    def _restore(self, opt, p, vector):
        """A throwaway zero-gradient step lets the port create its own state (some keep extra
        entries); then p and the named entries are overwritten, 'step' keeping the port's type."""
        torch, b = self.torch, self.backend
        p.grad = torch.zeros_like(p)
        call_port(self.name, opt.step)
        with torch.no_grad():
            p.copy_(b.to(np.array(vector.param0)))
        st = opt.state[p]
        for name, value in vector.state0.items():
            if name == "step":
                old = st.get("step")
                st["step"] = (torch.tensor(float(value), dtype=old.dtype, device=old.device)
                              if torch.is_tensor(old) else type(old or 0)(value))
            else:
                st[name] = b.to(np.array(value))
        p.grad = None


def _np(x, b):
    try:
        return b.back(x)
    except Exception as exc:  # noqa: BLE001
        raise PortFailure(f"cannot read a tensor back: {exc}") from None


class OptaxPort:
    """An optax ``GradientTransformation`` from ``FACTORY(**hyperparameters)``.

    The factory gets the reference's names after ``--hparam-map``; when it takes ``learning_rate``
    and no ``lr``, ``lr`` is passed as ``learning_rate``. Vectors that start from a given state need
    a state pytree holding a NamedTuple with the reference's buffer names (and ``step`` or
    ``count``); otherwise they are skipped with that reason."""

    kind = "optax"

    def __init__(self, spec: str, factory=None, hparam_map: dict | None = None):
        self.spec = f"optax:{spec}"
        self.name = self.spec
        try:
            import jax

            jax.config.update("jax_enable_x64", True)
            import optax  # noqa: F401
        except ImportError:
            raise ConfigError(f"--port {self.spec}: jax and optax are not installed") from None
        self.factory = factory if factory is not None else load_object(spec, "optax")
        if not callable(self.factory):
            raise ConfigError(f"--port {self.spec}: {spec.split(':')[-1]!r} is not callable")
        self.hparam_map = dict(hparam_map or {})
        try:
            params = inspect.signature(self.factory).parameters
            if "learning_rate" in params and "lr" not in params and "lr" not in self.hparam_map:
                self.hparam_map["lr"] = "learning_rate"
        except (TypeError, ValueError):
            pass

    def skip_reason(self, vector) -> str | None:
        return None

    def run(self, vector) -> list[Output]:
        import jax.numpy as jnp
        import optax

        tx = call_port(self.name, self.factory, **rename(vector.optimizer_hparams(), self.hparam_map))
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise PortFailure(f"{self.name} did not return an optax GradientTransformation (got {type(tx).__name__})")
        p = jnp.asarray(vector.param0)
        state = call_port(self.name, tx.init, p)
        if vector.state0 is not None:
            state = inject_state(state, vector.state0, jnp.asarray)
            if state is None:
                raise SkipVector("its optax state exposes none of the reference's state names, so a given "
                            "state cannot be injected")
        out = []
        for k, s in enumerate(vector.steps):
            updates, state = call_port(self.name, tx.update, jnp.asarray(s.grad), state, p)
            p = call_port(self.name, optax.apply_updates, p, updates)
            found = find_named(state, STATE_NAMES[vector.optimizer])
            named = {n: np.asarray(getattr(found, n)) for n in STATE_NAMES[vector.optimizer]} if found else {}
            count = next((getattr(found, c) for c in ("step", "count") if found and c in found._fields), None)
            out.append(checked_output(vector, k, np.asarray(p), named, where=self.name, count=count))
        return out


def find_named(tree, names) -> Any:
    """The first NamedTuple in an optax state holding every name in ``names``."""
    if hasattr(tree, "_fields") and all(n in tree._fields for n in names):
        return tree
    if isinstance(tree, (tuple, list)):
        for item in tree:
            found = find_named(item, names)
            if found is not None:
                return found
    return None


def inject_state(tree, state0: dict, to) -> Any:
    """``tree`` with the NamedTuple holding the reference's names replaced by ``state0``."""
    names = [k for k in state0 if k != "step"]
    if hasattr(tree, "_fields") and all(n in tree._fields for n in names):
        fields = {n: to(np.asarray(state0[n])) for n in names}
        for counter in ("step", "count"):
            if counter in tree._fields:
                old = getattr(tree, counter)
                fields[counter] = to(np.asarray(int(state0["step"]), dtype=np.asarray(old).dtype))
        return tree._replace(**fields)
    if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
        items = list(tree)
        for i, item in enumerate(items):
            new = inject_state(item, state0, to)
            if new is not None:
                items[i] = new
                return type(tree)(items)
    return None


PORT_KINDS = {"python": PythonPort, "torch": TorchPort, "optax": OptaxPort}


def make_port(text: str, hparam_map: dict | None = None, optimizers=None):
    """``torch:MODULE:CLASS`` / ``optax:MODULE:FACTORY`` / ``python:MODULE:FUNCTION`` -> target.

    A python port is told the optimizer on every call, so it takes the vectors of both. A torch
    class or optax factory implements one: the one its name contains, else ``optimizers``."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in PORT_KINDS:
        raise ConfigError(f"--port {text!r}: expected one of {', '.join(k + ':MODULE:NAME' for k in PORT_KINDS)}")
    port = PORT_KINDS[kind](rest, hparam_map=hparam_map)
    port.optimizers = tuple(optimizers) if optimizers else None
    if kind != "python" and not optimizers:
        named = [o for o in STATE_NAMES if o in rest.rpartition(":")[2].lower()]
        if len(named) != 1:
            raise ConfigError(f"--port {text}: cannot tell from its name whether it implements SAVEUS or "
                              f"DOPE; add --optimizer saveus or --optimizer dope")
        port.optimizers = tuple(named)
    return port
