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

They behave as torch.optim optimizers do under torch's tools: a 1-element tensor ``lr`` and the
``torch.optim.lr_scheduler`` classes, ``state_dict()`` checkpoints that ``torch.load`` reads with
``weights_only=True`` (and torch.distributed.checkpoint: per-parameter tensors and a 0-d tensor
``step``), and ``torch.compile`` of a training step that calls ``opt.step()``: the step is a graph
break and runs eagerly (it plans its batches on the host), so results equal eager ones. For one
graph, compile the core's pure step: ``torch.compile(refopt.DOPE().step, fullgraph=True)``. See
the class docstrings for the details and for the reference behaviours on zero gradients.

Sharded parameters (FSDP2, ``DTensor``) are stepped on their local shards with every per-tensor
statistic global over the mesh (``_sharded.py``); DDP and ``ZeroRedundancyOptimizer`` work as
with any torch.optim optimizer. backends/README.md shows how to train with them.
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



class SAVEUS(TorchOptimizer):
    """SAVEUS (refopt.SAVEUS semantics, spec/saveus.md) as a ``torch.optim.Optimizer``."""

    Core = _saveus.SAVEUS

    def _scalars(self, core, t, lr):
        s = bias_scalars(core, t)
        s["lr"] = lr
        s["step_size"] = lr / s["bc1"]  # S3 in float64 (a 0-d float64 tensor for a device lr)
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
    """DOPE (refopt.DOPE semantics, spec/dope.md) as a ``torch.optim.Optimizer``."""

    Core = _dope.DOPE
    PUBLIC_SCRATCH = ("mask",)  # the original's D12 mask, rebuilt every step

    def _scalars(self, core, t, lr):
        s = bias_scalars(core, t)
        s["lr"] = lr
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
                    K.dope_apply(lists, s["lr"], [scales[i] for i, _ in batch])

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

