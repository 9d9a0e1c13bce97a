"""refopt._sharded's namespace without processes: a layout whose reductions split no axis (so
nothing is all-reduced) must be torch's own, bit for bit; everything that is not elementwise or
a made-global reduction is refused by name; sizes are global."""
import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import refopt  # noqa: E402
from refopt._arithmetic import Arithmetic  # noqa: E402
from refopt._sharded import ShardedNamespace, is_dtensor  # noqa: E402


def layout(local_shape, shape):
    """A stand-in for a DTensor's Layout; ``groups`` gives no group: no axis is split."""
    return SimpleNamespace(local_shape=tuple(local_shape), shape=tuple(shape), numel=lambda: math.prod(shape),
                           groups=lambda axes: [])


def test_reductions_over_axes_no_rank_splits_are_torch_s_own():
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    ns = ShardedNamespace(layout(x.shape, x.shape))
    import array_api_compat.torch as xp

    for axis in ((1, 2), None, 0, (0, 2)):
        for name in ("sum", "mean"):
            assert torch.equal(getattr(ns, name)(x, axis=axis, keepdims=True), getattr(xp, name)(x, axis=axis, keepdims=True))
        assert torch.equal(ns.std(x, axis=axis, correction=1), xp.std(x, axis=axis, correction=1))
    for mask in (x > -10, x > 0, x > 10):  # all true, some, none
        assert bool(ns.all(mask)) == bool(xp.all(mask)) and bool(ns.any(mask)) == bool(xp.any(mask))


def test_the_core_steps_identically_on_it():
    """With nothing split, the core's step through the namespace is the plain step, bit for bit."""
    for opt in (refopt.SAVEUS(), refopt.DOPE()):
        p, g = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        state = opt.init(p)
        want = opt.step(p, g, state)
        got = opt._update(p, g, state, xp=ShardedNamespace(layout(p.shape, p.shape)))
        assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1][1:], want[1][1:]))


def test_sizes_are_the_whole_tensor_s():
    ns = ShardedNamespace(layout((3, 4), (7, 4)))
    local = torch.zeros(3, 4)
    assert ns.global_size(local) == 28 and Arithmetic(local, ns).size(local) == 28
    assert Arithmetic(local).size(local) == 12
    with pytest.raises(ValueError, match="laid out like the parameter"):
        ns.mean(torch.zeros(2, 4))  # not this layout's local shape: refused, never reduced locally


@pytest.mark.parametrize("name", ["reshape", "prod", "max", "cumulative_sum", "matmul", "sort", "linalg"])
def test_what_is_not_correct_on_a_shard_is_refused(name):
    ns = ShardedNamespace(layout((3,), (6,)))
    with pytest.raises(AttributeError, match=f"no {name!r}: on a shard only elementwise"):
        getattr(ns, name)


def test_plain_arrays_are_not_dtensors():
    import numpy as np

    assert not is_dtensor(torch.zeros(2), np.zeros(2), 1.0)
