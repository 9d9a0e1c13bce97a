"""SAVEUS, clauses S0-S10 of spec/saveus.md."""
from __future__ import annotations

from . import _validate as v
from ._arrays import Arith, normalizer_std, self_lerp, trailing_mean
from ._base import Optimizer
from ._state import SAVEUSState


def default_clip_lambda(t):
    """S9 default threshold ``t**0.25``; ``t`` is the 1-based step count as a 0-d float array."""
    return t**0.25


class SAVEUS(Optimizer):
    """SAVEUS as the public PyTorch code computes it (profile ``reference``).

    ``clip_lambda`` receives the step count as a 0-d float array (so the step stays traceable)
    and must return a number or a 0-d array; it is used only when ``clip_gradients`` is True.
    """

    name = "SAVEUS"
    State = SAVEUSState
    DEFAULTS = (
        ("lr", 1e-3),
        ("betas", (0.9, 0.999)),
        ("eps", 1e-8),
        ("weight_decay", 0.0),
        ("centralization", 0.5),
        ("normalization", 0.5),
        ("normalize_channels", True),
        ("amp_fac", 2.0),
        ("clip_lambda", default_clip_lambda),
        ("decouple_weight_decay", False),
        ("clip_gradients", False),
    )

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, centralization=0.5,
                 normalization=0.5, normalize_channels=True, amp_fac=2.0, clip_lambda=default_clip_lambda,
                 decouple_weight_decay=False, clip_gradients=False, **options):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         centralization=centralization, normalization=normalization,
                         normalize_channels=normalize_channels, amp_fac=amp_fac, clip_lambda=clip_lambda,
                         decouple_weight_decay=decouple_weight_decay, clip_gradients=clip_gradients, **options)

    def _validate(self, h):
        # The reference validates nothing; refopt rejects values for which no step is meaningful
        # (spec/errors.md). Negative weight_decay/centralization/normalization keep their
        # reference meaning (the switches test != 0), so they stay allowed.
        h["lr"] = v.real("lr", h["lr"], low=0.0, high=None, msg="Invalid learning rate")
        h["betas"] = v.betas(h["betas"])
        h["eps"] = v.real("eps", h["eps"], low=0.0, high=None, msg="Invalid epsilon value")
        for k in ("weight_decay", "centralization", "normalization", "amp_fac"):
            h[k] = v.real(k, h[k])
        for k in ("normalize_channels", "decouple_weight_decay", "clip_gradients"):
            h[k] = v.flag(k, h[k])
        if h["clip_lambda"] is not None and not callable(h["clip_lambda"]):
            raise TypeError(f"clip_lambda must be callable or None, got {h['clip_lambda']!r}")
        return h

    def _update(self, param, grad, state):
        h, q = self._hparams, self.quirks
        A = Arith(param)
        xp, rd = A.xp, A.rd
        b1, b2 = h["betas"]
        p, g = A.to_work(param), A.to_work(grad)
        ema, ema_sq = A.to_work(state.ema), A.to_work(state.ema_squared)
        step = xp.asarray(state.step + 1)  # S0 (NumPy would give a scalar)
        t = A.step_count(state.step)

        c = h["centralization"]
        if c != 0:  # S1 (gate: != 0, so a negative value acts)
            g = rd(g - rd(rd(trailing_mean(xp, g, q.torch_empty_axis_mean)) * c))
        a = h["normalization"]
        if a != 0:  # S2 (value only switches the clause on while aliased_lerp holds)
            s = normalizer_std(xp, g, h["normalize_channels"])
            if s is not None:
                g_hat = rd(g / rd(rd(s) + A.dscalar(1e-8)))
                g = self_lerp(xp, g_hat) if q.aliased_lerp else rd(g + a * (g_hat - g))

        bc2_sqrt = xp.sqrt(A.one_minus_pow(b2, t))  # S3, scalar dtype
        step_size = h["lr"] / A.one_minus_pow(b1, t)

        ema = rd(rd(ema * b1) + A.dscalar(1.0 - b1) * g)  # S4
        g = rd(g + A.dscalar(h["amp_fac"]) * ema)  # S5: the new ema, not bias-corrected
        ema_sq = rd(rd(ema_sq * b2) + (1.0 - b2) * g * g)  # S6: of the amplified g
        denom = rd(rd(rd(xp.sqrt(ema_sq)) / A.scalar(bc2_sqrt)) + A.dscalar(h["eps"]))  # S7

        wd = h["weight_decay"]
        if h["decouple_weight_decay"] and wd != 0:  # S8 decoupled: step_size includes 1/bc1
            p = rd(p * A.scalar(1.0 - step_size * wd))
        elif wd != 0:  # S8 coupled: after S6, so neither amplified nor in ema_squared
            g = rd(g + A.dscalar(wd) * p)

        if h["clip_gradients"] and h["clip_lambda"] is not None:  # S9: clips the final direction
            lim = h["clip_lambda"](t)
            lim = A.const(lim, A.sdtype) if isinstance(lim, (int, float)) else xp.astype(lim, A.sdtype)
            lim = A.scalar(lim)
            g = rd(xp.minimum(xp.maximum(g, -lim), lim))

        p = rd(p - A.scalar(step_size) * (g / denom))  # S10: one rounding, like addcdiv
        return A.to_storage(p), SAVEUSState(step, A.to_storage(ema), A.to_storage(ema_sq))
