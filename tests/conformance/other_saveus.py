"""A torch port with the interface and the two behaviours of the other public SAVEUS
(spec/saveus.md, "The other public SAVEUS"): ``decouple`` instead of ``decouple_weight_decay``, no
``clip_gradients`` (it clips whenever ``clip_lambda`` is set), decoupled decay p*(1 - lr*wd), other
defaults, and flags it accepts and ignores. Built on refopt's core with the two matching known
mistakes (refopt.builders.mutants), so these are its only differences; like the public code it
writes into p.grad. Checked by tests/conformance/test_port_checks.py with command-line options only."""
from __future__ import annotations

import torch

from refopt import saveus as core
from refopt.builders.mutants import BY_NAME, relinked

DIFFERENCES = ("decoupled-decay-without-bc1", "clip-whenever-lambda-set")


class SAVEUS(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.9999), eps=1e-8, amp_fac=2.0, weight_decay=0.1,
                 centralization=0.5, normalization=0.5, normalize_channels=True,
                 clip_lambda=lambda step: step**0.25, decouple=False, maximize=False, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple))
        cls = relinked(core.SAVEUS, {k: v for name in DIFFERENCES for k, v in BY_NAME[name].replaces().items()})
        self.core = cls(lr=lr, betas=betas, eps=eps, amp_fac=amp_fac, weight_decay=weight_decay,
                        centralization=centralization, normalization=normalization,
                        normalize_channels=normalize_channels, clip_lambda=clip_lambda,
                        decouple_weight_decay=decouple)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, ema=torch.zeros_like(p), ema_squared=torch.zeros_like(p))
                old = self.core.State(torch.tensor(st["step"]), st["ema"], st["ema_squared"])
                new_p, new = self.core.step(p.detach().clone(), p.grad, old)
                p.copy_(new_p)
                p.grad.copy_(new.ema)  # like the public code, it leaves its working values in p.grad
                st.update(step=st["step"] + 1, ema=new.ema, ema_squared=new.ema_squared)
