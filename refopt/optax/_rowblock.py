"""refopt.optax's row-blocked DOPE program for large leaves on one CPU device, built from the
core's clause functions (refopt.dope, refopt.common) applied to blocks of rows.

XLA CPU compiles the core's DOPE step on a whole 4096x4096 float32 leaf into ~44 passes over
memory: each reduction (D1/D2 row statistics, D3 norm, D10 row mean, D12 count) ends a fusion,
values with several users are materialised, and donated buffers read after their new value is made
are copied. Every clause but D3's norm and D12's count is local to a row when the trailing-axes
reductions (A1, A2 per channel) are per row, so this program walks blocks of rows that stay in
cache:

* walk 1 reads g and sums the squares of the processed gradient (D1, D2) per row, for D3's norm;
* walk 2 recomputes the processed gradient of each block, runs D3 (with the whole norm) to D11,
  writes exp_avg, fim, fim_diff and prev_grad in place, and emits u and D12's sign agreement
  (u * P) with the count of P;
* then D12's scale, D13 and D14 run elementwise on the whole leaf.

The clause functions are the core's; float32/float64 only, so R(.) is the identity (A3) and the
result equals the core's up to the summation order of the reductions (a test runs every vector
through it). SAVEUS keeps the core: XLA already streams it in ~11 passes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .. import _validate
from .._arithmetic import Arithmetic
from ..common import centralize, normalize
from ..dope import (DOPE, acts, agreement, amplification, amplified_momentum, bias_corrections,
                    cautious_scale, clip_coefficient, denominators, epsilon, fisher_estimates,
                    momentum, mars_correction, natural_gradient, parameter_update,
                    preconditioned_weight_decay)

#: Leaves with fewer elements go through the core (the walk gains nothing, and compiles slower).
MIN_NUMEL = 1 << 18
BLOCK_BYTES = 1 << 20  # per array and block: a dozen live blocks fit in L3 (measured best)
MAX_ROW_BYTES = 1 << 20


def applies(opt, p) -> bool:
    """Static (shape, dtype, hyperparameters, platform): does the walk apply to leaf ``p``?"""
    if not isinstance(opt, DOPE) or opt.check_finite or p.ndim < 2 or p.dtype not in (jnp.float32, jnp.float64):
        return False
    numel, rows = math.prod(p.shape), p.shape[0]
    if not MIN_NUMEL <= numel < 2**31 or (numel // rows) * p.dtype.itemsize > MAX_ROW_BYTES:
        return False
    # A loop over blocks suits one CPU device; on GPUs and sharded meshes the core's plain
    # fusions are the right program.
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    return not acts(opt.normalization) or opt.normalize_channels  # A2 per row


def block_rows(rows, cols, itemsize):
    fit = max(1, BLOCK_BYTES // (cols * itemsize))
    return max(b for b in range(1, min(rows, fit) + 1) if rows % b == 0)


def _walk(n_blocks, b, body, carry, ys=False):
    """``lax.scan`` over ``n_blocks`` blocks of ``b`` rows; ``body(r0, carry) -> (carry, y)``."""
    carry, out = jax.lax.scan(lambda c, i: body(i * b, c), carry, jnp.arange(n_blocks, dtype=jnp.int32))
    return carry, (out.reshape((n_blocks * b,) + out.shape[2:]) if ys else None)


def _rows(x, r0, b):
    return jax.lax.dynamic_slice_in_dim(x, r0, b, 0)


def _store(x, blk, r0):
    """Write ``blk`` into ``x`` in place and read it back. Later computations must use the value
    read back: one that recomputes the block from the old contents of an array written in place
    forms a read-after-write cycle, which XLA breaks with a copy of the whole array per block."""
    x = jax.lax.dynamic_update_slice_in_dim(x, blk, r0, 0)
    return x, _rows(x, r0, blk.shape[0])


def step(opt, param, grad, state):
    """``opt.step`` (a refopt.DOPE) on one leaf, by blocks of rows."""
    _validate.step_inputs(opt.facts.name, opt.State, param, grad, state)
    shape = param.shape
    flat = [x.reshape(shape[0], -1) for x in (param, grad, *state[1:])]
    b = block_rows(flat[0].shape[0], flat[0].shape[1], param.dtype.itemsize)
    new_p, buffers = _dope(opt, Arithmetic(param), b, state.step, *flat)
    return new_p.reshape(shape), opt.State(state.step + 1, *(x.reshape(shape) for x in buffers))


def _dope(opt, ops, b, step_count, p, g, exp_avg, fim, fim_diff, prev_grad):
    quirks, (beta1, beta2) = opt.quirks, opt.betas
    n_blocks = p.shape[0] // b
    count = step_count + 1                                                           # D0
    t = ops.step_count(step_count)

    def processed(gb):                                                               # D1, D2
        if acts(opt.centralization):
            gb = centralize(ops, gb, opt.centralization, quirks.torch_empty_axis_mean)
        if acts(opt.normalization):
            gb = normalize(ops, gb, opt.normalization, opt.normalize_channels, quirks.aliased_lerp)
        return gb

    coefficient = None
    if acts(opt.clip):                                                               # D3: walk 1
        def squares(r0, total):
            gb = processed(_rows(g, r0, b))
            return total + jnp.sum(gb * gb), None

        total, _ = _walk(n_blocks, b, squares, jnp.zeros((), p.dtype))
        coefficient = clip_coefficient(ops, jnp.sqrt(total), opt.clip)

    b1, b2 = bias_corrections(ops, t, beta1, beta2)                                  # D5
    eps_hat = epsilon(ops, t, opt.eps, opt.eps_floor)                                # D6
    a_t = amplification(ops, count, t, opt.momentum_lambda, quirks.lambda_scaled_amplification,
                        quirks.float32_scalars)                                      # D11's A_t

    def block(r0, carry):                                                            # walk 2
        EA, F, FD, PG, k = carry
        gb = processed(_rows(g, r0, b))
        if coefficient is not None:
            gb = ops.mul(gb, coefficient)                                            # D3
        g_prev = _rows(PG, r0, b)
        fb, fdb, pgb = fisher_estimates(ops, _rows(F, r0, b), _rows(FD, r0, b), g_prev, gb, beta1, beta2)  # D4
        F, fb = _store(F, fb, r0)
        FD, fdb = _store(FD, fdb, r0)
        PG, gb = _store(PG, pgb, r0)
        denom, denom_diff = denominators(ops, fb, fdb, b1, b2, eps_hat, opt.diff_mult, opt.eps2)  # D7
        u = natural_gradient(ops, gb, denom, denom_diff)                             # D8
        u = mars_correction(ops, u, gb, g_prev, opt.gamma, beta1, quirks.mars_current_grad)  # D9
        c_t = u
        eab = momentum(ops, _rows(EA, r0, b), c_t, opt.momentum_beta, quirks.torch_empty_axis_mean)  # D10
        EA, eab = _store(EA, eab, r0)
        u = amplified_momentum(ops, u, eab, a_t)                                     # D11
        if opt.cautious:  # D12, first half: u * P and the count of P; the scale needs every block
            positive = agreement(ops, u, gb, c_t, quirks.cautious_processed_grad)
            k = k + jnp.sum(positive, dtype=k.dtype)
            u = jnp.where(positive, u, u * 0)
        return (EA, F, FD, PG, k), u

    numel = math.prod(p.shape)
    k0 = jnp.zeros((), jnp.int32 if numel < 2**31 else jnp.int64)
    (exp_avg, fim, fim_diff, prev_grad, k), u = _walk(n_blocks, b, block, (exp_avg, fim, fim_diff, prev_grad, k0),
                                                      ys=True)
    if opt.cautious:  # D12, second half: u * P * sigma_k == (u * P) * sigma_k exactly in float32/64
        u = ops.mul(u, cautious_scale(ops, k, numel, quirks.float32_scalars))
    if acts(opt.weight_decay):                                                       # D13
        denom, denom_diff = denominators(ops, fim, fim_diff, b1, b2, eps_hat, opt.diff_mult, opt.eps2)
        p = preconditioned_weight_decay(ops, p, denom, denom_diff, opt.lr, opt.weight_decay)
    p = parameter_update(ops, p, u, opt.lr)                                          # D14
    return p, (exp_avg, fim, fim_diff, prev_grad)
