"""The core on a sharded tensor: a torch ``DTensor`` (FSDP2, tensor parallelism, hand-made).

SAVEUS and DOPE reduce over whole tensors: A1's trailing-axes mean (S1, D1, D10), A2's standard
deviation (S2, D2), D3's norm and D12's count of agreeing signs. On a sharded parameter each of
these must be global over the mesh, or the optimizer is silently a different one (backends/README.md
tells how the public code goes wrong under FSDP2).

``ShardedNamespace`` is the torch array namespace bound to one parameter's layout. The core runs
unchanged on the LOCAL shards of param, grad and state with it: elementwise operations stay local;
``sum``, ``mean``, ``std``, ``var``, ``all`` and ``any`` reduce the local shard, then all-reduce
the partial sums over the mesh dimensions that shard a reduced tensor axis, and divide by GLOBAL
counts; ``global_size`` is the whole tensor's element count (D12's n, A2's n > 2 test). Nothing is
ever gathered: a reduction moves one partial sum per kept element (a scalar for a whole-tensor
reduction, a column of per-channel sums when the channel axes are sharded). A reduction over axes
no mesh dimension shards is the plain torch one, so a channel statistic of a ``Shard(0)``
parameter costs nothing and is bit-identical to the unsharded step. Any other reducing or
shape-changing function raises: the namespace holds only what is correct on a shard.

Placements: ``Shard(d)`` (even, uneven, an empty local shard, FSDP2's padded storage, the strided
shards of FSDP2 over tensor parallelism) and ``Replicate()`` (never summed over); ``Partial`` is
refused (a pending sum is not a parameter; redistribute it first). A grad or buffer laid out
differently from the parameter is redistributed to the parameter's layout (a collective, which
leaves each rank no more of the tensor than the parameter's layout gives it).

Nothing here imports torch until a DTensor is seen: the core stays NumPy-only for other users.
"""
from __future__ import annotations

import math
import sys

from .common import empty_tensor_step


def _dtensor_module():
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(*arrays) -> bool:
    """True when any of ``arrays`` is a torch DTensor (without importing torch)."""
    module = _dtensor_module()
    if module is None:
        return False
    return any(isinstance(x, module.DTensor) for x in arrays)


def _shard_dim(placement, ndim: int):
    """The tensor axis a placement splits, None for ``Replicate``; ValueError for ``Partial`` or an
    unknown placement."""
    from torch.distributed.tensor import Replicate, Shard

    # FSDP2 over tensor parallelism shards an axis in strided chunks: still a split of that axis
    strided = getattr(sys.modules.get("torch.distributed.tensor.placement_types"), "_StridedShard", ())
    if isinstance(placement, (Shard, strided)):
        return placement.dim % ndim
    if isinstance(placement, Replicate):
        return None
    raise ValueError(f"placement {placement} is not supported: a parameter, its gradient and its state must be "
                     f"Shard or Replicate on every mesh dimension (redistribute a Partial tensor first)")


class Layout:
    """How one DTensor is laid out: its mesh, placements, global shape and this rank's local shape."""

    def __init__(self, x, where: str = "refopt"):
        self.where = where
        self.mesh, self.placements = x.device_mesh, tuple(x.placements)
        self.shape, self.stride = tuple(x.shape), tuple(x.stride())
        self.ndim = len(self.shape)
        try:
            self.split = tuple(_shard_dim(pl, self.ndim) for pl in self.placements)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        self.local_shape = tuple(x.to_local().shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def groups(self, axes) -> list:
        """The process groups of the mesh dimensions that split one of ``axes``, in mesh order:
        all-reducing over each in turn sums over all the ranks that hold parts of the reduction."""
        return [self.mesh.get_group(i) for i, d in enumerate(self.split) if d is not None and d in axes]

    def aligned(self, x, what: str):
        """``x`` laid out like the parameter: as it is, or redistributed; TypeError for a plain
        tensor, ValueError for another mesh or shape."""
        module = _dtensor_module()
        if not isinstance(x, module.DTensor):
            how = "distribute_tensor(grad, param.device_mesh, param.placements)" if what == "grad" else \
                "init(param) makes the state so"
            raise TypeError(f"{self.where}: param is a DTensor but {what} is a {type(x).__name__}; give {what} as a "
                            f"DTensor on the parameter's mesh ({how})")
        if x.device_mesh != self.mesh:
            raise ValueError(f"{self.where}: {what} is on another device mesh than param ({x.device_mesh} vs {self.mesh})")
        if tuple(x.shape) != self.shape:
            raise ValueError(f"{self.where}: {what} has shape {tuple(x.shape)} but param has shape {self.shape}")
        if tuple(x.placements) == self.placements:
            return x
        return x.redistribute(self.mesh, self.placements)  # e.g. a Partial gradient: reduce-scattered

    def local(self, x):
        """The local shard of ``x`` (laid out like the parameter)."""
        return x.to_local()

    def wrap(self, local):
        """A DTensor laid out like the parameter, around this rank's ``local`` result."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)


#: What the sharded namespace passes through to torch's: elementwise functions, creation of
#: arrays shaped like a given one or 0-d, dtypes and their queries. Each is correct on a shard.
ELEMENTWISE = frozenset("""
    abs acos acosh add asin asinh atan atan2 atanh bitwise_and bitwise_invert bitwise_left_shift
    bitwise_or bitwise_right_shift bitwise_xor ceil clip conj copysign cos cosh divide equal exp expm1
    floor floor_divide greater greater_equal hypot imag isfinite isinf isnan less less_equal log log1p
    log2 log10 logaddexp logical_and logical_not logical_or logical_xor maximum minimum multiply
    negative nextafter not_equal positive pow real reciprocal remainder round sign signbit sin sinh
    square sqrt subtract tan tanh trunc where astype asarray full zeros ones empty zeros_like
    ones_like full_like empty_like isdtype result_type can_cast finfo iinfo
    bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 bfloat16 float32 float64
    complex64 complex128 e inf nan pi newaxis __array_api_version__
""".split())


class ShardedNamespace:
    """The array namespace of one DTensor's local shards (see the module docstring)."""

    def __init__(self, layout: Layout, base=None):
        if base is None:
            import array_api_compat.torch as base
        self.layout = layout
        self._base = base

    def __getattr__(self, name):
        if name in ELEMENTWISE:
            return getattr(self._base, name)
        raise AttributeError(f"refopt's sharded namespace has no {name!r}: on a shard only elementwise "
                             f"operations and sum/mean/std/var/all/any (made global) are defined")

    # ---- what makes the shards one tensor --------------------------------------------------------
    def global_size(self, x) -> int:
        """The element count of the whole tensor ``x`` is a shard of (1 for a 0-d array)."""
        if x.ndim == 0:
            return 1
        self._check(x)
        return self.layout.numel()

    def _check(self, x) -> None:
        if tuple(x.shape) != self.layout.local_shape:
            raise ValueError(f"refopt's sharded namespace reduces arrays laid out like the parameter (local shape "
                             f"{self.layout.local_shape}); got one of shape {tuple(x.shape)}")

    def _axes(self, x, axis) -> tuple:
        if axis is None:
            return tuple(range(x.ndim))
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return tuple(sorted(a % x.ndim for a in axes))

    def _plan(self, x, axis):
        """(axes, groups to all-reduce over, global count of the reduced elements)."""
        axes = self._axes(x, axis)
        if x.ndim == 0 or not axes:
            return axes, [], 1
        self._check(x)
        return axes, self.layout.groups(axes), math.prod(self.layout.shape[a] for a in axes)

    def _global_sum(self, x, axes, groups, dtype=None):
        """The sum over ``axes`` of the whole tensor, kept as size-1 axes: local partial sums,
        then one all-reduce per splitting mesh dimension."""
        import torch.distributed as dist

        total = self._base.sum(x, axis=axes, dtype=dtype, keepdims=True)
        for group in groups:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    def _dropped(self, x, axes, keepdims: bool):
        if keepdims:
            return x
        return self._base.reshape(x, tuple(n for a, n in enumerate(x.shape) if a not in axes))

    def sum(self, x, /, *, axis=None, dtype=None, keepdims=False):
        axes, groups, _ = self._plan(x, axis)
        if not groups:
            return self._base.sum(x, axis=axis, dtype=dtype, keepdims=keepdims)
        return self._dropped(self._global_sum(x, axes, groups, dtype), axes, keepdims)

    def mean(self, x, /, *, axis=None, keepdims=False):
        axes, groups, n = self._plan(x, axis)
        if not groups:
            return self._base.mean(x, axis=axis, keepdims=keepdims)
        return self._dropped(self._global_sum(x, axes, groups) / n, axes, keepdims)

    def var(self, x, /, *, axis=None, correction=0.0, keepdims=False):
        """Two passes over the shards: the global mean, then the global sum of squared deviations
        from it (no cancellation, unlike sums of x and x*x); divided by max(N - correction, 0)."""
        axes, groups, n = self._plan(x, axis)
        if not groups:
            return self._base.var(x, axis=axis, correction=correction, keepdims=keepdims)
        mean = self._global_sum(x, axes, groups) / n
        deviation = x - mean
        squares = self._global_sum(deviation * deviation, axes, groups)
        return self._dropped(squares / max(n - correction, 0), axes, keepdims)

    def all(self, x, /, *, axis=None, keepdims=False):
        """True where no element of the whole tensor is zero (False)."""
        return self._count(x == 0, axis, keepdims) == 0

    def any(self, x, /, *, axis=None, keepdims=False):
        return self._count(x != 0, axis, keepdims) > 0

    def _count(self, mask, axis, keepdims):
        return self.sum(self._base.astype(mask, self._base.int64), axis=axis, keepdims=keepdims)

    def std(self, x, /, *, axis=None, correction=0.0, keepdims=False):
        axes, groups, _ = self._plan(x, axis)
        if not groups:
            return self._base.std(x, axis=axis, correction=correction, keepdims=keepdims)
        return self._base.sqrt(self.var(x, axis=axis, correction=correction, keepdims=keepdims))


def step(optimizer, param, grad, state):
    """``optimizer.step`` for a DTensor param (checked by the caller): the core's update on the
    local shards with a ``ShardedNamespace``; the results are DTensors laid out like ``param``."""
    name = f"{optimizer.facts.name}.step"
    if not is_dtensor(param):
        raise TypeError(f"{name}: grad or state holds a DTensor but param is a {type(param).__name__}; give "
                        f"param as a DTensor too")
    layout = Layout(param, name)
    grad = layout.aligned(grad, "grad")
    buffers = {k: layout.aligned(getattr(state, k), f"state.{k}") for k in optimizer.facts.buffers}
    step_count = state.step
    if is_dtensor(step_count):
        step_count = step_count.to_local()
    local_state = state._replace(step=step_count, **{k: layout.local(b) for k, b in buffers.items()})
    xp = ShardedNamespace(layout)
    local_param, local_grad = layout.local(param), layout.local(grad)
    optimizer._check_values(xp, local_param, local_grad, local_state)  # counts over the whole tensors
    if layout.numel() == 0:  # A6, from the global shape: every rank agrees
        return empty_tensor_step(xp, param, state._replace(step=step_count))
    new_param, new_state = optimizer._update(local_param, local_grad, local_state, xp=xp)
    wrapped = {k: layout.wrap(getattr(new_state, k)) for k in optimizer.facts.buffers}
    return layout.wrap(new_param), new_state._replace(**wrapped)
