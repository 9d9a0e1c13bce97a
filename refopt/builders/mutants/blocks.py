"""The per-block reductions of a kernel that never combines its blocks: each block of up to
``BLOCK`` consecutive elements (C order) uses its own mean, standard deviation, norm or count
instead of the tensor's (or the channel's). Right on every tensor that fits one block, wrong on
any real layer; the Scale vectors (conformance/v1/FLAGS.md) exist to reject it."""
from __future__ import annotations

#: The largest block a GPU reduction commonly leaves uncombined (64K elements).
BLOCK = 1 << 16


def per_block(xp, x, reduce, channels: bool, block: int = BLOCK):
    """``reduce(rows_of_one_block) -> (rows, 1)`` applied to each block of each row, broadcast
    back to ``x``'s shape. The rows are the channels (axis 0, the rest flattened) when
    ``channels``, else the whole tensor is one row."""
    rows = xp.reshape(x, (x.shape[0], -1) if channels else (1, -1))
    width = rows.shape[1]
    parts = []
    for start in range(0, width, block):
        part = rows[:, start:start + block]
        parts.append(xp.broadcast_to(reduce(part), part.shape))
    return xp.reshape(xp.concat(parts, axis=1), x.shape)


def sizes(xp, x, channels: bool, block: int = BLOCK):
    """The number of elements in each element's block, shaped like ``x`` (dtype of ``x``)."""
    return per_block(xp, x, lambda part: xp.full((part.shape[0], 1), part.shape[1], dtype=x.dtype),
                     channels, block)
