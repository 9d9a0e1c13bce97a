"""spec/dope.md as code: DOPE, clauses D0-D14, one function per clause.

Read it beside the spec: each function is one clause, each statement one R(.) of its equation
(``ops`` is the tensor's ``Arithmetic``: A3's rounding and A3.3's scalar roles), and
``DOPE._update`` runs the clauses in the spec's order. D1 and D2 are ``centralize`` and
``normalize`` of ``refopt.common``, shared with SAVEUS. The functions are also the vocabulary of
the fast paths: refopt.optax's row-blocked walk calls them on blocks of rows.
"""
from __future__ import annotations

from . import registry
from ._arithmetic import Arithmetic
from ._optimizer import Optimizer, count_step
from ._state import DOPEState
from .common import centralize, normalize, trailing_mean


def acts(value: float) -> bool:
    """DOPE's switches (D1, D2, D3, D13): a hyperparameter acts when it is positive, so a value
    <= 0 turns its clause off (unlike SAVEUS's != 0)."""
    return value > 0


def clip_coefficient(ops, norm, clip: float):
    """D3's k_C <dope.md#d3>: min(clip / (norm + 1e-6), 1), the quotient a reciprocal then a
    multiply (as PyTorch evaluates ``number / tensor``)."""
    shifted = ops.add_constant(norm, 1e-6)
    inverse = ops.reciprocal(shifted)
    scale = ops.mul(inverse, clip)
    return ops.xp.minimum(scale, ops.xp.ones_like(norm))  # exact (A3.4)


def clip_by_norm(ops, g, clip: float):
    """D3 <dope.md#d3>: g * k_C with the whole tensor's norm; always multiplied."""
    norm = ops.norm(g)
    coefficient = clip_coefficient(ops, norm, clip)
    return ops.mul(g, coefficient)


def fisher_estimates(ops, fim, fim_diff, prev_grad, g, beta1: float, beta2: float):
    """D4 <dope.md#d4>: fim <- EMA(beta2) of g*g, fim_diff <- EMA(beta1) of (g - prev_grad)**2,
    prev_grad <- g. Returns (fim, fim_diff, prev_grad)."""
    decayed = ops.mul(fim, beta2)
    fim = ops.addcmul(decayed, g, g, value=1.0 - beta2)
    diff = ops.sub(g, prev_grad)
    decayed = ops.mul(fim_diff, beta1)
    fim_diff = ops.addcmul(decayed, diff, diff, value=1.0 - beta1)
    return fim, fim_diff, g


def bias_corrections(ops, t, beta1: float, beta2: float):
    """D5 <dope.md#d5>: b1 = 1 - beta1**t, b2 = 1 - beta2**t, in S."""
    return ops.one_minus_pow(beta1, t), ops.one_minus_pow(beta2, t)


def epsilon(ops, t, eps: float, eps_floor):
    """D6 <dope.md#d6>: eps, or max(eps_floor, eps * sqrt(t)) when eps_floor is set."""
    if eps_floor is None:
        return eps
    floor = ops.constant(eps_floor, ops.scalar)
    grown = eps * ops.xp.sqrt(t)
    return ops.in_work(ops.xp.maximum(floor, grown))


def denominators(ops, fim, fim_diff, b1, b2, eps_hat, diff_mult: float, eps2: float):
    """D7 <dope.md#d7>: sqrt(fim) / sqrt(b2) + eps_hat and
    sqrt(fim_diff) / sqrt(b1) * diff_mult + eps2, the square roots of b1, b2 taken in S."""
    root = ops.sqrt(fim)
    scaled = ops.div(root, ops.in_work(ops.xp.sqrt(b2)))
    denom = ops.add_constant(scaled, eps_hat)
    root_diff = ops.sqrt(fim_diff)
    scaled_diff = ops.div(root_diff, ops.in_work(ops.xp.sqrt(b1)))
    scaled_diff = ops.mul(scaled_diff, diff_mult)
    denom_diff = ops.add_constant(scaled_diff, eps2)
    return denom, denom_diff


def natural_gradient(ops, g, denom, denom_diff):
    """D8 <dope.md#d8>: (g / denom) / denom_diff, two divisions in this order."""
    u = ops.div(g, denom)
    return ops.div(u, denom_diff)


def mars_correction(ops, u, g, g_prev, gamma: float, beta1: float, mars_current_grad: bool):
    """D9 <dope.md#d9>: u + gamma * beta1 / (1 - beta1) * r, r = g_t (Q3 on) or g_{t-1}."""
    coefficient = gamma * (beta1 / (1.0 - beta1))  # a Python float, as in the reference
    correction = ops.mul(g if mars_current_grad else g_prev, coefficient)
    return ops.add(u, correction)


def momentum(ops, exp_avg, c_t, momentum_beta: float, torch_empty_axis_mean: bool):
    """D10 <dope.md#d10>: exp_avg * mu + (1 - mu) * c_t, then minus its trailing mean (A1); the
    centred value is the new exp_avg."""
    decayed = ops.mul(exp_avg, momentum_beta)
    exp_avg = ops.add(decayed, c_t, alpha=1.0 - momentum_beta)
    mean = trailing_mean(ops, exp_avg, torch_empty_axis_mean)
    return ops.sub(exp_avg, mean)


def float32_power(ops, count, exponent: float):
    """D11's pow_32 <dope.md#d11>: f32(t) ** f32(lambda), correctly rounded to float32 (as
    PyTorch computes it on the CPU). Evaluated in S and rounded once: NumPy's float32 power is
    not correctly rounded; without float64 (JAX without x64) XLA's float32 power is used, which is."""
    xp = ops.xp
    base = xp.astype(xp.astype(count, xp.float32), ops.scalar)
    power = xp.pow(base, xp.astype(ops.constant(exponent, xp.float32), ops.scalar))
    return xp.astype(power, xp.float32)


def amplification(ops, count, t, momentum_lambda: float, lambda_scaled: bool, float32_scalars: bool):
    """D11's A_t <dope.md#d11>: lambda * t**lambda (Q4 off: t**lambda), in float32 (Q5) or in S,
    returned in W. ``count`` is t as the integer step count, ``t`` the same in S."""
    xp = ops.xp
    if float32_scalars:
        power = float32_power(ops, count, momentum_lambda)
        return xp.astype(momentum_lambda * power if lambda_scaled else power, ops.work)
    power = t**momentum_lambda
    return ops.in_work(momentum_lambda * power if lambda_scaled else power)


def amplified_momentum(ops, u, exp_avg, amplification_factor):
    """D11 <dope.md#d11>: u + exp_avg * A_t."""
    boost = ops.mul(exp_avg, amplification_factor)
    return ops.add(u, boost)


def agreement(ops, u, g, c_t, cautious_processed_grad: bool):
    """D12's P <dope.md#d12>: [u * r > 0], r = g_t (Q6 on) or c_t, the product rounded to D."""
    product = ops.mul(u, g if cautious_processed_grad else c_t)
    return product > 0


def count_true(ops, positive, numel: int):
    """D12's k: the exact number of true elements (an integer wide enough for ``numel``)."""
    xp = ops.xp
    return xp.sum(xp.astype(positive, xp.int32 if numel < 2**31 else xp.int64))


def cautious_scale(ops, count, numel: int, float32_scalars: bool):
    """D12's sigma_k <dope.md#d12>: n / (k + 1e-8); a float32 reciprocal then multiply (Q5),
    else in S. Returned in W."""
    xp = ops.xp
    if float32_scalars:
        shifted = xp.astype(count, xp.float32) + 1e-8
        return xp.astype((1.0 / shifted) * numel, ops.work)
    return ops.in_work(numel / (xp.astype(count, ops.scalar) + 1e-8))


def cautious_mask(ops, u, g, c_t, numel: int, float32_scalars: bool, cautious_processed_grad: bool):
    """D12 <dope.md#d12>: u * P * sigma_k, P the sign agreement of u with g_t (or c_t)."""
    xp = ops.xp
    positive = agreement(ops, u, g, c_t, cautious_processed_grad)
    scale = cautious_scale(ops, count_true(ops, positive, numel), numel, float32_scalars)
    indicator = xp.where(positive, xp.ones_like(u), xp.zeros_like(u))
    mask = ops.mul(indicator, scale)
    return ops.mul(u, mask)


def preconditioned_weight_decay(ops, p, denom, denom_diff, lr: float, weight_decay: float):
    """D13 <dope.md#d13>: p - lr * weight_decay * (p / denom) / denom_diff, with the p before
    this step's update and the denominators of D7."""
    w = ops.div(p, denom)
    w = ops.div(w, denom_diff)
    return ops.add(p, w, alpha=-lr * weight_decay)


def parameter_update(ops, p, u, lr: float):
    """D14 <dope.md#d14>: p - lr * u."""
    return ops.add(p, u, alpha=-lr)


class DOPE(Optimizer):
    """DOPE as the public PyTorch code computes it (profile ``reference``; spec/dope.md).

    A pure optimizer for one array at a time, on any array-API library (NumPy, PyTorch, JAX,
    CuPy, ...): ``state = opt.init(param)``, then ``param, state = opt.step(param, grad, state)``.
    The per-tensor reductions (D1-D3, D10, D12) are over the whole array it is given; for a torch
    DTensor, over the whole sharded tensor (refopt._sharded)."""

    facts = registry.DOPE
    State = DOPEState
    UPDATE = (("D0", count_step), ("D1", centralize), ("D2", normalize), ("D3", clip_coefficient),
              ("D3", clip_by_norm),
              ("D4", fisher_estimates), ("D5", bias_corrections), ("D6", epsilon), ("D7", denominators),
              ("D8", natural_gradient), ("D9", mars_correction), ("D10", momentum),
              ("D11", float32_power), ("D11", amplification), ("D11", amplified_momentum), ("D12", agreement),
              ("D12", count_true), ("D12", cautious_scale), ("D12", cautious_mask), ("D13", preconditioned_weight_decay), ("D14", parameter_update))

    def _update(self, param, grad, state, xp=None):
        quirks, (beta1, beta2) = self.quirks, self.betas
        ops = Arithmetic(param, xp)
        p, g = ops.widen(param), ops.widen(grad)
        exp_avg, fim = ops.widen(state.exp_avg), ops.widen(state.fim)
        fim_diff, prev_grad = ops.widen(state.fim_diff), ops.widen(state.prev_grad)

        step, t = count_step(ops, state.step)                                        # D0
        if acts(self.centralization):                                                # D1
            g = centralize(ops, g, self.centralization, quirks.torch_empty_axis_mean)
        if acts(self.normalization):                                                 # D2
            g = normalize(ops, g, self.normalization, self.normalize_channels, quirks.aliased_lerp)
        if acts(self.clip):                                                          # D3
            g = clip_by_norm(ops, g, self.clip)
        g_prev = prev_grad
        fim, fim_diff, prev_grad = fisher_estimates(ops, fim, fim_diff, prev_grad, g, beta1, beta2)  # D4
        b1, b2 = bias_corrections(ops, t, beta1, beta2)                              # D5
        eps_hat = epsilon(ops, t, self.eps, self.eps_floor)                          # D6
        denom, denom_diff = denominators(ops, fim, fim_diff, b1, b2, eps_hat, self.diff_mult, self.eps2)  # D7
        u = natural_gradient(ops, g, denom, denom_diff)                              # D8
        u = mars_correction(ops, u, g, g_prev, self.gamma, beta1, quirks.mars_current_grad)  # D9
        c_t = u
        exp_avg = momentum(ops, exp_avg, c_t, self.momentum_beta, quirks.torch_empty_axis_mean)  # D10
        a_t = amplification(ops, step, t, self.momentum_lambda, quirks.lambda_scaled_amplification,
                            quirks.float32_scalars)                                  # D11
        u = amplified_momentum(ops, u, exp_avg, a_t)
        if self.cautious:                                                            # D12
            u = cautious_mask(ops, u, g, c_t, ops.size(param), quirks.float32_scalars,
                              quirks.cautious_processed_grad)
        if acts(self.weight_decay):                                                  # D13
            p = preconditioned_weight_decay(ops, p, denom, denom_diff, self.lr, self.weight_decay)
        p = parameter_update(ops, p, u, self.lr)                                     # D14
        new_state = DOPEState(step, ops.store(exp_avg), ops.store(fim), ops.store(fim_diff), ops.store(prev_grad))
        return ops.store(p), new_state
