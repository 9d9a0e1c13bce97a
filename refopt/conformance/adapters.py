"""The Python port kinds, run in this process: a ``torch.optim.Optimizer`` class, an optax factory
or a step function on NumPy arrays (conformance/PORTING.md).

Each adapter runs one protocol ``Case`` and yields a ``StepResult`` per step: the port's
parameter and the state it exposes under the reference's names, in whatever dtype it produced,
plus notes and faults it observed (an input modified in place). It raises ``PortFailure`` when
the port raises or returns something unusable, ``SkipVector`` when the case cannot be given to it.
`refopt check` serves these adapters from a worker process (``worker.py``) so that nothing a port
does can end or corrupt the run; the pytest helpers call them directly.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np

from .encoding import np_dtype
from .protocol import Case, StepResult, hparams_from_json
from .targets import STATE_NAMES, ConfigError, PortFailure, SkipVector, call_port, step_count

KINDS = ("torch", "optax", "python")
#: The torch device a torch port's parameters are created on (default cpu); `refopt check --device` sets it.
DEVICE_VARIABLE = "REFOPT_TORCH_DEVICE"
#: Constructor/function parameters through which a port takes refopt's profile and quirks.
CONFIG_NAMES = ("profile", "quirks")


def load_object(spec: str, kind: str):
    """``MODULE:NAME`` or ``path/to/file.py:NAME`` (``NAME`` may be dotted) -> the object.

    The current folder is importable, as it is for ``python -m``; a file's own folder is too, so
    it can import its neighbours. ConfigError (one line) for anything that goes wrong, including a
    module that calls ``sys.exit`` while it is imported."""
    where = f"--port {kind + ':' if kind else ''}{spec}"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"{where}: expected {kind or 'KIND'}:MODULE:NAME or {kind or 'KIND'}:path/to/file.py:NAME")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import_file(target, where) if _is_path(target) else _import_module(target, where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(name: str, where: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {name!r} ({exc})") from None
    except BaseException as exc:  # noqa: BLE001 - whatever a module does while it is imported
        raise ConfigError(f"{where}: importing {name!r} {_raised(exc)}") from None


def _import_file(target: str, where: str):
    path = pathlib.Path(target)
    if not path.is_file():
        raise ConfigError(f"{where}: no such file {target!r}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001
        del sys.modules[name]
        raise ConfigError(f"{where}: importing {target!r} {_raised(exc)}") from None
    return module


def _raised(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return f"raised {type(exc).__name__}: {exc}"


def infer_kind(obj) -> str:
    """The kind of a port named without ``torch:``/``optax:``/``python:``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
        return "torch"
    try:
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if callable(obj) and not isinstance(obj, type) and len(params) >= 5:
        return "python"
    raise ConfigError(f"cannot tell what kind of port {getattr(obj, '__qualname__', obj)!r} is; "
                      f"write torch:, optax: or python: before it")


def accepted(fn, skip: tuple = ()) -> tuple[frozenset | None, bool]:
    """(the keyword names ``fn`` takes, or None when it takes any; whether it takes ``quirks``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None, False
    names = frozenset(n for n, p in params.items()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip)
    anything = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return (None if anything else names - frozenset(CONFIG_NAMES)), "quirks" in params


def infer_optimizers(name: str) -> tuple | None:
    """The optimizer a class or factory implements, from its name (``MyDOPE`` -> dope)."""
    named = [o for o in STATE_NAMES if o in name.lower()]
    return tuple(named) if len(named) == 1 else None


class Adapter:
    """What every adapter has: a kind, a name, what it tells the runner in its hello."""

    kind = "?"

    def __init__(self, name: str):
        self.name = name
        self.optimizers: tuple | None = None
        self.hparams: frozenset | None = None  # names the constructor takes (None: any)
        self.configurable = False

    def hello(self) -> dict:
        h = None if self.hparams is None else {o: self.hparams for o in (self.optimizers or STATE_NAMES)}
        return {"name": self.name, "optimizers": self.optimizers, "hparams": h, "configurable": self.configurable}

    def config(self, case: Case) -> dict:
        return {"profile": case.profile, "quirks": dict(case.quirks)} if self.configurable else {}

    def run(self, case: Case) -> Iterator[StepResult]:  # pragma: no cover - abstract
        raise NotImplementedError


# -- plain Python / NumPy step functions ---------------------------------------------------------

class PythonAdapter(Adapter):
    """``FUNCTION(optimizer, param, grad, state, hparams) -> (new_param, new_state)`` on NumPy.

    Every call gets fresh, writable copies. The function must not write into them (conformance
    rule 2) unless ``in_place`` says it updates param and state in place, as a torch optimizer
    does; writing into the gradient is then a note. It may return its state as a dict, any
    mapping or a NamedTuple; the next call gets the same kind of container, with every entry the
    port returned (its own extras too)."""

    kind = "python"

    def __init__(self, name: str, fn: Callable, in_place: bool = False):
        super().__init__(name)
        if not callable(fn):
            raise ConfigError(f"--port {name}: {name.rpartition(':')[2]!r} is not callable")
        self.fn, self.in_place = fn, in_place
        _, self.configurable = accepted(fn)
        try:
            params = inspect.signature(fn).parameters
            self.kwargs = tuple(n for n in CONFIG_NAMES if n in params)
        except (TypeError, ValueError):
            self.kwargs = ()

    def run(self, case: Case) -> Iterator[StepResult]:
        names = STATE_NAMES[case.optimizer]
        h = hparams_from_json(case.hparams)
        config = {k: v for k, v in self.config(case).items() if k in self.kwargs}
        param = case.param.copy()
        state = dict(case.state) if case.state is not None else dict(
            {n: np.zeros(case.shape, np_dtype(case.dtype)) for n in names}, step=0)
        container = dict
        for k, grad in enumerate(case.grads):
            p_in, g_in = param.copy(), grad.copy()
            s_in = {n: _fresh(v) for n, v in state.items()}
            handed = {"param": (p_in, p_in.copy()), "grad": (g_in, g_in.copy())}
            handed.update({f"state[{n!r}]": (v, v.copy()) for n, v in s_in.items() if isinstance(v, np.ndarray)})
            res = call_port(self.name, self.fn, case.optimizer, p_in, g_in, container(**s_in)
                            if container is not dict else s_in, dict(h), **config)
            new_param, new_state = _unpack(res, k, self.name)
            notes, faults = self._writes(handed, k)
            mapping = _as_mapping(new_state, k, self.name)
            out = _as_array(new_param, k, self.name, "param")
            buffers = {n: _as_array(mapping[n], k, self.name, f"state[{n!r}]") for n in names if n in mapping}
            count = None if mapping.get("step") is None else step_count(mapping["step"], k, self.name)
            yield StepResult(out, buffers, count, tuple(notes), tuple(faults))
            # the next call gets the port's own values, in the case's dtype (a wider result is
            # judged only when exact in it, so nothing is lost)
            want = np_dtype(case.dtype)
            param = out.astype(want)
            state = dict(mapping, **{n: b.astype(want) for n, b in buffers.items()})
            container = type(new_state) if hasattr(new_state, "_fields") else dict

    def _writes(self, handed: dict, k: int) -> tuple[list, list]:
        notes, faults = [], []
        for what, (given, pristine) in handed.items():
            if _same_bits(given, pristine):
                continue
            if self.in_place and what != "grad":
                continue
            text = f"step {k + 1}: the port wrote into its input {what}"
            if self.in_place:
                notes.append(text + " (declared --in-place: noted, not failed)")
            else:
                faults.append(text + " (spec conformance rule 2: a step function must not modify its inputs; "
                              "return new arrays, or declare --in-place if it updates param and state in "
                              "place as a torch optimizer does)")
        return notes, faults


def _fresh(value):
    """A writable copy of one state entry (arrays copied; anything else as it is)."""
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        return np.array(value, copy=True)
    return value


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _unpack(res, k: int, where: str):
    if isinstance(res, (tuple, list)) and len(res) == 2:
        return res
    what = f"a {type(res).__name__} of length {len(res)}" if isinstance(res, (tuple, list)) else \
        f"{type(res).__name__}"
    raise PortFailure(f"step {k + 1}: {where} returned {what}; expected a pair (new_param, new_state)")


def _as_mapping(state, k: int, where: str) -> dict:
    if hasattr(state, "_asdict"):
        return dict(state._asdict())
    if isinstance(state, Mapping):
        return dict(state)
    if hasattr(state, "keys") and hasattr(state, "__getitem__"):
        try:
            return {n: state[n] for n in state.keys()}
        except Exception as exc:  # noqa: BLE001 - anything a port returns must be readable
            raise PortFailure(f"step {k + 1}: {where} returned a state that cannot be read ({exc})") from None
    raise PortFailure(f"step {k + 1}: {where} returned a new_state of type {type(state).__name__}; expected "
                      f"a dict, a mapping or a NamedTuple with the fields step, {', '.join(sum(STATE_NAMES.values(), ()))}")


def _as_array(value, k: int, where: str, what: str) -> np.ndarray:
    """A NumPy copy of a returned array (NumPy, torch, jax, ...), or PortFailure naming it."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise PortFailure(f"step {k + 1}: {where} returned {what} as a {type(value).__name__}, not an array")
    try:
        if hasattr(value, "detach"):  # torch
            return _torch_to_numpy(value)
        arr = np.array(value, copy=True)
    except Exception as exc:  # noqa: BLE001
        raise PortFailure(f"step {k + 1}: {where} returned {what} that cannot be read as an array ({exc})") from None
    if arr.dtype.kind not in "f" and arr.dtype != np_dtype("bfloat16"):
        raise PortFailure(f"step {k + 1}: {where} returned {what} of dtype {arr.dtype}, not a floating array")
    return arr


def _torch_to_numpy(x) -> np.ndarray:
    import torch

    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np_dtype("bfloat16")).copy()
    return x.numpy().copy()


# -- torch.optim.Optimizer classes -------------------------------------------------------------

class TorchAdapter(Adapter):
    """``CLASS([param], **hyperparameters)``; ``param.grad`` set to a fresh tensor before each
    ``step()``; ``param`` and ``optimizer.state[param]`` read after it. A given starting state is
    restored after one throwaway zero-gradient step that lets the port create its own state."""

    kind = "torch"

    def __init__(self, name: str, cls):
        super().__init__(name)
        if "torch" not in sys.modules:  # then it cannot be a torch class (and torch need not be imported)
            raise ConfigError(f"--port {name}: {cls!r} is not a torch.optim.Optimizer subclass")
        import torch

        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(f"--port {name}: {cls!r} is not a torch.optim.Optimizer subclass")
        from .backends import torch_backend

        self.device = os.environ.get(DEVICE_VARIABLE) or "cpu"
        self.torch, self.cls, self.backend = torch, cls, torch_backend(self.device)
        self.hparams, self.configurable = accepted(cls, skip=("params",))
        self.optimizers = infer_optimizers(cls.__name__)

    def run(self, case: Case) -> Iterator[StepResult]:
        torch, to = self.torch, self.backend.to
        names = STATE_NAMES[case.optimizer]
        p = torch.nn.Parameter(to(case.param))
        opt = call_port(self.name, self.cls, [p], **hparams_from_json(case.hparams), **self.config(case))
        if case.state is not None:
            self._restore(opt, p, case)
        for k, grad in enumerate(case.grads):
            g = to(grad)  # a fresh tensor: the public code writes the processed gradient into it
            p.grad = g
            call_port(self.name, opt.step)
            notes = []
            if not _same_bits(_torch_to_numpy(g), grad):
                notes.append(f"step {k + 1}: the port wrote into p.grad (the public code does; the "
                             f"processed gradient is not an output of the spec)")
            st = opt.state.get(p, {})
            buffers = {n: _torch_to_numpy(st[n]) for n in names if torch.is_tensor(st.get(n))}
            count = None if st.get("step") is None else step_count(st["step"], k, self.name)
            yield StepResult(_torch_to_numpy(p), buffers, count, tuple(notes))

    def _restore(self, opt, p, case: Case):
        torch, to = self.torch, self.backend.to
        p.grad = torch.zeros_like(p)
        call_port(self.name, opt.step)
        with torch.no_grad():
            self._set_param(p, to(case.param))
        overwrite_state(torch, lambda value: self._buffer(to(value), p), opt.state[p], case.state)
        p.grad = None

    def _set_param(self, p, value) -> None:
        p.copy_(value)

    def _buffer(self, value, p):
        """A given state buffer as the port gets it (laid out like ``p``)."""
        return value


def overwrite_state(torch, to, st: dict, given: dict) -> None:
    """Write a given state over the one a torch port made: buffers as tensors, ``step`` keeping
    the port's own type (an int, or a tensor of its dtype)."""
    for name, value in given.items():
        if name == "step":
            old = st.get("step")
            st["step"] = (torch.tensor(float(value), dtype=old.dtype, device=old.device)
                          if torch.is_tensor(old) else type(old or 0)(value))
        else:
            st[name] = to(value)


# -- optax factories ---------------------------------------------------------------------------

class OptaxAdapter(Adapter):
    """``FACTORY(**hyperparameters)`` -> an optax ``GradientTransformation``: ``init(param)``, then
    ``update(grad, state, param)`` and ``optax.apply_updates`` per step. The state the runner reads
    (and injects for a given starting state) is the first NamedTuple in the optax state holding
    every reference buffer name, with ``step`` or ``count``."""

    kind = "optax"

    def __init__(self, name: str, factory):
        super().__init__(name)
        try:
            import jax

            jax.config.update("jax_enable_x64", True)
            import optax  # noqa: F401
        except ImportError:
            raise ConfigError(f"--port {name}: jax and optax are not installed") from None
        if not callable(factory):
            raise ConfigError(f"--port {name}: {name.rpartition(':')[2]!r} is not callable")
        self.factory = factory
        self.hparams, self.configurable = accepted(factory)
        self.optimizers = infer_optimizers(getattr(factory, "__name__", ""))
        try:  # optax's name for the learning rate, in a factory that also takes **hyperparameters
            named = inspect.signature(factory).parameters
            self.lr_alias = "learning_rate" in named and "lr" not in named
        except (TypeError, ValueError):
            self.lr_alias = False

    def run(self, case: Case) -> Iterator[StepResult]:
        import jax.numpy as jnp
        import optax

        names = STATE_NAMES[case.optimizer]
        h = hparams_from_json(case.hparams)
        if self.lr_alias and "lr" in h:
            h["learning_rate"] = h.pop("lr")
        tx = call_port(self.name, self.factory, **h, **self.config(case))
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise PortFailure(f"{self.name} did not return an optax GradientTransformation (got {type(tx).__name__})")
        p = jnp.asarray(case.param)
        state = call_port(self.name, tx.init, p)
        if case.state is not None:
            state = inject_state(state, case.state, jnp.asarray)
            if state is None:
                raise SkipVector("its optax state holds no NamedTuple with the reference's buffer names, so a "
                                 "given starting state cannot be injected")
        for k, grad in enumerate(case.grads):
            res = call_port(self.name, tx.update, jnp.asarray(grad), state, p)
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise PortFailure(f"step {k + 1}: {self.name}'s update returned {type(res).__name__}; expected a pair "
                                  f"(updates, new_state)")
            updates, state = res
            p = call_port(self.name, optax.apply_updates, p, updates)
            found = find_named(state, names)
            buffers = {n: np.array(getattr(found, n)) for n in names} if found is not None else {}
            counter = next((getattr(found, c) for c in ("step", "count") if found is not None and c in found._fields),
                           None)
            count = None if counter is None else step_count(counter, k, self.name)
            yield StepResult(np.array(p), buffers, count)


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


ADAPTERS = {"python": PythonAdapter, "torch": TorchAdapter, "optax": OptaxAdapter}


def make_adapter(text: str, obj=None, *, in_place: bool = False, optimizers=None) -> Adapter:
    """``KIND:MODULE:NAME`` / ``KIND:path/file.py:NAME`` / ``MODULE:NAME`` (kind inferred) -> an
    adapter; ``obj`` instead of loading NAME. ConfigError when it cannot be built."""
    kind, sep, rest = text.partition(":")
    if kind not in ADAPTERS:
        kind, rest = "", text
    if kind in ("torch", "optax") and not optimizers and not infer_optimizers(rest.rpartition(":")[2]):
        raise ConfigError(f"--port {text}: cannot tell from its name whether it implements SAVEUS or "
                          f"DOPE; add --optimizer saveus or --optimizer dope")
    if obj is None:
        obj = load_object(rest, kind)
    if not kind:
        kind = infer_kind(obj)
    name = f"{kind}:{rest}"
    adapter = ADAPTERS[kind](name, obj, in_place=in_place) if kind == "python" else ADAPTERS[kind](name, obj)
    if optimizers:
        adapter.optimizers = tuple(optimizers)
    elif kind != "python":
        adapter.optimizers = infer_optimizers(rest.rpartition(":")[2]) or adapter.optimizers
    if kind != "python" and not adapter.optimizers:  # an inferred torch port named neither way
        raise ConfigError(f"--port {name}: cannot tell from its name whether it implements SAVEUS or "
                          f"DOPE; add --optimizer saveus or --optimizer dope")
    return adapter
