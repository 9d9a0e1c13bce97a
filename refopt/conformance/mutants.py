"""Deliberately broken ports, each ONE plausible porting mistake, to show that the vectors catch them.

A mutant is refopt's own core with a small change: either a quirk switched away from the reference
profile (what a port that "fixes" the documented behaviour computes), or a textual edit of one or
two lines of the core's source, recompiled in the core module's namespace. Editing the real source
keeps each mutant one mistake away from the reference; if the core's text changes so that an edit
no longer applies, building the mutant fails loudly (and the self-test test with it).

Every mutant is exposed as a python-port function ``fn(optimizer, param, grad, state, hparams)``,
so ``refopt check --self-test`` runs them through exactly the same path as a user's port.
"""
from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .. import _arrays, dope, saveus


@dataclass(frozen=True)
class Mutant:
    name: str
    optimizer: str  # "saveus" | "dope"
    clause: str
    mistake: str
    #: quirk overrides on top of the reference profile
    quirks: tuple = ()
    #: (function, ((old, new), ...)): textual edits of a core function's source
    edits: tuple = ()
    #: (module attribute, (old, new), ...) edits of a helper the step calls, e.g. normalizer_std
    helper_edits: tuple = field(default=())


def _q(**kw):
    return tuple(sorted(kw.items()))


S, D = "saveus", "dope"
_SU, _DU = "SAVEUS._update", "DOPE._update"

CATALOGUE: tuple[Mutant, ...] = (
    # -- quirks a porter "fixes" (Q1-Q6) --------------------------------------------------------
    Mutant("interpolating_lerp_dope", D, "D2 (Q1)", "normalization interpolates g + a*(g/s - g)",
           quirks=_q(aliased_lerp=False)),
    Mutant("interpolating_lerp_saveus", S, "S2 (Q1)", "normalization interpolates g + a*(g/s - g)",
           quirks=_q(aliased_lerp=False)),
    Mutant("array_api_empty_axis_mean_dope", D, "A1 (Q2; D1, D10)",
           "mean over no trailing axes reduces over none (array API axis=())",
           quirks=_q(torch_empty_axis_mean=False)),
    Mutant("array_api_empty_axis_mean_saveus", S, "A1 (Q2; S1)",
           "mean over no trailing axes reduces over none (array API axis=())",
           quirks=_q(torch_empty_axis_mean=False)),
    Mutant("mars_previous_grad", D, "D9 (Q3)", "MARS term uses g_{t-1} as documented",
           quirks=_q(mars_current_grad=False)),
    Mutant("amplification_without_lambda", D, "D11 (Q4)", "amplification t**lambda without the lambda factor",
           quirks=_q(lambda_scaled_amplification=False)),
    Mutant("float64_scalars", D, "D11, D12 (Q5)", "amplification and cautious scale in float64, no reciprocal",
           quirks=_q(float32_scalars=False)),
    Mutant("cautious_against_mars_grad", D, "D12 (Q6)", "cautious mask compares with the MARS-corrected c_t",
           quirks=_q(cautious_processed_grad=False)),
    # -- DOPE -------------------------------------------------------------------------------
    Mutant("cautious_mask_ge_zero", D, "D12", "cautious mask keeps u*g >= 0 instead of > 0",
           edits=((_DU, (("* ref) > 0", "* ref) >= 0"),)),)),
    Mutant("swapped_betas_d4", D, "D4", "fim decays with beta1 and fim_diff with beta2",
           edits=((_DU, (("fim = rd(rd(fim * b2) + (1.0 - b2) * g * g)", "fim = rd(rd(fim * b1) + (1.0 - b1) * g * g)"),
                         ("rd(rd(fim_diff * b1) + (1.0 - b1) * d * d)", "rd(rd(fim_diff * b2) + (1.0 - b2) * d * d)"))),)),
    Mutant("global_std_dope", D, "D2 (A2)", "normalizer std over the whole tensor instead of per channel",
           edits=((_DU, (('normalizer_std(xp, g, h["normalize_channels"])', "normalizer_std(xp, g, False)"),)),)),
    Mutant("clip_norm_eps_1e8", D, "D3", "clip coefficient clip/(norm + 1e-8) instead of 1e-6",
           edits=((_DU, (("1e-6", "1e-8"),)),)),
    Mutant("clip_without_min_one", D, "D3", "clip coefficient not capped at 1 (always rescales to the norm)",
           edits=((_DU, (("xp.ones_like(norm))", "xp.ones_like(norm) * xp.inf)"),)),)),
    Mutant("weight_decay_post_update", D, "D13", "weight decay applied to p after the D14 update",
           edits=((_DU, (("w = rd(rd(p / denom) / denom_diff)", 'w = rd(rd(rd(p + A.dscalar(-h["lr"]) * u) / denom) / denom_diff)'),)),)),
    Mutant("std_without_eps_dope", D, "D2 (A2)", "normalizer divides by std without the +1e-8",
           edits=((_DU, (("rd(rd(s) + A.dscalar(1e-8))", "rd(s)"),)),)),
    Mutant("exp_avg_stored_uncentred", D, "D10", "momentum centred for the update but stored uncentred",
           edits=((_DU, (("exp_avg = rd(exp_avg - rd(trailing_mean(", "centred = rd(exp_avg - rd(trailing_mean("),
                         ("u = rd(u + rd(exp_avg * self._amplification(", "u = rd(u + rd(centred * self._amplification("))),)),
    Mutant("eps_floor_ignored", D, "D6", "eps_floor ignored: eps_hat is always eps",
           edits=((_DU, (('if h["eps_floor"] is None:  # D6', "if True:  # D6"),)),)),
    Mutant("bias_correction_off_by_one_dope", D, "D5", "bias corrections use t+1",
           edits=((_DU, (("bc1 = A.one_minus_pow(b1, t)", "bc1 = A.one_minus_pow(b1, t + 1)"),
                         ("bc2 = A.one_minus_pow(b2, t)", "bc2 = A.one_minus_pow(b2, t + 1)"))),)),
    Mutant("prev_grad_before_clip", D, "D4 (D3)", "prev_grad stores the gradient before the norm clip",
           edits=((_DU, (('        if h["clip"] > 0:  # D3', '        g_unclipped = g\n        if h["clip"] > 0:  # D3'),
                         ("g_prev, prev = prev, g", "g_prev, prev = prev, g_unclipped"))),)),
    Mutant("std_correction_zero_dope", D, "D2 (A2)", "std with correction 0 (population std)",
           helper_edits=(("normalizer_std", ("correction=1", "correction=0")),)),
    # -- SAVEUS -----------------------------------------------------------------------------
    Mutant("std_correction_zero_saveus", S, "S2 (A2)", "std with correction 0 (population std)",
           helper_edits=(("normalizer_std", ("correction=1", "correction=0")),)),
    Mutant("global_std_saveus", S, "S2 (A2)", "normalizer std over the whole tensor instead of per channel",
           edits=((_SU, (('normalizer_std(xp, g, h["normalize_channels"])', "normalizer_std(xp, g, False)"),)),)),
    Mutant("std_without_eps_saveus", S, "S2 (A2)", "normalizer divides by std without the +1e-8",
           edits=((_SU, (("rd(rd(s) + A.dscalar(1e-8))", "rd(s)"),)),)),
    Mutant("clip_before_weight_decay", S, "S8, S9", "clip by value before the coupled weight decay is added",
           edits=((_SU, (("        wd = h[\"weight_decay\"]\n", ""),
                         ("        if h[\"clip_gradients\"] and h[\"clip_lambda\"] is not None:  # S9",
                          "        if False:  # S9"),
                         ("        if h[\"decouple_weight_decay\"] and wd != 0:",
                          "        if h[\"clip_gradients\"] and h[\"clip_lambda\"] is not None:\n"
                          "            lim = A.scalar(xp.asarray(h[\"clip_lambda\"](t), dtype=A.sdtype, device=A.device))\n"
                          "            g = rd(xp.minimum(xp.maximum(g, -lim), lim))\n"
                          "        wd = h[\"weight_decay\"]\n"
                          "        if h[\"decouple_weight_decay\"] and wd != 0:"))),)),
    Mutant("decoupled_decay_without_bc1", S, "S8", "decoupled decay p*(1 - lr*wd), as the other public version",
           edits=((_SU, (("p = rd(p * A.scalar(1.0 - step_size * wd))", 'p = rd(p * (1.0 - h["lr"] * wd))'),)),)),
    Mutant("amplify_bias_corrected_ema", S, "S5", "amplification adds amp_fac * ema / bc1",
           edits=((_SU, (("* ema)  # S5", "* rd(ema / A.scalar(A.one_minus_pow(b1, t))))  # S5"),)),)),
    Mutant("centralization_gate_positive", S, "S1", "centralization runs only when centralization > 0",
           edits=((_SU, (("if c != 0:  # S1", "if c > 0:  # S1"),)),)),
    Mutant("bias_correction_off_by_one_saveus", S, "S3", "bias corrections use t+1",
           edits=((_SU, (("bc2_sqrt = xp.sqrt(A.one_minus_pow(b2, t))", "bc2_sqrt = xp.sqrt(A.one_minus_pow(b2, t + 1))"),
                         ("step_size = h[\"lr\"] / A.one_minus_pow(b1, t)", "step_size = h[\"lr\"] / A.one_minus_pow(b1, t + 1)"))),)),
    Mutant("clip_whenever_lambda_set", S, "S9", "clips whenever clip_lambda is set, ignoring clip_gradients",
           edits=((_SU, (('if h["clip_gradients"] and h["clip_lambda"] is not None:  # S9',
                          'if h["clip_lambda"] is not None:  # S9'),)),)),
    Mutant("ema_squared_of_raw_grad", S, "S6", "ema_squared of the gradient before amplification",
           edits=((_SU, (("        ema = rd(rd(ema * b1)", "        g_raw = g\n        ema = rd(rd(ema * b1)"),
                         ("(1.0 - b2) * g * g)  # S6", "(1.0 - b2) * g_raw * g_raw)  # S6"))),)),
)

BY_NAME = {m.name: m for m in CATALOGUE}
_CORE = {"SAVEUS": (saveus, saveus.SAVEUS), "DOPE": (dope, dope.DOPE)}


def _edit(src: str, pairs, where: str) -> str:
    for old, new in pairs:
        n = src.count(old)
        if n == 0:
            raise RuntimeError(f"mutant edit no longer applies to {where}: {old!r} not found")
        src = src.replace(old, new)
    return src


def _compile(src: str, namespace: dict, name: str, where: str):
    code = compile(textwrap.dedent(src), f"<mutant of {where}>", "exec")
    exec(code, namespace)  # noqa: S102 - the source is refopt's own, edited by the table above
    return namespace[name]


@lru_cache(maxsize=None)
def mutant_class(name: str):
    """The core optimizer class with mutant ``name``'s source edits applied."""
    m = BY_NAME[name]
    opt_name = "SAVEUS" if m.optimizer == S else "DOPE"
    module, base = _CORE[opt_name]
    namespace = dict(vars(module))
    for attr, pair in m.helper_edits:
        fn = getattr(_arrays, attr)
        namespace[attr] = _compile(_edit(inspect.getsource(fn), (pair,), attr), dict(vars(_arrays)), attr, attr)
    methods = {}
    for where, pairs in m.edits:
        meth = where.split(".")[1]
        src = _edit(inspect.getsource(getattr(base, meth)), pairs, where)
        methods[meth] = _compile(src, namespace, meth, where)
    if m.helper_edits and "_update" not in methods:  # recompile so the edited helper is the one used
        methods["_update"] = _compile(inspect.getsource(base._update), namespace, "_update", opt_name)
    return type(f"{opt_name}_{name}", (base,), methods)


def make_optimizer(name: str, hparams: dict, quirks: dict | None = None):
    """Mutant ``name`` on top of ``quirks`` (default: the reference profile's)."""
    m = BY_NAME[name]
    return mutant_class(name)(quirks={**(quirks or {}), **dict(m.quirks)} or None, **hparams)


def port_function(name: str):
    """Mutant ``name`` as a python-port function ``fn(optimizer, param, grad, state, hparams)``."""
    m = BY_NAME[name]

    def fn(optimizer, param, grad, state, hparams):
        if optimizer != m.optimizer:
            raise ValueError(f"mutant {name} implements {m.optimizer}, not {optimizer}")
        opt = make_optimizer(name, hparams)
        st = opt.State(step=np.asarray(state["step"]), **{k: state[k] for k in opt.State._fields[1:]})
        p, new = opt.step(param, grad, st)
        return p, dict(new.items(), step=int(new.step))

    fn.__name__ = name
    fn.__doc__ = f"{m.clause}: {m.mistake}"
    return fn
