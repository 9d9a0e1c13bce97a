"""Mistakes against SAVEUS's clauses (spec/saveus.md, S0-S10); each replaces clause functions of
``refopt.saveus`` by name. Where a mistake moves a value from one clause to another (the old
``ema`` into S5, the unamplified gradient into S6), the two replacements share it through the
factory's closure."""
from __future__ import annotations

from ... import saveus
from . import Mutant

S = "saveus"


def _switch_positive():
    return {"acts": lambda value: value > 0}


def _no_bias_correction_1():
    def bias_corrections(ops, t, beta1, beta2, lr):
        _, rho = saveus.bias_corrections(ops, t, beta1, beta2, lr)
        return lr + 0 * t, rho
    return {"bias_corrections": bias_corrections}


def _no_bias_correction_2():
    def bias_corrections(ops, t, beta1, beta2, lr):
        step_size, _ = saveus.bias_corrections(ops, t, beta1, beta2, lr)
        return step_size, 1.0 + 0 * t
    return {"bias_corrections": bias_corrections}


def _bias_corrections_t_plus_1():
    def bias_corrections(ops, t, beta1, beta2, lr):
        return saveus.bias_corrections(ops, t + 1, beta1, beta2, lr)
    return {"bias_corrections": bias_corrections}


def _ema_with_beta2():
    seen = {}

    def bias_corrections(ops, t, beta1, beta2, lr):
        seen["beta2"] = beta2
        return saveus.bias_corrections(ops, t, beta1, beta2, lr)

    def first_moment(ops, ema, g, beta1):
        return saveus.first_moment(ops, ema, g, seen["beta2"])
    return {"bias_corrections": bias_corrections, "first_moment": first_moment}


def _amplify_old_ema():
    seen = {}

    def first_moment(ops, ema, g, beta1):
        seen["old"] = ema
        return saveus.first_moment(ops, ema, g, beta1)

    def amplify(ops, g, ema, amp_fac):
        return saveus.amplify(ops, g, seen["old"], amp_fac)
    return {"first_moment": first_moment, "amplify": amplify}


def _amplify_bias_corrected_ema():
    seen = {}

    def bias_corrections(ops, t, beta1, beta2, lr):
        seen["b1"] = ops.one_minus_pow(beta1, t)
        return saveus.bias_corrections(ops, t, beta1, beta2, lr)

    def amplify(ops, g, ema, amp_fac):
        return saveus.amplify(ops, g, ops.div(ema, ops.in_work(seen["b1"])), amp_fac)
    return {"bias_corrections": bias_corrections, "amplify": amplify}


def _second_moment_of_raw_grad():
    seen = {}

    def amplify(ops, g, ema, amp_fac):
        seen["raw"] = g
        return saveus.amplify(ops, g, ema, amp_fac)

    def second_moment(ops, ema_squared, g, beta2):
        return saveus.second_moment(ops, ema_squared, seen["raw"], beta2)
    return {"amplify": amplify, "second_moment": second_moment}


def _eps_under_sqrt():
    def denominator(ops, ema_squared, rho, eps):
        root = ops.sqrt(ops.add_constant(ema_squared, eps))
        return ops.div(root, ops.in_work(rho))
    return {"denominator": denominator}


def _decoupled_without_bc1():
    seen = {}

    def bias_corrections(ops, t, beta1, beta2, lr):
        seen["lr"] = lr
        return saveus.bias_corrections(ops, t, beta1, beta2, lr)

    def decoupled_weight_decay(ops, p, step_size, weight_decay):
        return ops.mul(p, 1.0 - seen["lr"] * weight_decay)
    return {"bias_corrections": bias_corrections, "decoupled_weight_decay": decoupled_weight_decay}


def _coupled_ignored():
    return {"coupled_weight_decay": lambda ops, g, p, weight_decay: g}


def _clip_ignored():
    return {"clip_by_value": lambda ops, g, clip_gradients, clip_lambda, t: g}


def _clip_whenever_lambda():
    def clip_by_value(ops, g, clip_gradients, clip_lambda, t):
        return saveus.clip_by_value(ops, g, True, clip_lambda, t)
    return {"clip_by_value": clip_by_value}


def _clip_before_coupled_decay():
    seen = {}

    def coupled_weight_decay(ops, g, p, weight_decay):
        seen["decay"] = (p, weight_decay)
        return g

    def clip_by_value(ops, g, clip_gradients, clip_lambda, t):
        g = saveus.clip_by_value(ops, g, clip_gradients, clip_lambda, t)
        if "decay" in seen:
            g = saveus.coupled_weight_decay(ops, g, *seen.pop("decay"))
        return g
    return {"coupled_weight_decay": coupled_weight_decay, "clip_by_value": clip_by_value}


def _step_sign_flipped():
    def parameter_update(ops, p, g, denom, step_size):
        return ops.subcdiv(p, g, denom, -step_size)
    return {"parameter_update": parameter_update}


MUTANTS = (
    Mutant("switch-positive-saveus", S, ("S1", "S2", "S8"),
           "switches act only when positive (as DOPE's), so a negative centralization is ignored",
           _switch_positive),
    Mutant("no-bias-correction-1", S, ("S3", "S10"), "the step size is lr, without 1/(1 - beta1**t)",
           _no_bias_correction_1),
    Mutant("no-bias-correction-2-saveus", S, ("S3", "S7"), "the denominator is not divided by sqrt(1 - beta2**t)",
           _no_bias_correction_2),
    Mutant("bias-corrections-t-plus-1-saveus", S, ("S3",), "the bias corrections use t + 1",
           _bias_corrections_t_plus_1),
    Mutant("ema-with-beta2", S, ("S4",), "ema decays with beta2", _ema_with_beta2),
    Mutant("amplify-old-ema", S, ("S5",), "amplification by the ema before this step's update",
           _amplify_old_ema),
    Mutant("amplify-bias-corrected-ema", S, ("S5",), "amplification adds amp_fac * ema / (1 - beta1**t)",
           _amplify_bias_corrected_ema),
    Mutant("ema-squared-of-raw-grad", S, ("S6",), "ema_squared of the gradient before amplification",
           _second_moment_of_raw_grad),
    Mutant("eps-under-sqrt", S, ("S7",), "eps added under the square root", _eps_under_sqrt),
    Mutant("decoupled-decay-without-bc1", S, ("S8",),
           "decoupled decay p*(1 - lr*wd), as the other public SAVEUS", _decoupled_without_bc1),
    Mutant("coupled-decay-ignored", S, ("S8",), "coupled weight decay is not applied", _coupled_ignored),
    Mutant("clip-ignored", S, ("S9",), "clip_gradients is ignored", _clip_ignored),
    Mutant("clip-whenever-lambda-set", S, ("S9",),
           "clips whenever clip_lambda is set, ignoring clip_gradients", _clip_whenever_lambda),
    Mutant("clip-before-coupled-decay", S, ("S8", "S9"),
           "clips by value before the coupled weight decay is added", _clip_before_coupled_decay),
    Mutant("step-sign-flipped", S, ("S10",), "the update is added instead of subtracted", _step_sign_flipped),
)
