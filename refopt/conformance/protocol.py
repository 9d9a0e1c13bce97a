"""The messages of the refopt port protocol, version 1 (conformance/PROTOCOL.md).

Both sides use this module: the runner (``process.py``) writes ``case`` messages and reads
``hello``/``step``/``error``/``skip``; the Python worker (``worker.py``) does the reverse. Each
reader validates what it gets and raises ``ProtocolError`` with one line naming the field, so a
port in any language learns exactly what it got wrong.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import registry
from .encoding import FLOAT_DTYPES, decode, encode

PROTOCOL = "refopt-port"
VERSION = 1
#: The protocol versions this runner speaks.
SUPPORTED_VERSIONS = (1,)
#: A line from a port may be this long, or 64 times the case's line if that is longer.
MIN_LINE_LIMIT = 16 << 20
LINE_LIMIT_FACTOR = 64
STATE_NAMES = {key: facts.buffers for key, facts in registry.OPTIMIZERS.items()}


class ProtocolError(Exception):
    """A message that breaks the protocol: one line naming the message and the field."""


@dataclass
class Case:
    """One vector, as a port gets it: hyperparameters under the port's names, JSON values."""

    id: str
    optimizer: str
    profile: str
    quirks: dict
    hparams: dict          # port's names -> JSON values (numbers, bools, null, [b1, b2], {"power": p})
    dtype: str
    shape: tuple
    param: np.ndarray
    state: dict | None     # None: fresh; else {"step": int, buffer: ndarray}
    grads: list


class StepResult(NamedTuple):
    """What a port gave back for one step, before the runner checks it."""

    param: object
    state: dict            # names -> arrays (only what the port exposes), without "step"
    step: object = None    # the step count it reports (None: none)
    notes: tuple = ()
    faults: tuple = ()


class Hello(NamedTuple):
    version: int
    name: str | None
    optimizers: tuple | None
    hparams: dict | None   # optimizer -> frozenset of names, or None (every name)
    configurable: bool


# -- encoding ------------------------------------------------------------------------------------

def dumps(message: dict) -> bytes:
    """One message as one line (bytes, ending in a newline)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def loads(line: bytes) -> dict:
    """The message on one line; ProtocolError when it is not one."""
    try:
        msg = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ProtocolError(f"a line that is not UTF-8: {_quote(line)}") from None
    except RecursionError:
        raise ProtocolError("a line nested too deeply to be a protocol message") from None
    except ValueError:
        raise ProtocolError(f"a line that is not a protocol message: {_quote(line)} "
                            f"(standard output is for protocol messages; log to standard error)") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(f"a line that is not a protocol message (no \"type\"): {_quote(line)}")
    return msg


def _no_constant(name):
    raise ValueError(name)


def _quote(line: bytes, limit: int = 80) -> str:
    text = line[:limit].decode("utf-8", "replace").rstrip("\n")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text + ("..." if len(line) > limit else ""))


def hello_message(name=None, optimizers=None, hparams=None, configurable=False) -> dict:
    msg = {"type": "hello", "protocol": PROTOCOL, "version": VERSION}
    if name is not None:
        msg["name"] = name
    if optimizers is not None:
        msg["optimizers"] = list(optimizers)
    if hparams is not None:
        msg["hparams"] = {k: sorted(v) for k, v in hparams.items()}
    msg["configurable"] = bool(configurable)
    return msg


def read_hello(msg: dict) -> Hello:
    if msg.get("type") != "hello":
        raise ProtocolError(f"expected a hello message first, got {msg.get('type')!r}")
    if msg.get("protocol") != PROTOCOL:
        raise ProtocolError(f"hello: protocol must be {PROTOCOL!r}, got {msg.get('protocol')!r}")
    version = msg.get("version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise ProtocolError(f"hello: protocol version {version!r} is not one this runner speaks "
                            f"({', '.join(map(str, SUPPORTED_VERSIONS))})")
    name = msg.get("name")
    if name is not None and not isinstance(name, str):
        raise ProtocolError("hello: name must be a string")
    optimizers = msg.get("optimizers")
    if optimizers is not None:
        if not isinstance(optimizers, list) or not optimizers or any(o not in STATE_NAMES for o in optimizers):
            raise ProtocolError(f"hello: optimizers must be a non-empty list of {', '.join(STATE_NAMES)}")
        optimizers = tuple(optimizers)
    hparams = msg.get("hparams")
    if hparams is not None:
        if not isinstance(hparams, dict) or any(
                k not in STATE_NAMES or not isinstance(v, list) or not all(isinstance(n, str) for n in v)
                for k, v in hparams.items()):
            raise ProtocolError("hello: hparams must map an optimizer to a list of names")
        hparams = {k: frozenset(v) for k, v in hparams.items()}
    configurable = msg.get("configurable", False)
    if not isinstance(configurable, bool):
        raise ProtocolError("hello: configurable must be true or false")
    return Hello(version, name, optimizers, hparams, configurable)


def case_message(case: Case) -> dict:
    state = None
    if case.state is not None:
        state = {k: (int(v) if k == "step" else encode(v)) for k, v in case.state.items()}
    return {"type": "case", "id": case.id, "optimizer": case.optimizer, "profile": case.profile,
            "quirks": dict(case.quirks), "hparams": dict(case.hparams), "dtype": case.dtype,
            "shape": list(case.shape), "param": encode(case.param), "state": state,
            "grads": [encode(g) for g in case.grads]}


def read_case(msg: dict) -> Case:
    """A case message (the worker's side); ProtocolError naming the field."""
    try:
        optimizer = msg["optimizer"]
        if optimizer not in STATE_NAMES:
            raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(STATE_NAMES)}")
        dtype, shape = msg["dtype"], tuple(msg["shape"])
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        param = _array(msg["param"], "param", dtype, shape)
        state = msg["state"]
        if state is not None:
            state = dict({n: _array(state[n], f"state.{n}", dtype, shape) for n in STATE_NAMES[optimizer]},
                         step=_count(state["step"], "state.step"))
        grads = [_array(g, f"grads[{i}]", dtype, shape) for i, g in enumerate(msg["grads"])]
        if not isinstance(msg["hparams"], dict) or not isinstance(msg["quirks"], dict):
            raise ValueError("hparams and quirks must be objects")
        return Case(str(msg["id"]), optimizer, str(msg["profile"]), dict(msg["quirks"]), dict(msg["hparams"]),
                    dtype, shape, param, state, grads)
    except KeyError as exc:
        raise ProtocolError(f"case: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"case: {exc}") from None


def step_message(index: int, result: StepResult) -> dict:
    """A step message from what an in-process adapter returned (arrays in their own dtype)."""
    state = {k: encode(np.asarray(v)) for k, v in result.state.items()}
    if result.step is not None:
        state["step"] = result.step
    msg = {"type": "step", "index": index, "param": encode(np.asarray(result.param)), "state": state}
    if result.notes:
        msg["notes"] = list(result.notes)
    if result.faults:
        msg["faults"] = list(result.faults)
    return msg


def read_step(msg: dict, index: int, case: Case) -> StepResult:
    """A step message (the runner's side): arrays decoded in whatever float dtype they came."""
    where = f"step message {index}"
    if msg.get("index") != index or isinstance(msg.get("index"), bool):
        raise ProtocolError(f"{where}: index must be {index}, got {msg.get('index')!r}")
    for key in ("param", "state"):
        if key not in msg:
            raise ProtocolError(f"{where}: missing field {key!r}")
    if not isinstance(msg["state"], dict):
        raise ProtocolError(f"{where}: state must be an object")
    state = dict(msg["state"])
    step = state.pop("step", None)
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                             or not math.isfinite(step) or step != int(step)):
        raise ProtocolError(f"{where}: state.step must be a whole number, got {step!r}")
    step = None if step is None else int(step)
    arrays = {}
    for name, obj in (("param", msg["param"]), *state.items()):
        try:
            arrays[name] = decode(obj, f"{where}: {'param' if name == 'param' else 'state.' + name}")
        except (ValueError, TypeError) as exc:
            raise ProtocolError(str(exc)) from None
    param = arrays.pop("param")
    notes, faults = (_strings(msg.get(k, []), f"{where}: {k}") for k in ("notes", "faults"))
    return StepResult(param, arrays, step, notes, faults)


def read_reply(msg: dict, index: int, case: Case):
    """("step", StepResult) | ("error", message) | ("skip", reason) for the ``index``-th reply."""
    kind = msg["type"]
    if kind == "step":
        return "step", read_step(msg, index, case)
    if kind in ("error", "skip"):
        key = "message" if kind == "error" else "reason"
        text = msg.get(key)
        if not isinstance(text, str):
            raise ProtocolError(f"{kind} message: {key} must be a string")
        if kind == "skip" and index != 1:
            raise ProtocolError(f"skip message after {index - 1} step(s): a case is skipped before its first step")
        return kind, text
    raise ProtocolError(f"unexpected message type {kind!r} while a case runs "
                        f"(expected step, error or skip)")


def _array(obj, where, dtype, shape) -> np.ndarray:
    arr = decode(obj, where)
    if obj["dtype"] != dtype or arr.shape != shape:
        raise ValueError(f"{where} is {obj['dtype']}{list(arr.shape)}, expected {dtype}{list(shape)}")
    return arr.copy()  # writable


def _count(value, where) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 0:
        raise ValueError(f"{where} must be a non-negative whole number, got {value!r}")
    return int(value)


def _strings(value, where) -> tuple:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ProtocolError(f"{where} must be a list of strings")
    return tuple(value)


def hparams_from_json(h: dict) -> dict:
    """Python values for a port's constructor: ``[b1, b2]`` -> a tuple, ``{"power": p}`` -> t -> t**p."""
    from .vectors import PowerLambda

    out = {}
    for k, v in h.items():
        if isinstance(v, list):
            v = tuple(v)
        elif isinstance(v, dict) and set(v) == {"power"}:
            v = PowerLambda(v["power"])
        out[k] = v
    return out
