"""A DOPE torch port with the public code's defect under FSDP2 (backends/README.md): A1's mean
over all elements of a 1-D parameter (quirk Q2; clauses D1, D10) is the mean of each rank's shard.
Every other reduction is global. ``refopt check --shard`` must fail it, and say that sharding is
the cause; unsharded it is refopt's core and passes."""
import torch

import refopt
from refopt._sharded import Layout, ShardedNamespace, is_dtensor


class PerShardMean(ShardedNamespace):
    def mean(self, x, /, *, axis=None, keepdims=False):
        if axis is None:  # the defect: this shard's mean, as DTensor's mean(dim=()) gives it
            return self._base.mean(x, axis=None, keepdims=keepdims)
        return super().mean(x, axis=axis, keepdims=keepdims)


class DOPE(torch.optim.Optimizer):
    def __init__(self, params, **hparams):
        self.core = refopt.DOPE(**hparams)
        super().__init__(params, {})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=torch.tensor(0), **{k: torch.zeros_like(p) for k in self.core.facts.buffers})
                state = self.core.State(st["step"], *(st[k] for k in self.core.facts.buffers))
                if not is_dtensor(p):
                    new_p, new_state = self.core.step(p, p.grad, state)
                    p.copy_(new_p)
                else:
                    layout = Layout(p)
                    local = state._replace(**{k: getattr(state, k).to_local() for k in self.core.facts.buffers})
                    new_p, new_state = self.core._update(p.to_local(), p.grad.to_local(), local,
                                                         xp=PerShardMean(layout))
                    p.to_local().copy_(new_p)
                for k in self.core.facts.buffers:
                    target = st[k].to_local() if is_dtensor(st[k]) else st[k]
                    target.copy_(getattr(new_state, k))
                st["step"] = torch.as_tensor(new_state.step)
