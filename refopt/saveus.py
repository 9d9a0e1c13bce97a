"""spec/saveus.md as code: SAVEUS, clauses S0-S10, one function per clause.

Read it beside the spec: each function is one clause, each statement one R(.) of its equation
(``ops`` is the tensor's ``Arithmetic``: A3's rounding and A3.3's scalar roles), and
``SAVEUS._update`` runs the clauses in the spec's order. S1 and S2 are ``centralize`` and
``normalize`` of ``refopt.common``, shared with DOPE.
"""
from __future__ import annotations

import numbers

from . import registry
from ._arithmetic import Arithmetic
from ._optimizer import Optimizer, count_step
from ._state import SAVEUSState
from .common import centralize, normalize

default_clip_lambda = registry.clip_lambda_default


def acts(value: float) -> bool:
    """SAVEUS's switches (S1, S2, S8): a hyperparameter acts when it is non-zero, so a negative
    value acts too (the reference tests ``!= 0``)."""
    return value != 0


def bias_corrections(ops, t, beta1: float, beta2: float, lr: float):
    """S3 <saveus.md#s3>: step size lr / (1 - beta1**t) and rho = sqrt(1 - beta2**t), in S."""
    rho = ops.xp.sqrt(ops.one_minus_pow(beta2, t))
    step_size = lr / ops.one_minus_pow(beta1, t)
    return step_size, rho


def first_moment(ops, ema, g, beta1: float):
    """S4 <saveus.md#s4>: ema * beta1 + (1 - beta1) * g."""
    decayed = ops.mul(ema, beta1)
    return ops.add(decayed, g, alpha=1.0 - beta1)


def amplify(ops, g, ema, amp_fac: float):
    """S5 <saveus.md#s5>: g + amp_fac * ema, with the new ema."""
    return ops.add(g, ema, alpha=amp_fac)


def second_moment(ops, ema_squared, g, beta2: float):
    """S6 <saveus.md#s6>: ema_squared * beta2 + (1 - beta2) * g * g, of the amplified g."""
    decayed = ops.mul(ema_squared, beta2)
    return ops.addcmul(decayed, g, g, value=1.0 - beta2)


def denominator(ops, ema_squared, rho, eps: float):
    """S7 <saveus.md#s7>: sqrt(ema_squared) / rho + eps."""
    root = ops.sqrt(ema_squared)
    scaled = ops.div(root, ops.in_work(rho))
    return ops.add_constant(scaled, eps)


def decoupled_weight_decay(ops, p, step_size, weight_decay: float):
    """S8 <saveus.md#s8>, decoupled: p * (1 - step_size * weight_decay), the factor in S."""
    factor = ops.in_work(1.0 - step_size * weight_decay)
    return ops.mul(p, factor)


def coupled_weight_decay(ops, g, p, weight_decay: float):
    """S8 <saveus.md#s8>, coupled: g + weight_decay * p (after S6: not amplified, not in v)."""
    return ops.add(g, p, alpha=weight_decay)


def clip_threshold(ops, clip_lambda, t):
    """S9 <saveus.md#s9>: the bound clip_lambda(t) as a scalar of the scalar dtype S."""
    limit = clip_lambda(t)
    if isinstance(limit, numbers.Real):  # a Python or NumPy number
        return ops.constant(float(limit), ops.scalar)
    return ops.xp.astype(limit, ops.scalar)


def clip_by_value(ops, g, clip_gradients: bool, clip_lambda, t):
    """S9 <saveus.md#s9>: if clip_gradients and clip_lambda is set, g clamped to
    [-clip_lambda(t), clip_lambda(t)], the bound rounded to W."""
    if not clip_gradients or clip_lambda is None:
        return g
    bound = ops.in_work(clip_threshold(ops, clip_lambda, t))
    return ops.clamp(g, -bound, bound)


def parameter_update(ops, p, g, denom, step_size):
    """S10 <saveus.md#s10>: p - step_size * (g / denom), one rounding (torch's addcdiv)."""
    return ops.subcdiv(p, g, denom, step_size)


class SAVEUS(Optimizer):
    """SAVEUS as the public PyTorch code computes it (profile ``reference``; spec/saveus.md).

    A pure optimizer for one array at a time, on any array-API library (NumPy, PyTorch, JAX,
    CuPy, ...): ``state = opt.init(param)``, then ``param, state = opt.step(param, grad, state)``.
    ``clip_lambda`` receives the step count as a 0-d float array (so the step stays traceable)
    and returns a number or a 0-d array; it is called only when ``clip_gradients`` is True."""

    facts = registry.SAVEUS
    State = SAVEUSState
    UPDATE = (("S0", count_step), ("S1", centralize), ("S2", normalize), ("S3", bias_corrections),
              ("S4", first_moment), ("S5", amplify), ("S6", second_moment), ("S7", denominator),
              ("S8", decoupled_weight_decay), ("S8", coupled_weight_decay), ("S9", clip_threshold),
              ("S9", clip_by_value),
              ("S10", parameter_update))

    def _update(self, param, grad, state, xp=None):
        quirks, (beta1, beta2) = self.quirks, self.betas
        ops = Arithmetic(param, xp)
        p, g = ops.widen(param), ops.widen(grad)
        ema, ema_squared = ops.widen(state.ema), ops.widen(state.ema_squared)

        step, t = count_step(ops, state.step)                                        # S0
        if acts(self.centralization):                                                # S1
            g = centralize(ops, g, self.centralization, quirks.torch_empty_axis_mean)
        if acts(self.normalization):                                                 # S2
            g = normalize(ops, g, self.normalization, self.normalize_channels, quirks.aliased_lerp)
        step_size, rho = bias_corrections(ops, t, beta1, beta2, self.lr)             # S3
        ema = first_moment(ops, ema, g, beta1)                                       # S4
        g = amplify(ops, g, ema, self.amp_fac)                                       # S5
        ema_squared = second_moment(ops, ema_squared, g, beta2)                      # S6
        denom = denominator(ops, ema_squared, rho, self.eps)                         # S7
        if self.decouple_weight_decay and acts(self.weight_decay):                   # S8
            p = decoupled_weight_decay(ops, p, step_size, self.weight_decay)
        elif acts(self.weight_decay):
            g = coupled_weight_decay(ops, g, p, self.weight_decay)
        g = clip_by_value(ops, g, self.clip_gradients, self.clip_lambda, t)          # S9
        p = parameter_update(ops, p, g, denom, step_size)                            # S10
        return ops.store(p), SAVEUSState(step, ops.store(ema), ops.store(ema_squared))
