"""Mistakes against DOPE's clauses (spec/dope.md, D0-D14) and its quirks (Q3-Q6); each replaces
clause functions of ``refopt.dope`` by name. Where a mistake moves a value from one clause to
another, the replacements share it through the factory's closure."""
from __future__ import annotations

from ... import dope
from . import Mutant
from .blocks import per_block, sizes

D = "dope"


def _switch_nonzero():
    return {"acts": lambda value: value != 0}


def _clip_not_capped():
    def clip_coefficient(ops, norm, clip):
        return ops.mul(ops.reciprocal(ops.add_constant(norm, 1e-6)), clip)
    return {"clip_coefficient": clip_coefficient}


def _clip_eps_1e8():
    def clip_coefficient(ops, norm, clip):
        scale = ops.mul(ops.reciprocal(ops.add_constant(norm, 1e-8)), clip)
        return ops.xp.minimum(scale, ops.xp.ones_like(norm))
    return {"clip_coefficient": clip_coefficient}


def _blockwise_norm():
    def norm(self, x):
        xp = self.xp
        return self.round(per_block(xp, x, lambda part: xp.sqrt(xp.sum(part * part, axis=1, keepdims=True)),
                                    channels=False))
    return {"Arithmetic.norm": norm}


def _blockwise_count():
    seen = {}

    def count_true(ops, positive, numel):
        xp = ops.xp
        ones = xp.astype(positive, ops.work)
        seen["sizes"] = sizes(xp, ones, channels=False)
        return xp.astype(per_block(xp, ones, lambda part: xp.sum(part, axis=1, keepdims=True), channels=False),
                         xp.int64)

    def cautious_scale(ops, count, numel, float32_scalars):
        xp = ops.xp
        if float32_scalars:
            shifted = xp.astype(count, xp.float32) + 1e-8
            return xp.astype((1.0 / shifted) * xp.astype(seen["sizes"], xp.float32), ops.work)
        return ops.in_work(xp.astype(seen["sizes"], ops.scalar) / (xp.astype(count, ops.scalar) + 1e-8))
    return {"count_true": count_true, "cautious_scale": cautious_scale}


def _betas_swapped():
    def fisher_estimates(ops, fim, fim_diff, prev_grad, g, beta1, beta2):
        return dope.fisher_estimates(ops, fim, fim_diff, prev_grad, g, beta2, beta1)
    return {"fisher_estimates": fisher_estimates}


def _prev_grad_before_clip():
    seen = {}

    def clip_by_norm(ops, g, clip):
        seen["unclipped"] = g
        return dope.clip_by_norm(ops, g, clip)

    def fisher_estimates(ops, fim, fim_diff, prev_grad, g, beta1, beta2):
        fim, fim_diff, _ = dope.fisher_estimates(ops, fim, fim_diff, prev_grad, g, beta1, beta2)
        return fim, fim_diff, seen.pop("unclipped", g)
    return {"clip_by_norm": clip_by_norm, "fisher_estimates": fisher_estimates}


def _no_bias_correction_2():
    def bias_corrections(ops, t, beta1, beta2):
        b1, _ = dope.bias_corrections(ops, t, beta1, beta2)
        return b1, 1.0 + 0 * t
    return {"bias_corrections": bias_corrections}


def _bias_corrections_t_plus_1():
    return {"bias_corrections": lambda ops, t, beta1, beta2: dope.bias_corrections(ops, t + 1, beta1, beta2)}


def _floor_ignored():
    return {"epsilon": lambda ops, t, eps, eps_floor: eps}


def _floor_not_growing():
    return {"epsilon": lambda ops, t, eps, eps_floor: dope.epsilon(ops, 1.0 + 0 * t, eps, eps_floor)}


def _diff_mult_ignored():
    def denominators(ops, fim, fim_diff, b1, b2, eps_hat, diff_mult, eps2):
        return dope.denominators(ops, fim, fim_diff, b1, b2, eps_hat, 1.0, eps2)
    return {"denominators": denominators}


def _eps2_ignored():
    def denominators(ops, fim, fim_diff, b1, b2, eps_hat, diff_mult, eps2):
        return dope.denominators(ops, fim, fim_diff, b1, b2, eps_hat, diff_mult, 0.0)
    return {"denominators": denominators}


def _one_division():
    return {"natural_gradient": lambda ops, g, denom, denom_diff: ops.div(g, denom)}


def _mars_without_ratio():
    def mars_correction(ops, u, g, g_prev, gamma, beta1, mars_current_grad):
        correction = ops.mul(g if mars_current_grad else g_prev, gamma)
        return ops.add(u, correction)
    return {"mars_correction": mars_correction}


def _momentum_not_centred():
    def momentum(ops, exp_avg, c_t, momentum_beta, torch_empty_axis_mean):
        decayed = ops.mul(exp_avg, momentum_beta)
        return ops.add(decayed, c_t, alpha=1.0 - momentum_beta)
    return {"momentum": momentum}


def _mask_not_rescaled():
    return {"cautious_scale": lambda ops, count, numel, float32_scalars: 1.0}


def _mask_ge_zero():
    def agreement(ops, u, g, c_t, cautious_processed_grad):
        return ops.mul(u, g if cautious_processed_grad else c_t) >= 0
    return {"agreement": agreement}


def _decay_after_update():
    seen = {}

    def preconditioned_weight_decay(ops, p, denom, denom_diff, lr, weight_decay):
        seen["decay"] = (denom, denom_diff, lr, weight_decay)
        return p

    def parameter_update(ops, p, u, lr):
        p = dope.parameter_update(ops, p, u, lr)
        if "decay" in seen:
            p = dope.preconditioned_weight_decay(ops, p, *seen.pop("decay"))
        return p
    return {"preconditioned_weight_decay": preconditioned_weight_decay, "parameter_update": parameter_update}


def _plain_decay():
    def preconditioned_weight_decay(ops, p, denom, denom_diff, lr, weight_decay):
        return ops.add(p, p, alpha=-lr * weight_decay)
    return {"preconditioned_weight_decay": preconditioned_weight_decay}


def _lr_off_by_one_percent():
    return {"parameter_update": lambda ops, p, u, lr: dope.parameter_update(ops, p, u, lr * 1.01)}


MUTANTS = (
    Mutant("switch-nonzero-dope", D, ("D1", "D2", "D3", "D13"),
           "switches act when non-zero (as SAVEUS's), so a negative centralization acts", _switch_nonzero),
    Mutant("clip-not-capped-at-one", D, ("D3",), "the clip coefficient is not capped at 1", _clip_not_capped),
    Mutant("clip-norm-eps-1e-8", D, ("D3",), "the clip coefficient is clip/(norm + 1e-8)", _clip_eps_1e8),
    Mutant("blockwise-clip-norm", D, ("D3",), "the clipping norm computed per block of 64K elements",
           _blockwise_norm),
    Mutant("blockwise-cautious-count", D, ("D12",),
           "the cautious count and its scale n/k computed per block of 64K elements", _blockwise_count),
    Mutant("fisher-betas-swapped", D, ("D4",), "fim decays with beta1 and fim_diff with beta2", _betas_swapped),
    Mutant("prev-grad-before-clip", D, ("D4", "D3"), "prev_grad stores the gradient before the norm clip",
           _prev_grad_before_clip),
    Mutant("no-bias-correction-2-dope", D, ("D5", "D7"), "the fim denominator is not divided by sqrt(1 - beta2**t)",
           _no_bias_correction_2),
    Mutant("bias-corrections-t-plus-1-dope", D, ("D5",), "the bias corrections use t + 1",
           _bias_corrections_t_plus_1),
    Mutant("eps-floor-ignored", D, ("D6",), "eps_floor is ignored", _floor_ignored),
    Mutant("eps-floor-not-growing", D, ("D6",), "the floored epsilon does not grow with sqrt(t)",
           _floor_not_growing),
    Mutant("diff-mult-ignored", D, ("D7",), "diff_mult is ignored", _diff_mult_ignored),
    Mutant("eps2-ignored", D, ("D7",), "eps2 is not added to the difference denominator", _eps2_ignored),
    Mutant("one-division", D, ("D8",), "the natural gradient divides by the fim denominator only", _one_division),
    Mutant("mars-without-ratio", D, ("D9",), "the MARS coefficient is gamma, without beta1/(1-beta1)",
           _mars_without_ratio),
    Mutant("mars-previous-grad", D, ("D9", "Q3"), "the MARS term uses g_{t-1}, as documented",
           quirks=("mars_current_grad",)),
    Mutant("momentum-not-centred", D, ("D10",), "the momentum is not centred", _momentum_not_centred),
    Mutant("amplification-without-lambda", D, ("D11", "Q4"), "the amplification is t**lambda",
           quirks=("lambda_scaled_amplification",)),
    Mutant("float64-scalars", D, ("D11", "D12", "Q5"),
           "the amplification and the cautious scale in float64, no reciprocal", quirks=("float32_scalars",),
           only=("float64",)),
    Mutant("cautious-against-mars-grad", D, ("D12", "Q6"), "the cautious mask compares with c_t",
           quirks=("cautious_processed_grad",)),
    Mutant("cautious-mask-not-rescaled", D, ("D12",), "the cautious mask is not rescaled by n/k",
           _mask_not_rescaled),
    Mutant("cautious-mask-ge-zero", D, ("D12",), "the cautious mask keeps u*g >= 0 instead of > 0",
           _mask_ge_zero),
    Mutant("decay-after-update", D, ("D13",), "the weight decay is applied to p after the D14 update",
           _decay_after_update),
    Mutant("plain-decay", D, ("D13",), "the weight decay is not preconditioned (w = p)", _plain_decay),
    Mutant("lr-off-by-one-percent", D, ("D14",), "the update uses 1.01 * lr", _lr_off_by_one_percent),
)
