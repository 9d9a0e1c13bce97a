"""Ports with a mistake that only a combination of switches shows: what the fuzzer is for.

``floor_only_without_clip`` is refopt's core with D6's ``eps_floor`` applied only when D3's
``clip`` is off, as a port that keeps the floored epsilon in the no-clip branch computes. No
vector file sets both, so it passes every one; ``refopt check --fuzz`` catches it.
"""
from __future__ import annotations

import numpy as np

from refopt import dope
from refopt.builders import mutants


def _floor_in_no_clip_branch():
    seen = {}

    def clip_by_norm(ops, g, clip):
        seen["clipped"] = True
        return dope.clip_by_norm(ops, g, clip)

    def epsilon(ops, t, eps, eps_floor):
        return dope.epsilon(ops, t, eps, None if seen.pop("clipped", False) else eps_floor)
    return {"clip_by_norm": clip_by_norm, "epsilon": epsilon}


_BUILT: dict = {}


def floor_only_without_clip(optimizer, param, grad, state, hparams):
    """A python port (refopt check --port python:...:floor_only_without_clip) of DOPE."""
    if optimizer != "dope":
        raise ValueError("this port implements DOPE")
    key = repr(sorted(hparams.items()))
    if key not in _BUILT:
        _BUILT[key] = mutants.relinked(dope.DOPE, _floor_in_no_clip_branch())(**hparams)
    opt = _BUILT[key]
    st = opt.State(step=np.asarray(state["step"]), **{k: state[k] for k in opt.State._fields[1:]})
    p, new = opt.step(param, grad, st)
    return p, dict(new.items(), step=int(new.step))
