"""DOPE, clauses D0-D14 of spec/dope.md."""
from __future__ import annotations

import math

from . import _validate as v
from ._arrays import Arith, normalizer_std, self_lerp, trailing_mean
from ._base import Optimizer
from ._state import DOPEState


class DOPE(Optimizer):
    """DOPE as the public PyTorch code computes it (profile ``reference``)."""

    name = "DOPE"
    State = DOPEState
    DEFAULTS = (
        ("lr", 1.5e-4),
        ("betas", (0.999, 0.9999)),
        ("momentum_beta", 0.9999),
        ("eps", 1e-6),
        ("eps2", 1e-2),
        ("eps_floor", None),
        ("weight_decay", 0.01),
        ("centralization", 0.5),
        ("normalization", 0.5),
        ("diff_mult", 1.0),
        ("momentum_lambda", 0.25),
        ("gamma", 0.0005),
        ("clip", 1.0),
        ("cautious", True),
        ("normalize_channels", True),
    )

    def __init__(self, lr=1.5e-4, betas=(0.999, 0.9999), momentum_beta=0.9999, eps=1e-6, eps2=1e-2,
                 eps_floor=None, weight_decay=0.01, centralization=0.5, normalization=0.5, diff_mult=1.0,
                 momentum_lambda=0.25, gamma=0.0005, clip=1.0, cautious=True, normalize_channels=True,
                 **options):
        super().__init__(lr=lr, betas=betas, momentum_beta=momentum_beta, eps=eps, eps2=eps2,
                         eps_floor=eps_floor, weight_decay=weight_decay, centralization=centralization,
                         normalization=normalization, diff_mult=diff_mult, momentum_lambda=momentum_lambda,
                         gamma=gamma, clip=clip, cautious=cautious, normalize_channels=normalize_channels,
                         **options)

    def _validate(self, h):
        # The reference's own checks, in its wording, plus finiteness and types (spec/errors.md).
        h["lr"] = v.real("lr", h["lr"], low=0.0, high=None, msg="Invalid learning rate")
        h["eps"] = v.real("eps", h["eps"], low=0.0, high=None, msg="Invalid epsilon value")
        h["eps2"] = v.real("eps2", h["eps2"], low=0.0, high=None, msg="Invalid epsilon2 value")
        h["betas"] = v.betas(h["betas"])
        h["momentum_beta"] = v.real("momentum_beta", h["momentum_beta"], low=0.0, high=1.0,
                                    msg="Invalid momentum_beta parameter")
        if h["eps_floor"] is not None:
            h["eps_floor"] = v.real("eps_floor", h["eps_floor"], low=0.0, high=None, msg="Invalid eps_floor value")
        for k in ("weight_decay", "centralization", "normalization", "diff_mult", "momentum_lambda",
                  "gamma", "clip"):
            h[k] = v.real(k, h[k])
        for k in ("cautious", "normalize_channels"):
            h[k] = v.flag(k, h[k])
        return h

    def _update(self, param, grad, state):
        h, q = self._hparams, self.quirks
        A = Arith(param)
        xp, rd = A.xp, A.rd
        b1, b2 = h["betas"]
        mb, lam = h["momentum_beta"], h["momentum_lambda"]
        p, g = A.to_work(param), A.to_work(grad)
        exp_avg, fim = A.to_work(state.exp_avg), A.to_work(state.fim)
        fim_diff, prev = A.to_work(state.fim_diff), A.to_work(state.prev_grad)
        step = xp.asarray(state.step + 1)  # D0 (NumPy would give a scalar)
        t = A.step_count(state.step)

        c = h["centralization"]
        if c > 0:  # D1 (gate: > 0, unlike S1's != 0)
            g = rd(g - rd(rd(trailing_mean(xp, g, q.torch_empty_axis_mean)) * c))
        a = h["normalization"]
        if a > 0:  # D2
            s = normalizer_std(xp, g, h["normalize_channels"])
            if s is not None:
                g_hat = rd(g / rd(rd(s) + A.dscalar(1e-8)))
                g = self_lerp(xp, g_hat) if q.aliased_lerp else rd(g + a * (g_hat - g))
        if h["clip"] > 0:  # D3: per tensor, always multiplied, NaN norms propagate; clip/x is 1/x then *clip (torch)
            norm = rd(xp.sqrt(xp.sum(g * g)))
            coef = xp.minimum(rd(rd(1.0 / rd(norm + A.dscalar(1e-6))) * h["clip"]), xp.ones_like(norm))
            g = rd(g * coef)

        fim = rd(rd(fim * b2) + (1.0 - b2) * g * g)  # D4: b2 with fim ...
        d = rd(g - prev)
        fim_diff = rd(rd(fim_diff * b1) + (1.0 - b1) * d * d)  # ... b1 with fim_diff
        g_prev, prev = prev, g  # prev_grad now holds this step's processed gradient

        bc1 = A.one_minus_pow(b1, t)  # D5
        bc2 = A.one_minus_pow(b2, t)
        if h["eps_floor"] is None:  # D6
            eps_hat = h["eps"]
        else:
            eps_hat = A.scalar(xp.maximum(A.const(h["eps_floor"], A.sdtype),
                                          h["eps"] * xp.sqrt(t)))
        denom = rd(rd(rd(xp.sqrt(fim)) / A.scalar(xp.sqrt(bc2))) + A.dscalar(eps_hat))  # D7
        denom_diff = rd(rd(rd(rd(xp.sqrt(fim_diff)) / A.scalar(xp.sqrt(bc1))) * h["diff_mult"]) + A.dscalar(h["eps2"]))
        u = rd(rd(g / denom) / denom_diff)  # D8: two divisions, in this order

        mars = h["gamma"] * (b1 / (1.0 - b1))  # D9: a Python float, as in the reference
        u = rd(u + rd(mars * (prev if q.mars_current_grad else g_prev)))
        c_t = u

        exp_avg = rd(rd(exp_avg * mb) + A.dscalar(1.0 - mb) * u)  # D10: centred value is the state
        exp_avg = rd(exp_avg - rd(trailing_mean(xp, exp_avg, q.torch_empty_axis_mean)))

        u = rd(u + rd(exp_avg * self._amplification(A, state.step)))  # D11

        if h["cautious"]:  # D12
            ref = prev if q.cautious_processed_grad else c_t
            pos = rd(u * ref) > 0
            scale = self._cautious_scale(A, pos, math.prod(param.shape))
            mask = rd(xp.where(pos, xp.ones_like(u), xp.zeros_like(u)) * scale)
            u = rd(u * mask)

        wd = h["weight_decay"]
        if wd > 0:  # D13: pre-update p, the same denominators as D7
            w = rd(rd(p / denom) / denom_diff)
            p = rd(p + A.dscalar(-h["lr"] * wd) * w)
        p = rd(p + A.dscalar(-h["lr"]) * u)  # D14
        return A.to_storage(p), DOPEState(step, *(A.to_storage(x) for x in (exp_avg, fim, fim_diff, prev)))

    def _amplification(self, A, step):
        """D11 a = lambda * t**lambda: float32 pow then float32 multiply (quirks Q4, Q5)."""
        xp, lam = A.xp, self._hparams["momentum_lambda"]
        if self.quirks.float32_scalars:
            t = xp.astype(step + 1, xp.float32)
            a = xp.pow(t, A.const(lam, xp.float32))
            a = lam * a if self.quirks.lambda_scaled_amplification else a
            return xp.astype(a, A.work)
        a = A.step_count(step) ** lam
        return A.scalar(lam * a if self.quirks.lambda_scaled_amplification else a)

    def _cautious_scale(self, A, pos, numel):
        """D12 numel / (k + 1e-8): float32, as reciprocal(q) * numel (quirk Q5)."""
        xp = A.xp
        k = xp.sum(xp.astype(pos, xp.int32 if numel < 2**31 else xp.int64))
        if self.quirks.float32_scalars:
            qk = xp.astype(k, xp.float32) + 1e-8
            return xp.astype((1.0 / qk) * float(numel), A.work)
        return A.scalar(float(numel) / (xp.astype(k, A.sdtype) + 1e-8))

