"""Ports the runner tests check: python-port step functions on refopt's core, most of them broken
on purpose, one way each. Loaded by path (``python:/.../port_examples.py:NAME``) so that refopt's
worker process imports them exactly as a port author's file."""
from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

import numpy as np

import refopt


def _core(optimizer, hparams, **config):
    return (refopt.SAVEUS if optimizer == "saveus" else refopt.DOPE)(**hparams, **config)


def _step(opt, param, grad, state):
    st = opt.State(step=np.asarray(state["step"]), **{k: state[k] for k in opt.State._fields[1:]})
    p, new = opt.step(param, grad, st)
    return p, dict(new.items(), step=int(new.step))


def good_port(optimizer, param, grad, state, hparams):
    return _step(_core(optimizer, hparams), param, grad, state)


def configurable_port(optimizer, param, grad, state, hparams, *, profile="reference", quirks=None):
    """Takes refopt's profile and quirks, so it is given every vector with its own."""
    return _step(_core(optimizer, hparams, profile=profile, quirks=quirks), param, grad, state)


def raising_port(optimizer, param, grad, state, hparams):
    if optimizer == "saveus":
        raise RuntimeError("boom")
    return good_port(optimizer, param, grad, state, hparams)


def wrong_shape_port(optimizer, param, grad, state, hparams):
    p, s = good_port(optimizer, param, grad, state, hparams)
    return (p.reshape(-1)[:1] if optimizer == "dope" else p), s


def wrong_dtype_port(optimizer, param, grad, state, hparams):
    p, s = good_port(optimizer, param, grad, state, hparams)
    return (p.astype(np.float16) if optimizer == "dope" else p), s


def wide_port(optimizer, param, grad, state, hparams):
    """Returns everything in float64: exact, so accepted (spec/tolerance.md)."""
    p, s = good_port(optimizer, param, grad, state, hparams)
    return p.astype(np.float64), {k: (np.asarray(v).astype(np.float64) if k != "step" else v) for k, v in s.items()}


def nan_port(optimizer, param, grad, state, hparams):
    p, s = good_port(optimizer, param, grad, state, hparams)
    return (p * np.nan if optimizer == "dope" else p), s


def lerp_port(optimizer, param, grad, state, hparams):
    """A port that 'fixes' Q1: it interpolates as the documentation says."""
    return _step(_core(optimizer, hparams, quirks={"aliased_lerp": False}), param, grad, state)


def inplace_port(optimizer, param, grad, state, hparams):
    """Correct numbers, written into the arrays it was handed (param and state), torch-style."""
    p, s = good_port(optimizer, param, grad, state, hparams)
    param[...] = p
    for k, v in s.items():
        if k != "step":
            state[k][...] = v
    state["step"] = s["step"]
    return param, state


def grad_scribbler(optimizer, param, grad, state, hparams):
    """Correct numbers, but it writes the processed gradient into its input, as the public code does."""
    p, s = good_port(optimizer, param, grad, state, hparams)
    grad[...] = 0
    return p, s


def step_liar(optimizer, param, grad, state, hparams):
    p, s = good_port(optimizer, param, grad, state, hparams)
    return p, dict(s, step=s["step"] + 1000)


def stepless_port(optimizer, param, grad, state, hparams):
    """Keeps its step count under another name."""
    state = dict(state)
    state.setdefault("step", state.pop("count", 0))
    p, s = good_port(optimizer, param, grad, state, hparams)
    s["count"] = s.pop("step")
    return p, s


def renamed_state_port(optimizer, param, grad, state, hparams):
    """Keeps SAVEUS's ema_squared under Adam's name."""
    if "exp_avg_sq" in state:
        state = dict(state, ema_squared=state.pop("exp_avg_sq"))
    p, s = good_port(optimizer, param, grad, state, hparams)
    if optimizer == "saveus":
        s["exp_avg_sq"] = s.pop("ema_squared")
    return p, s


class SaveusState(NamedTuple):
    step: int
    ema: np.ndarray
    ema_squared: np.ndarray


class DopeState(NamedTuple):
    step: int
    exp_avg: np.ndarray
    fim: np.ndarray
    fim_diff: np.ndarray
    prev_grad: np.ndarray


def namedtuple_port(optimizer, param, grad, state, hparams):
    """Returns its state as its own NamedTuple, and expects that NamedTuple back (attribute access)."""
    as_dict = state._asdict() if hasattr(state, "_asdict") else dict(state)
    p, s = good_port(optimizer, param, grad, as_dict, hparams)
    return p, (SaveusState if optimizer == "saveus" else DopeState)(**s)


def tuple_returner(optimizer, param, grad, state, hparams):
    return [param]


def state_list_port(optimizer, param, grad, state, hparams):
    p, _ = good_port(optimizer, param, grad, state, hparams)
    return p, [1, 2]


def string_param_port(optimizer, param, grad, state, hparams):
    _, s = good_port(optimizer, param, grad, state, hparams)
    return "param", s


def exits_in_step(optimizer, param, grad, state, hparams):
    if optimizer == "saveus":
        sys.exit(0)
    return good_port(optimizer, param, grad, state, hparams)


def hard_exits_in_step(optimizer, param, grad, state, hparams):
    if optimizer == "saveus":
        os._exit(0)
    return good_port(optimizer, param, grad, state, hparams)


def crashes_in_step(optimizer, param, grad, state, hparams):
    if optimizer == "saveus":
        import ctypes

        ctypes.string_at(0)  # a segmentation fault
    return good_port(optimizer, param, grad, state, hparams)


def hangs_in_step(optimizer, param, grad, state, hparams):
    if optimizer == "saveus":
        time.sleep(3600)
    return good_port(optimizer, param, grad, state, hparams)


def floods_output(optimizer, param, grad, state, hparams):
    """Correct, but prints megabytes to standard output and error (and reads standard input)."""
    sys.stdout.write("x" * (1 << 20) + "\n{not a protocol message}\n")
    sys.stdout.flush()
    os.write(1, b"y" * (1 << 20))
    sys.stderr.write("z" * (1 << 20))
    sys.stdin.read()
    return good_port(optimizer, param, grad, state, hparams)


def control_characters(optimizer, param, grad, state, hparams):
    raise ValueError("bad \x00\x01\x1b[31m\ud800 text")
