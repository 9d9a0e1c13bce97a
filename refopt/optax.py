"""optax adapter: SAVEUS and DOPE as optax gradient transformations over arbitrary pytrees.

    tx = refopt.optax.dope(1e-4, weight_decay=0.1)     # or learning_rate=..., or lr=...
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)

Each leaf is stepped by the core (refopt.SAVEUS / refopt.DOPE), so per-tensor clauses (S1/S2,
D1-D3, D10, D12) act per leaf, as the reference acts per parameter tensor. Under ``jax.jit`` with
sharded inputs the core's reductions are global over each (sharded) leaf. On one CPU device, DOPE
leaves of float32/float64 with at least ``ROWBLOCK_MIN_NUMEL`` elements and ndim >= 2 take a
row-blocked program of the same clauses (fewer passes over memory; equal to the core up to the
summation order of its reductions).

Learning rate. ``learning_rate`` (optax's name, first positional) and ``lr`` (the reference's
name) are aliases; give at most one. It is a number or a schedule ``count -> lr`` where ``count``
is ``state.step`` before the update, i.e. the number of updates already applied (0 on the first),
exactly as ``optax.scale_by_schedule`` counts. Update number t = count + 1 (the reference's 1-based
step) uses ``lr_t = schedule(t - 1)`` everywhere the reference reads ``group['lr']`` during that
step: S3/S8/S10 (step_size = lr_t / bc1) and D13/D14 (-lr_t * weight_decay, -lr_t). That is what a
PyTorch LR scheduler stepped after every ``optimizer.step()`` produces. The value is used as the
reference uses its Python float: computed in the scalar dtype (A4) and rounded to the work dtype
where applied. Schedule values are not validated (that would need a host sync); negative or
non-finite values propagate (A5).

Updates and exactness. The core returns the new parameter; optax wants ``updates`` with
``params + updates == new_params``. ``updates = new - param`` is exact whenever new and param are
within a factor of two of each other (Sterbenz), so ``apply_updates`` reproduces the core bit for
bit on those elements; elsewhere (a sign change, or |update| >= |param|) the re-added result may
differ from the core's by at most one rounding at the larger of |param|, |new|, i.e. within the
tolerance model (one unit in the last place of the parameter's scale). ``refopt.optax.step(tx,
grads, state, params)`` returns the core's new parameters exactly.

State. ``SAVEUSState(step, ema, ema_squared)`` / ``DOPEState(step, exp_avg, fim, fim_diff,
prev_grad)``: one int32 0-d ``step`` (updates done; all leaves step together) and one pytree per
core buffer, shaped like ``params`` (and sharded like it). They are the core's NamedTuples
(``refopt.SAVEUSState``/``refopt.DOPEState``, fields readable as attributes or keys) holding
pytrees where the core holds arrays.

Compilation. The update is jitted inside (eager calls too), once per tree structure, shapes and
dtypes; a schedule must therefore be traceable, as optax schedules are. The compiled program holds
one copy of the step per leaf: XLA compile time grows with the number of leaves (about 0.3-0.7 s
per leaf on a small CPU). ``check_finite=True`` reads values on the host, so that configuration
runs eagerly and cannot be used under ``jax.jit``.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _validate
from ._arrays import Arith, is_real_floating, self_lerp
from ._base import Optimizer
from ._state import DOPEState, SAVEUSState  # the core's containers; here each field is a pytree
from .dope import DOPE
from .saveus import SAVEUS

Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, Schedule]


_STATES = {SAVEUS: SAVEUSState, DOPE: DOPEState}


def saveus(learning_rate: ScalarOrSchedule | None = None, *, lr: ScalarOrSchedule | None = None,
           **hparams) -> optax.GradientTransformationExtraArgs:
    """SAVEUS (refopt.SAVEUS hyperparameters, reference names and defaults) as an optax transform."""
    return transform(SAVEUS, learning_rate, lr=lr, **hparams)


def dope(learning_rate: ScalarOrSchedule | None = None, *, lr: ScalarOrSchedule | None = None,
         **hparams) -> optax.GradientTransformationExtraArgs:
    """DOPE (refopt.DOPE hyperparameters, reference names and defaults) as an optax transform."""
    return transform(DOPE, learning_rate, lr=lr, **hparams)


def transform(cls: type[Optimizer], learning_rate: ScalarOrSchedule | None = None,
              **hparams) -> optax.GradientTransformationExtraArgs:
    """The optax transformation for a core optimizer class (``refopt.SAVEUS`` or ``refopt.DOPE``).

    ``hparams`` go to the core constructor, ``profile`` and ``quirks`` included. The step is
    jitted (also when called eagerly) except with ``check_finite=True``, which syncs with the host
    and so works only outside ``jax.jit``."""
    if cls not in _STATES:
        raise TypeError(f"refopt.optax.transform: expected refopt.SAVEUS or refopt.DOPE, got {cls!r}")
    learning_rate = _pick_lr(learning_rate, hparams.pop("lr", None))
    schedule = learning_rate if callable(learning_rate) else None
    if schedule is None and learning_rate is not None:
        hparams["lr"] = learning_rate
    opt = cls(**hparams)  # validates everything, a constant lr included
    State = _STATES[cls]

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        per_leaf = [_leaf_init(opt, path, p) for path, p in zip(_paths(params), leaves)]
        buffers = [treedef.unflatten([b[i] for b in per_leaf]) for i in range(len(State._fields) - 1)]
        return State(_step_zero(leaves), *buffers)

    def exact_step(grads, state, params):
        """(new_params, new_state): the core's new parameters, leaf by leaf."""
        if not isinstance(state, State):
            raise TypeError(f"refopt.optax.{opt.name.lower()}: state must be a refopt.optax.{State.__name__} "
                            f"from this transformation's init, got {type(state).__name__}")
        if params is None:
            raise ValueError(f"refopt.optax.{opt.name.lower()}: update needs params (the reference's step "
                             "reads the parameter: weight decay, and the new value is computed from it)")
        step_opt = opt if schedule is None else _with_lr(opt, schedule(state.step))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        g_leaves = treedef.flatten_up_to(grads)
        bufs = [treedef.flatten_up_to(b) for b in state[1:]]
        leaves = [jnp.asarray(p) for p in leaves]  # NumPy leaves are accepted, as optax does
        g_leaves = [jnp.asarray(g) for g in g_leaves]
        new_p, new_bufs = [], [[] for _ in bufs]
        for i, (p, g) in enumerate(zip(leaves, g_leaves)):
            leaf_step = _rowblock_step if _rowblock_ok(opt, p) else _core_step
            n, s = leaf_step(step_opt, p, g, opt.State(state.step, *(b[i] for b in bufs)))
            new_p.append(n.astype(p.dtype))  # a no-op unless _weak had to fall back
            for acc, x in zip(new_bufs, s[1:]):
                acc.append(x)
        new_state = State(state.step + 1, *(treedef.unflatten(b) for b in new_bufs))
        return treedef.unflatten(new_p), new_state

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        new_params, new_state = exact_step(updates, state, params)
        return jax.tree_util.tree_map(jnp.subtract, new_params, params), new_state

    # Traced even when called eagerly: one compiled program per tree structure (no per-leaf
    # dispatch), and the core's device checks see tracers, so eagerly passed multi-device (sharded)
    # leaves work too. check_finite reads values on the host, so it stays eager.
    if not opt.check_finite:
        exact_step = jax.jit(exact_step)
    update_fn.refopt_step = exact_step
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def step(tx: optax.GradientTransformation, grads, state, params):
    """``(new_params, new_state)`` with the core's new parameters bit for bit (no re-addition)."""
    fn = getattr(tx.update, "refopt_step", None)
    if fn is None:
        raise TypeError("refopt.optax.step: tx must come from refopt.optax.saveus, dope or transform")
    return fn(grads, state, params)


def _pick_lr(learning_rate, lr):
    if learning_rate is not None and lr is not None:
        raise TypeError("give learning_rate or lr (aliases), not both")
    return lr if learning_rate is None else learning_rate


def _paths(tree):
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _leaf_init(opt, path, p):
    """S0/D0 zero buffers for one leaf. zeros_like keeps a sharded leaf's sharding (the core's init
    also makes a per-leaf step on the leaf's device, which JAX refuses for a multi-device sharding)."""
    if not hasattr(p, "dtype") or not hasattr(p, "shape"):
        raise TypeError(f"refopt.optax.{opt.name.lower()}: leaf {path or '<root>'} is not an array "
                        f"({type(p).__name__})")
    if not is_real_floating(jnp, p.dtype):
        raise TypeError(f"refopt.optax.{opt.name.lower()}: leaf {path or '<root>'}: param dtype must be "
                        f"real floating, got {p.dtype}")
    return [jnp.zeros_like(p) for _ in opt.State._fields[1:]]


def _step_zero(leaves):
    """The 0-d int32 count, replicated over the mesh of the first mesh-sharded leaf if any, so an
    eager first update sees the placement later ones do (one compilation, not two)."""
    zero = jnp.zeros([], jnp.int32)
    for p in leaves:
        sharding = getattr(p, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.device_put(zero, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return zero


def _with_lr(opt, value):
    """A copy of ``opt`` whose lr is a (possibly traced) scalar behaving like the reference's Python
    float: scalar dtype, weakly typed so it rounds to the work dtype where applied (A4)."""
    sdtype = np.dtype("float64" if jax.config.read("jax_enable_x64") else "float32")
    new = copy.copy(opt)
    new._hparams = dict(opt._hparams, lr=_weak(jnp.asarray(value, dtype=sdtype)))
    return new


def _weak(x):
    # JAX has no public way to mark an array weakly typed, as Python floats are. Should the private
    # helper go, a strong float64 lr promotes float32 leaves in D13/D14; the cast back to the
    # leaf dtype in exact_step then bounds the difference to one rounding.
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - future JAX
        return x
    return _convert_element_type(x, x.dtype, weak_type=True)


# ---- row-blocked CPU path for DOPE --------------------------------------------------------------
# XLA CPU compiles the core's DOPE step (4096x4096 float32) into ~44 passes over memory: each
# reduction (D1/D2 row statistics, D3 norm, D10 row mean, D12 count) ends a fusion, expensive values
# with several users (sqrt, divisions) are materialised, the D12 count is widened to int64 as a
# whole array, and donated buffers read after their new value is made are copied. When every
# clause but D3 and D12 is row-local (A1 trailing mean and A2 channel std over axes 1..), the step
# below walks blocks of rows that stay in cache: walk 1 reads g for the D1/D2 row statistics and
# the D3 sum of squares; walk 2 reads g, prev_grad and the state, updates exp_avg, fim and fim_diff
# in place and writes u (D12-unmasked) and the int32 count; then one elementwise pass rebuilds
# prev_grad from g and one applies D12-D14 to p. About 21 passes against the roofline's 11; it is
# bounded by walk 2's arithmetic, not by memory (see the report in benchmarks). Same ops in the
# core's order as refopt/dope.py with rd the identity (A3: nothing to round for float32/float64);
# only the summation order of reductions differs. SAVEUS keeps the core: XLA already streams it in
# ~11 passes, and a walk measured slower.

#: Leaves with fewer elements go through the core (the walk gains nothing, and compiles slower).
ROWBLOCK_MIN_NUMEL = 1 << 18
_BLOCK_BYTES = 1 << 20  # per array and block: a dozen live blocks fit in L3 (measured best)
_MAX_ROW_BYTES = 1 << 20


def _core_step(opt, p, g, state):
    return opt.step(p, g, state)


def _rowblock_ok(opt, p) -> bool:
    """Static (shape, dtype, hparams, platform): does the row-blocked walk apply to leaf ``p``?"""
    if not isinstance(opt, DOPE) or opt.check_finite or p.ndim < 2 or p.dtype not in (jnp.float32, jnp.float64):
        return False
    numel, rows = math.prod(p.shape), p.shape[0]
    if not ROWBLOCK_MIN_NUMEL <= numel < 2**31 or (numel // rows) * p.dtype.itemsize > _MAX_ROW_BYTES:
        return False
    # A while loop over blocks suits one CPU device; on GPUs and sharded meshes the core's plain
    # fusions are the right program.
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    return opt._hparams["normalization"] == 0 or opt._hparams["normalize_channels"]  # A2 per row


def _block_rows(rows, cols, itemsize):
    fit = max(1, _BLOCK_BYTES // (cols * itemsize))
    return max(b for b in range(1, min(rows, fit) + 1) if rows % b == 0)


def _walk(x2d, b, body, carry, ys=False):
    """``lax.scan`` over blocks of ``b`` rows; ``body(r0, carry) -> (carry, y)``."""
    nblk = x2d.shape[0] // b
    carry, out = jax.lax.scan(lambda c, i: body(i * b, c), carry, jnp.arange(nblk, dtype=jnp.int32))
    return carry, (out.reshape((nblk * b,) + out.shape[2:]) if ys else None)


def _rows(x, r0, b):
    return jax.lax.dynamic_slice_in_dim(x, r0, b, 0)


def _store(x, blk, r0):
    """Write ``blk`` into ``x`` in place and read it back. Later computations must use the value
    read back: one that recomputes the block from the old contents of an array written in place
    forms a read-after-write cycle, which XLA breaks with a copy of the whole array per block."""
    x = jax.lax.dynamic_update_slice_in_dim(x, blk, r0, 0)
    return x, _rows(x, r0, blk.shape[0])


def _row_mean(x):
    return jnp.mean(x, axis=1, keepdims=True)  # A1 on the (rows, rest) view


def _centre_normalise(h, q, g, stats):
    """D1 and D2 on a block of rows: (g, (row mean, row std)); ``stats`` reuses walk 1's."""
    c, a = h["centralization"], h["normalization"]
    m = s = None
    if c > 0:
        m = _row_mean(g) if stats is None else stats[0]
        g = g - m * c
    if a > 0:
        s = jnp.std(g, axis=1, ddof=1, keepdims=True) if stats is None else stats[1]
        g_hat = g / (s + 1e-8)
        g = self_lerp(jnp, g_hat) if q.aliased_lerp else g + a * (g_hat - g)
    return g, (m, s)


def _rowblock_step(opt, param, grad, state):
    _validate.step_inputs(opt.name, opt.State, param, grad, state)
    shape = param.shape
    flat = [x.reshape(shape[0], -1) for x in (param, grad, *state[1:])]
    b = _block_rows(flat[0].shape[0], flat[0].shape[1], param.dtype.itemsize)
    new_p, bufs = _dope_walk(opt, Arith(param), b, state.step, *flat)
    return new_p.reshape(shape), opt.State(state.step + 1, *(x.reshape(shape) for x in bufs))


def _dope_walk(opt, A, b, count, p, g, exp_avg, fim, fim_diff, prev):
    h, q = opt._hparams, opt.quirks
    b1, b2 = h["betas"]
    mb, wd, lr = h["momentum_beta"], h["weight_decay"], h["lr"]
    t = A.step_count(count)
    rows = p.shape[0]

    # Walk 1: D1/D2 row statistics and the D3 sum of squares (g read once).
    stats, coef = None, None
    if h["centralization"] > 0 or h["normalization"] > 0 or h["clip"] > 0:
        zero = jnp.zeros((rows, 1), p.dtype)

        def stats_body(r0, carry):
            M, S, Q = carry
            gb, (m, s) = _centre_normalise(h, q, _rows(g, r0, b), None)
            M = M if m is None else _store(M, m, r0)[0]
            S = S if s is None else _store(S, s, r0)[0]
            return (M, S, _store(Q, jnp.sum(gb * gb, axis=1, keepdims=True), r0)[0]), None

        (M, S, Q), _ = _walk(p, b, stats_body, (zero, zero, zero))
        stats = (M, S)
        if h["clip"] > 0:  # D3
            norm = jnp.sqrt(jnp.sum(Q))
            coef = jnp.minimum((1.0 / (norm + 1e-6)) * h["clip"], jnp.ones_like(norm))

    bc1, bc2 = A.one_minus_pow(b1, t), A.one_minus_pow(b2, t)  # D5
    eps_hat = h["eps"] if h["eps_floor"] is None else A.scalar(  # D6
        jnp.maximum(A.const(h["eps_floor"], A.sdtype), h["eps"] * jnp.sqrt(t)))
    sq_bc1, sq_bc2 = A.scalar(jnp.sqrt(bc1)), A.scalar(jnp.sqrt(bc2))
    mars = h["gamma"] * (b1 / (1.0 - b1))
    amp = opt._amplification(A, count)
    cautious = h["cautious"]

    # Walk 2: D1-D14 per block; with D12 the masked update waits for the whole-tensor count.
    def processed_grad(gb, sb):  # D1-D3 on rows, given walk 1's statistics
        gb, _ = _centre_normalise(h, q, gb, sb)
        return gb if coef is None else gb * coef

    def denominators(fb, fdb):  # D7
        denom = jnp.sqrt(fb) / sq_bc2 + eps_hat
        return denom, (jnp.sqrt(fdb) / sq_bc1) * h["diff_mult"] + h["eps2"]

    # Walk 2 updates exp_avg, fim, fim_diff in place and emits u (D12-unmasked). An array written
    # in place is read back after its write (see _store); prev_grad and p stay read-only.
    def body(r0, carry):
        EA, F, FD, k = carry
        gb = processed_grad(_rows(g, r0, b), None if stats is None else
                            tuple(None if x is None else _rows(x, r0, b) for x in stats))
        pvb = _rows(prev, r0, b)
        F, fb = _store(F, _rows(F, r0, b) * b2 + (1.0 - b2) * gb * gb, r0)  # D4
        d = gb - pvb
        FD, fdb = _store(FD, _rows(FD, r0, b) * b1 + (1.0 - b1) * d * d, r0)
        denom, denom_diff = denominators(fb, fdb)
        u = (gb / denom) / denom_diff  # D8
        u = u + mars * (gb if q.mars_current_grad else pvb)  # D9
        c_t = u
        eab = _rows(EA, r0, b) * mb + (1.0 - mb) * u  # D10
        EA, eab = _store(EA, eab - _row_mean(eab), r0)
        u = u + eab * amp  # D11
        if cautious:  # D12: u * where(pos, 1, 0); the scale needs the whole-tensor count
            pos = u * (gb if q.cautious_processed_grad else c_t) > 0
            k = k + jnp.sum(pos, dtype=jnp.int32)
            u = jnp.where(pos, u, u * 0)
        return (EA, F, FD, k), u

    (exp_avg, fim, fim_diff, k), u = _walk(p, b, body, (exp_avg, fim, fim_diff, jnp.zeros((), jnp.int32)), ys=True)
    # After the walk, elementwise: prev_grad (D4) recomputed from g into its own buffer, then
    # D12's scale, D13 on the pre-update p with the D7 denominators, D14.
    new_prev = processed_grad(g, stats)
    if cautious:  # u * (where(pos, 1, 0) * scale) == (u * where(pos, 1, 0)) * scale, exactly
        u = u * _cautious_scale_from_count(opt, A, k, math.prod(p.shape))
    if wd > 0:  # D13
        denom, denom_diff = denominators(fim, fim_diff)
        p = p + (-lr * wd) * ((p / denom) / denom_diff)
    return p + (-lr) * u, (exp_avg, fim, fim_diff, new_prev)  # D14


def _cautious_scale_from_count(opt, A, k, numel):
    """refopt.DOPE._cautious_scale given the count ``k`` (D12, quirk Q5)."""
    if opt.quirks.float32_scalars:
        qk = jnp.astype(k, jnp.float32) + 1e-8
        return jnp.astype((1.0 / qk) * float(numel), A.work)
    return A.scalar(float(numel) / (jnp.astype(k, A.sdtype) + 1e-8))


__all__ = ["saveus", "dope", "transform", "step", "SAVEUSState", "DOPEState"]
