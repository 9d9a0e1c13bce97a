"""refopt.torch: SAVEUS and DOPE as ``torch.optim.Optimizer`` subclasses.

    from refopt.torch import DOPE
    opt = DOPE(model.parameters(), lr=1.5e-4)       # the reference's names and defaults
    loss = opt.step(closure)                         # or loss.backward(); opt.step()

Hyperparameters, profiles and quirks are the core's (``refopt.DOPE`` / ``refopt.SAVEUS``), which
validates every parameter group. The update is the core's, computed in place on the optimizer's
own buffers, op for op in the reference's order: 16-bit tensors round as the core (and the
original code) do; float32/64 differ only in the order of sums and in three fused operations (an
ulp each). In float64 that is within 3e-15 of the scale of the core after 8 steps, and in every
dtype the conformance vectors' budgets are used as much as by the original code.

``step`` runs eagerly and is not meant to be wrapped in ``torch.compile`` (it reads host-side
step counts and plans its batches in Python). To compile an update, compile the core's pure step
instead: ``torch.compile(refopt.DOPE().step, fullgraph=True)``.
"""
from __future__ import annotations

import math

import torch

from .. import dope as _dope
from .. import saveus as _saveus
from . import _kernels as K
from . import _plan
from ._optim import TorchOptimizer, bias_scalars

__all__ = ["SAVEUS", "DOPE"]

_COMMON_DOC = """
    Differences from the original PyTorch code, all deliberate:

    * ``p.grad`` is left untouched (the original centralizes, normalizes and clips it in place);
      the processed gradient is built in the optimizer's scratch buffers.
    * Hyperparameters are validated (spec/errors.md), also for groups added later and at each
      step (a scheduler may have changed them); sparse gradients raise RuntimeError.
    * A step checks every group before writing anything, so a step that raises leaves all
      parameters and state unchanged.
    * ``state_dict()`` carries a format tag (param group key ``refopt_format``);
      ``load_state_dict`` rejects another optimizer's or another version's state with ValueError.

    Options: ``profile`` and ``quirks`` as in the core; ``foreach`` (None or True: group small
    tensors into multi-tensor ``torch._foreach_*`` calls; False: one tensor at a time; the
    results are the same on CPU); ``cpu_threads`` (default 1). On CPU a step runs its ops on
    ``cpu_threads`` intra-op threads (it calls ``torch.set_num_threads`` for the step's duration
    and restores the setting after; ``cpu_threads=None`` leaves torch's setting alone, which
    suits machines with many cores, where one thread cannot use the memory bandwidth) and processes
    large tensors in blocks of rows that stay in cache: faster than whole-tensor ops on all
    threads, which are bound by memory bandwidth, and immune to the stalls of many short
    parallel regions on a busy machine. Per element nothing changes (the trailing-axis reductions are per row), only DOPE's
    whole-tensor D3 norm is summed block by block. The optimizer keeps reusable scratch buffers
    (``scratch_bytes()``: one tensor's worth for DOPE's processed gradient plus a few blocks);
    they are not part of the state.

    Parameters may be float16, bfloat16, float32 or float64, on any device; parameters whose
    ``grad`` is None are skipped; empty parameters only count the step (A6).
"""


class SAVEUS(TorchOptimizer):
    Core = _saveus.SAVEUS
    BUFFERS = ("ema", "ema_squared")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, centralization=0.5,
                 normalization=0.5, normalize_channels=True, amp_fac=2.0, clip_lambda=_saveus.default_clip_lambda,
                 decouple_weight_decay=False, clip_gradients=False, *, profile="reference", quirks=None,
                 foreach=None, cpu_threads=1):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, centralization=centralization,
            normalization=normalization, normalize_channels=normalize_channels, amp_fac=amp_fac,
            clip_lambda=clip_lambda, decouple_weight_decay=decouple_weight_decay,
            clip_gradients=clip_gradients), profile=profile, quirks=quirks, foreach=foreach,
            cpu_threads=cpu_threads)

    def _scalars(self, core, t, device, dtype):
        s = bias_scalars(core, t)
        s["step_size"] = core.lr / s["bc1"]
        s["clip"] = None
        if core.clip_gradients and core.clip_lambda is not None:
            # S9: called with the 1-based step count as a 0-d float64 tensor, as the core does
            s["clip"] = float(core.clip_lambda(torch.tensor(float(t), dtype=torch.float64)))
        return s

    def _update(self, core, foreach, params, grads, states, s):
        h, q = core.hparams, core.quirks
        blockable = h["normalization"] == 0 or h["normalize_channels"]
        items = _plan.pieces(params, grads, states, self.BUFFERS, blockable)
        for batch in _plan.batches(items, foreach):
            _plan.attach_scratch(batch, self._scratch, "tmp", ("g", "t1"))
            K.saveus_batch(_plan.as_lists(batch), h, q, s)


class DOPE(TorchOptimizer):
    Core = _dope.DOPE
    BUFFERS = ("exp_avg", "fim", "fim_diff", "prev_grad")

    def __init__(self, params, lr=1.5e-4, betas=(0.999, 0.9999), momentum_beta=0.9999, eps=1e-6, eps2=1e-2,
                 eps_floor=None, weight_decay=0.01, centralization=0.5, normalization=0.5, diff_mult=1.0,
                 momentum_lambda=0.25, gamma=0.0005, clip=1.0, cautious=True, normalize_channels=True, *,
                 profile="reference", quirks=None, foreach=None, cpu_threads=1):
        super().__init__(params, dict(
            lr=lr, betas=betas, momentum_beta=momentum_beta, eps=eps, eps2=eps2, eps_floor=eps_floor,
            weight_decay=weight_decay, centralization=centralization, normalization=normalization,
            diff_mult=diff_mult, momentum_lambda=momentum_lambda, gamma=gamma, clip=clip, cautious=cautious,
            normalize_channels=normalize_channels), profile=profile, quirks=quirks, foreach=foreach,
            cpu_threads=cpu_threads)

    def _scalars(self, core, t, device, dtype):
        s = bias_scalars(core, t)
        # D6 in float64, as the reference's Python floats
        s["eps_hat"] = core.eps if core.eps_floor is None else max(core.eps_floor, core.eps * math.sqrt(t))
        s["amp"] = K.amplification(t, core.momentum_lambda, core.quirks)
        return s

    def _update(self, core, foreach, params, grads, states, s):
        h, q = core.hparams, core.quirks
        blockable = h["normalization"] <= 0 or h["normalize_channels"]
        dtype = params[0].dtype
        for a, b in _plan.segments(params, foreach):
            seg = params[a:b]
            items = _plan.pieces(seg, grads[a:b], states[a:b], self.BUFFERS, blockable)
            _plan.attach_scratch(items, self._scratch, "g")  # holds g, then u, across the phases
            # t3 holds g_{t-1} or c_t only where quirk Q3 or Q6 is off
            temps = ("t1", "t2", "t4") if q.mars_current_grad and (q.cautious_processed_grad or not h["cautious"]) \
                else ("t1", "t2", "t3", "t4")
            groups = []
            for batch in _plan.batches(items, foreach):
                _plan.attach_scratch(batch, self._scratch, "tmp", temps)
                groups.append((batch, _plan.as_lists(batch)))
            coefs = self._clip_coefs(groups, h, q, len(seg), dtype)
            counts = [[] for _ in seg]
            for batch, lists in groups:
                got = [None] * len(batch)
                K.dope_update(lists, h, q, s, None if coefs is None else [coefs[i] for i, _ in batch], got)
                for (i, _), c in zip(batch, got):
                    counts[i].append(c)
            if h["cautious"]:
                scales = [K.cautious_scale(sum(c[1:], c[0]), p.numel(), dtype, q.float32_scalars)
                          for c, p in zip(counts, seg)]
                for batch, lists in groups:
                    K.dope_apply(lists, h["lr"], [scales[i] for i, _ in batch])

    @staticmethod
    def _clip_coefs(groups, h, q, n, dtype):
        """Phase 1 (D1-D3 norms) over all pieces; the per-tensor D3 coefficients, or None."""
        norms = [[] for _ in range(n)]
        for batch, lists in groups:
            got = K.dope_grad(lists, h, q)
            for (i, _), v in zip(batch, got or ()):
                norms[i].append(v)
        if h["clip"] <= 0:
            return None
        return [K.clip_coef(v[0] if len(v) == 1 else torch.linalg.vector_norm(torch.stack(v)), h["clip"], dtype)
                for v in norms]


SAVEUS.__doc__ = ("SAVEUS (refopt.SAVEUS semantics) as a torch optimizer; state per parameter: "
                  "``step`` (int), ``ema``, ``ema_squared``.\n" + _COMMON_DOC)
DOPE.__doc__ = ("DOPE (refopt.DOPE semantics) as a torch optimizer; state per parameter: ``step`` "
                "(int), ``exp_avg`` (centred momentum), ``fim``, ``fim_diff``, ``prev_grad``.\n" + _COMMON_DOC)
