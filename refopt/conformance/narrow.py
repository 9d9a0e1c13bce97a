"""The earliest clause whose output differs, when no known deviation explains a failure.

At the first step where the port leaves the golden, the reference is run ONE step from the port's
own parameter and state before it (so earlier, tolerated differences do not count), and what the
port produced is compared with it quantity by quantity, in the order the clauses produce them
(spec/saveus.md, spec/dope.md): the first state buffer that differs names its clause. Where the
state records the processed gradient (DOPE's ``prev_grad`` is ``g`` after D1-D3; SAVEUS's ``ema``
is a known mix of it), the port's gradient is compared with the reference's after each of
centralization, normalization and clipping, to name the stage that first differs.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import common, dope, saveus
from .._arithmetic import Arithmetic
from .encoding import np_dtype
from .tolerance import judge

#: Per optimizer, in the order the update produces them: (quantity, clause that writes it, the
#: clauses whose results feed it). spec/saveus.md S4-S10, spec/dope.md D4-D14.
PRODUCED_BY = {
    "saveus": (("ema", "S4", "S1-S3"), ("ema_squared", "S6", "S5"), ("param", "S7-S10", "")),
    "dope": (("prev_grad", "D4", "D1-D3"), ("fim", "D4", "D1-D3"), ("fim_diff", "D4", "D1-D3"),
             ("exp_avg", "D10", "D5-D9"), ("param", "D11-D14", "")),
}


def narrow(vector, outputs, first_bad) -> str:
    """One sentence naming the earliest differing clause, or "" when it cannot be told."""
    if not first_bad or not outputs:
        return ""
    k = first_bad["step"] - 1
    if first_bad["what"] == "step":
        clause = "S0" if vector.optimizer == "saveus" else "D0"
        return f"the step count the port reports differs ({clause})"
    if k >= len(outputs):
        return ""
    before = _state_before(vector, outputs, k)
    if before is None:
        return ""
    param, state = before
    opt = vector.make_reference()
    ref_param, ref_state = opt.step(param, vector.steps[k].grad.copy(), state)
    ref = dict({n: np.asarray(ref_state[n]) for n in ref_state._fields if n != "step"}, param=np.asarray(ref_param))
    port = dict(outputs[k].state, param=outputs[k].param)
    for name, clause, feeders in PRODUCED_BY[vector.optimizer]:
        if name not in port or _agrees(vector, k, name, port[name], ref[name]):
            continue
        what = "the parameter" if name == "param" else f"{name!r}"
        text = f"one step from the port's own state before step {k + 1}, {what} is the first quantity " \
               f"that differs from the reference"
        stage = _gradient_stage(vector, opt, param, state, k, port, name)
        if stage:
            return f"{text}; {stage}"
        return f"{text}: check {clause}" + (f" (and {feeders}, which feed it)" if feeders else "")
    return (f"one step from the port's own state, every quantity of step {k + 1} agrees with the reference: "
            f"the difference builds up over the earlier steps (compare the state after each step)")


def _state_before(vector, outputs, k):
    """(param, core State) the port had before step k (0-based), or None if it exposes too little."""
    opt_state = vector.make_reference().State
    names = opt_state._fields[1:]
    if k == 0:
        param = vector.param0.copy()
        if vector.state0 is None:
            return param, vector.make_reference().init(param)
        buffers, count = {n: vector.state0[n].copy() for n in names}, vector.state0["step"]
    else:
        prev = outputs[k - 1]
        if any(n not in prev.state for n in names):
            return None
        param, buffers = prev.param.copy(), {n: prev.state[n].copy() for n in names}
        count = vector.steps[k - 1].state["step"]
    return param, opt_state(step=np.asarray(count, dtype=np.int64), **buffers)


def _agrees(vector, k, name, actual, expected) -> bool:
    """``actual`` within the vector's tolerance of ``expected`` (a one-step reference value)."""
    step = vector.steps[k]
    if name == "param":
        fake = dataclasses.replace(step, param=np.asarray(expected, dtype=np.float64))
    else:
        fake = dataclasses.replace(step, state=dict(step.state, **{name: np.asarray(expected, dtype=np.float64)}))
    return judge(dataclasses.replace(vector, steps=(fake,)), 0, actual, what=name).passed


def _stages(vector, opt, param, grad):
    """[(label, processed gradient)] after each preprocessing clause that acts, as the core computes
    them (the same clause functions, one at a time)."""
    ops = Arithmetic(param)
    q = opt.quirks
    g = ops.widen(grad)
    gate = saveus.acts if vector.optimizer == "saveus" else dope.acts
    ids = ("S1", "S2") if vector.optimizer == "saveus" else ("D1", "D2", "D3")
    out = [("the raw gradient", ops.store(g))]
    if gate(opt.centralization):
        g = common.centralize(ops, g, opt.centralization, q.torch_empty_axis_mean)
        out.append((f"{ids[0]} (centralization)", ops.store(g)))
    if gate(opt.normalization):
        g = common.normalize(ops, g, opt.normalization, opt.normalize_channels, q.aliased_lerp)
        out.append((f"{ids[1]} (normalization)", ops.store(g)))
    if vector.optimizer == "dope" and dope.acts(opt.clip):
        g = dope.clip_by_norm(ops, g, opt.clip)
        out.append(("D3 (clipping by norm)", ops.store(g)))
    return out


def _gradient_stage(vector, opt, param, state, k, port, name) -> str:
    """Which preprocessing stage the port's processed gradient matches, when the first differing
    buffer holds it: DOPE's prev_grad is it (judged with its budget), SAVEUS's ema mixes it with
    the old ema (solved for it, so compared only to a few rounding errors)."""
    stages = _stages(vector, opt, param, vector.steps[k].grad.copy())
    ids = [label.split()[0] for label, _ in stages[1:]]
    if vector.optimizer == "dope" and name == "prev_grad":
        agree = [i for i, (_, g) in enumerate(stages[:-1]) if _agrees(vector, k, "prev_grad", port["prev_grad"], g)]
        if not agree:
            return (f"its processed gradient (prev_grad) differs from the reference's after each of "
                    f"{', '.join(ids)}: check {_span(ids)}") if ids else ""
        i = agree[-1]
    elif vector.optimizer == "saveus" and name == "ema":
        beta1 = opt.betas[0]
        if not 0.0 <= beta1 < 1.0:
            return ""
        old = np.asarray(state.ema).astype(np.float64)
        solved = (np.asarray(port["ema"]).astype(np.float64) - beta1 * old) / (1.0 - beta1)
        errors = [_relative_error(solved, np.asarray(g).astype(np.float64)) for _, g in stages]
        limit = min(2e-2, 1e3 * float(np.finfo(np.float32 if vector.dtype == "bfloat16" else np_dtype(vector.dtype)).eps)
                    / (1.0 - beta1))
        i = int(np.argmin(errors))
        if not errors[i] <= limit:
            return (f"its processed gradient, solved from ema, matches none of the reference's intermediate "
                    f"results: check {_span(ids) + ' and ' if ids else ''}S4")
        if i == len(stages) - 1:
            return f"its processed gradient agrees with the reference's (after {stages[i][0]}): check S4 itself"
    else:
        return ""
    nxt = stages[i + 1][0]
    where = "is the raw gradient" if i == 0 else f"agrees with the reference's after {stages[i][0]}"
    return f"its processed gradient {where} but not after {nxt}: check {nxt.split()[0]}"


def _span(ids) -> str:
    return ids[0] if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


def _relative_error(a, b) -> float:
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(a) & np.isfinite(b)
        if not finite.any():
            return 0.0 if np.array_equal(np.isnan(a), np.isnan(b)) else np.inf
        scale = max(float(np.max(np.abs(b[finite]), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)) / scale
    return err if np.array_equal(np.isfinite(a), np.isfinite(b)) else np.inf
