"""How one step's parameters are cut into pieces and batches (see _kernels.py), and the scratch
buffers those pieces write into. Decided from shapes, dtypes, devices and strides only."""
from __future__ import annotations

import math

import torch

#: Elements (of 4 bytes; half as many of 8) per batch on CPU: a batch's ~11 live buffers, 2 MiB
#: each, then stay in the last-level cache across a step's ~35 ops. Measured on a 2-core EPYC
#: (32 MiB L3): 2**18 and 2**19 within noise, 2**17 and 2**20 slower.
CHUNK = 1 << 19
#: DOPE's phases meet at per-tensor barriers (D3 norm, D12 count); small tensors are grouped
#: into segments of this many elements so that the scratch ``g`` stays bounded.
SEGMENT = 1 << 22


def row_blocks(p, grad, buffers, blockable: bool):
    """Leading-axis row blocks of ``p`` (one block when not worth or not safe to split).

    A block's trailing-axes reductions are then the tensor's (A1, A2 channel-wise), and torch's
    sums and norms over rows do not depend on how many rows there are, so for float32/64
    splitting changes no bit. Only CPU tensors are split, and only when torch runs ops on one
    thread, as the step arranges (_optim._cpu_threads): with intra-op threads every op is a
    parallel region that waits for all its threads, and blocks multiply those waits. On a GPU
    one kernel covers the tensor."""
    n, chunk = p.numel(), CHUNK * 4 // p.element_size()
    if not (n > chunk and blockable and p.device.type == "cpu" and p.dim() > 1
            and torch.get_num_threads() == 1 and all(t.is_contiguous() for t in (p, grad, *buffers))):
        return [(0, p.shape[0] if p.dim() else None)]
    rows = max(1, chunk // (n // p.shape[0]))
    return [(r, min(r + rows, p.shape[0])) for r in range(0, p.shape[0], rows)]


def _view(t, block):
    start, stop = block
    return t if stop is None or (start == 0 and stop == t.shape[0]) else t[start:stop]


class Scratch:
    """Flat buffers the optimizer owns and reuses across steps, one per (role, device, dtype),
    and the views of them that the last steps handed out (the same layout is asked every step)."""

    def __init__(self):
        self._bufs = {}
        self._views = {}

    def get(self, role: str, numel: int, dtype, device):
        key = (role, str(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != key}
        return buf

    def views(self, role: str, shapes: tuple, copies: int, dtype, device):
        """``copies`` lists of views with ``shapes``, laid out consecutively in the role's buffer."""
        sizes = [math.prod(s) for s in shapes]
        buf = self.get(role, sum(sizes) * copies, dtype, device)
        key = ((role, str(device), dtype), shapes, copies)
        out = self._views.get(key)
        if out is None:
            if len(self._views) > 256:  # layouts change rarely; keep the cache small
                self._views.clear()
            flat = buf[:sum(sizes) * copies].split(sizes * copies)
            out = self._views[key] = [[v.view(s) for v, s in zip(flat[i * len(sizes):], shapes)]
                                      for i in range(copies)]
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def pieces(params, grads, states, names, blockable: bool):
    """(owner index, {name: view}) for every row block of every parameter."""
    out = []
    for i, (p, grad, st) in enumerate(zip(params, grads, states)):
        bufs = [st[k] for k in names]
        for blk in row_blocks(p, grad, bufs, blockable):
            piece = {"p": _view(p, blk), "grad": _view(grad, blk)}
            piece.update({k: _view(b, blk) for k, b in zip(names, bufs)})
            out.append((i, piece))
    return out


def batches(items, foreach: bool):
    """Consecutive pieces grouped up to CHUNK elements (foreach) or one by one."""
    batch, size = [], 0
    for item in items:
        n = item[1]["p"].numel()
        if batch and (not foreach or size + n > CHUNK):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


def segments(params, foreach: bool):
    """Index ranges of parameters whose DOPE phases run together (bounded scratch)."""
    start, size = 0, 0
    for i, p in enumerate(params):
        n = p.numel()
        if i > start and (not foreach or size + n > SEGMENT):
            yield start, i
            start, size = i, 0
        size += n
    if start < len(params):
        yield start, len(params)


def attach_scratch(items, scratch: Scratch, role: str, names=("g",)):
    """Give every piece scratch views ``names`` of its shape, consecutive in one reused buffer."""
    p0 = items[0][1]["p"]
    shapes = tuple(tuple(piece["p"].shape) for _, piece in items)
    for name, views in zip(names, scratch.views(role, shapes, len(names), p0.dtype, p0.device)):
        for (_, piece), v in zip(items, views):
            piece[name] = v


def as_lists(batch_items):
    """{name: [view per piece]} for the foreach kernels."""
    keys = batch_items[0][1].keys()
    return {k: [piece[k] for _, piece in batch_items] for k in keys}
