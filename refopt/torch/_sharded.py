"""refopt.torch on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, hand-made).

A DTensor parameter is stepped by the core's own update on its local shards, with the sharded
namespace of ``refopt._sharded``: every per-tensor reduction (A1, A2, D3, D10, D12) is global over
the mesh through all-reduces of partial sums, and nothing is gathered. The results are written in
place into the local shards of the parameter and of its state buffers, which are DTensors laid
out like it (``torch.zeros_like(param)``), so ``torch.distributed.checkpoint`` saves them sharded.
``step`` stays the 0-d int64 CPU tensor of every refopt.torch state.

Per tensor and step: SAVEUS all-reduces 3 partial sums (A1's mean, A2's two passes), DOPE 6 (and
D3's norm, D10's mean, D12's count); a reduction over axes no mesh dimension splits (the channel
statistics of a ``Shard(0)`` matrix) is local and costs none.
"""
from __future__ import annotations

import torch

from .._sharded import Layout, ShardedNamespace, is_dtensor  # noqa: F401 - is_dtensor for _optim


def check(p, where: str) -> None:
    """Raises, before anything is written, on what the DTensor path cannot take: a grad that is
    not a DTensor on the parameter's mesh, a Partial parameter."""
    grad = p.grad
    if is_dtensor(p) != is_dtensor(grad):
        kinds = ["a DTensor" if is_dtensor(x) else f"a {type(x).__name__}" for x in (p, grad)]
        raise TypeError(f"{where}: the parameter is {kinds[0]} but its grad is {kinds[1]}; both must be DTensors "
                        f"on one device mesh (as FSDP2 and tensor parallelism make them)")
    if is_dtensor(p):
        layout = Layout(p, where)
        if grad.device_mesh != layout.mesh:
            raise ValueError(f"{where}: the grad is on another device mesh than its parameter")


def update(core, params, states, buffers, t: int, where: str) -> None:
    """One step of ``core`` (its lr read on the host) for DTensor ``params`` with step count t."""
    for p, st in zip(params, states):
        layout = Layout(p, where)
        grad = layout.aligned(p.grad, "grad")
        for k in buffers:
            st[k] = _as_layout(layout, st[k], f"state[{k!r}]")
        local = layout.local(p)
        step = torch.full((), t - 1, dtype=torch.int64, device=local.device)  # a fill, no host copy
        state = core.State(step, *(layout.local(st[k]) for k in buffers))
        new_param, new_state = core._update(local, layout.local(grad), state, xp=ShardedNamespace(layout))
        local.copy_(new_param)
        for k in buffers:
            layout.local(st[k]).copy_(getattr(new_state, k))


def _as_layout(layout, buffer, what):
    """A state buffer laid out like the parameter. A plain tensor of the whole shape (a full state
    dict loaded with load_state_dict on every rank) becomes this rank's shard of it, sliced
    locally; a DTensor laid out otherwise is redistributed."""
    if not is_dtensor(buffer) and tuple(buffer.shape) == layout.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(buffer, layout.mesh, layout.placements, src_data_rank=None)
    return layout.aligned(buffer, what)
