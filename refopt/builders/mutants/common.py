"""Mistakes against the common rules (spec/common.md, A1-A6) and the clauses the optimizers share."""
from __future__ import annotations

import math

import numpy as np

from ... import common
from ..._arithmetic import Arithmetic
from ...conformance.encoding import np_dtype
from . import Mutant
from .blocks import per_block

S, D = "saveus", "dope"


def _both(name, breaks_s, breaks_d, mistake, **kw):
    return (Mutant(f"{name}-saveus", S, breaks_s, mistake, **kw), Mutant(f"{name}-dope", D, breaks_d, mistake, **kw))


def _std_correction_0(ops, x, channels):
    xp = ops.xp
    if x.ndim > 1 and channels:
        return ops.round(xp.std(x, axis=tuple(range(1, x.ndim)), correction=0, keepdims=True))
    return ops.round(xp.std(x, correction=0)) if math.prod(x.shape) > 2 else None


def _std_of_whole_tensor(ops, x, channels):
    return common.normalizer_std(ops, x, False)


def _std_mean_rounded_to_storage(ops, x, channels):
    """A2 with the mean rounded to D before the deviations are taken."""
    xp = ops.xp
    axes = tuple(range(1, x.ndim)) if x.ndim > 1 and channels else None
    if axes is None and math.prod(x.shape) <= 2:
        return None
    count = math.prod(x.shape[1:]) if axes else math.prod(x.shape)
    mean = ops.round(xp.mean(x, axis=axes, keepdims=True))
    deviation = x - mean
    variance = xp.sum(deviation * deviation, axis=axes, keepdims=axes is not None) / (count - 1)
    return ops.round(xp.sqrt(variance))


def _keeps_infinities(ops, x):
    return x


def _normalize_without_eps(ops, g, weight, channels, aliased_lerp):
    std = common.normalizer_std(ops, g, channels)
    if std is None:
        return g
    normalized = ops.div(g, std)
    return common.infinities_to_nan(ops, normalized) if aliased_lerp else ops.lerp(g, normalized, weight)


def _centralize_adds_mean(ops, g, strength, torch_empty_axis_mean):
    mean = common.trailing_mean(ops, g, torch_empty_axis_mean)
    return ops.add(g, ops.mul(mean, strength))


def _round_as_bfloat16(self, x):
    if not self.rounds_to_storage:
        return x
    return self.xp.astype(self.xp.astype(x, np_dtype("bfloat16")), self.work)


def _float32_bias_corrections(self, b, t):
    xp = self.xp
    power = xp.astype(xp.asarray(b, dtype=xp.float64), xp.float32) ** xp.astype(t, xp.float32)
    return xp.astype(1.0 - power, self.scalar)


def _widen_zeroing_nan(self, x):
    x = Arithmetic.widen(self, x)
    return self.xp.where(self.xp.isnan(x), self.xp.zeros_like(x), x)


def _blockwise_trailing_mean(ops, x, torch_empty_axis_mean):
    xp = ops.xp
    if x.ndim == 0 or (x.ndim == 1 and not torch_empty_axis_mean):
        return common.trailing_mean(ops, x, torch_empty_axis_mean)
    mean = per_block(xp, x, lambda part: xp.mean(part, axis=1, keepdims=True), channels=x.ndim > 1)
    return ops.round(mean)


def _blockwise_normalizer_std(ops, x, channels):
    xp = ops.xp
    by_channel = x.ndim > 1 and channels
    if not by_channel and math.prod(x.shape) <= 2:
        return None
    std = per_block(xp, x, lambda part: xp.std(part, axis=1, correction=1, keepdims=True), channels=by_channel)
    return ops.round(std)


#: The warm-up after which the ``bias-corrections-dropped-after-warmup`` mutants stop correcting.
WARMUP = 1000


def _bias_corrections_dropped_after_warmup(self, b, t):
    exact = Arithmetic.one_minus_pow(self, b, t)
    return self.xp.where(t > WARMUP, self.xp.ones_like(exact), exact)


def _count_in_int32(ops, step):
    xp = ops.xp
    with np.errstate(over="ignore"):  # the mistake: the count wraps past 2**31 - 1
        count = xp.astype(xp.astype(step, xp.int32) + 1, xp.int32)
    return count, xp.astype(count, ops.scalar)


def _count_in_float32(ops, step):
    xp = ops.xp  # torch.optim's own optimizers keep `step` as a float32 tensor
    count = xp.astype(step, xp.float32) + xp.asarray(1.0, dtype=xp.float32)
    return xp.astype(count, xp.int64), xp.astype(count, ops.scalar)


def _empty_step_not_counted(xp, param, state):
    return param, state


def _count_from_zero(ops, step):
    return ops.xp.asarray(step + 1), ops.step_count(step - 1)


MUTANTS = (
    # A1 (and Q2): an empty axis list reduced over no axes, as the array API does
    *_both("array-api-empty-axis-mean", ("A1", "Q2", "S1"), ("A1", "Q2", "D1", "D10"),
           "a mean over no trailing axes reduces over none (array API axis=())",
           quirks=("torch_empty_axis_mean",)),
    *_both("blockwise-trailing-mean", ("A1", "S1"), ("A1", "D1", "D10"),
           "the trailing-axes mean computed per block of 64K elements and never combined",
           replaces=lambda: {"trailing_mean": _blockwise_trailing_mean}),
    # A2
    *_both("blockwise-normalizer-std", ("A2", "S2"), ("A2", "D2"),
           "the normalizer std computed per block of 64K elements and never combined",
           replaces=lambda: {"normalizer_std": _blockwise_normalizer_std}),
    *_both("std-correction-0", ("A2", "S2"), ("A2", "D2"), "the normalizer std with correction 0 (population std)",
           replaces=lambda: {"normalizer_std": _std_correction_0}),
    *_both("global-std", ("A2", "S2"), ("A2", "D2"), "the normalizer std over the whole tensor, not per channel",
           replaces=lambda: {"normalizer_std": _std_of_whole_tensor}),
    *_both("std-mean-rounded-to-storage", ("A2", "S2"), ("A2", "D2"),
           "the mean inside the normalizer std is rounded to the 16-bit dtype",
           replaces=lambda: {"normalizer_std": _std_mean_rounded_to_storage}, only=("float16",)),
    # S2/D2 (shared clause)
    *_both("aliased-lerp-keeps-infinities", ("S2", "Q1"), ("D2", "Q1"),
           "Q1 implemented as g/s alone: an overflowing quotient stays infinite instead of NaN",
           replaces=lambda: {"infinities_to_nan": _keeps_infinities}, only=("float64",)),
    *_both("std-without-eps", ("S2",), ("D2",), "the normalizer divides by the std without the +1e-8",
           replaces=lambda: {"normalize": _normalize_without_eps}),
    *_both("interpolating-lerp", ("S2", "Q1"), ("D2", "Q1"), "the normalization interpolates g + a*(g/s - g)",
           quirks=("aliased_lerp",)),
    # S1/D1 (shared clause)
    *_both("centralize-adds-mean", ("S1",), ("D1",), "centralization adds c * mean instead of subtracting it",
           replaces=lambda: {"centralize": _centralize_adds_mean}),
    # A3: 16-bit rounding
    *_both("float16-rounded-as-bfloat16", ("A3",), ("A3",),
           "16-bit intermediates rounded to bfloat16's 8 bits, also for float16 (11 bits)",
           replaces=lambda: {"Arithmetic.round": _round_as_bfloat16}, only=("float16",)),
    # A4: scalars in float32
    *_both("float32-bias-corrections", ("A4", "S3"), ("A4", "D5"),
           "the bias corrections 1 - beta**t computed in float32",
           replaces=lambda: {"Arithmetic.one_minus_pow": _float32_bias_corrections}),
    *_both("bias-corrections-dropped-after-warmup", ("A4", "S3"), ("A4", "D5"),
           f"the bias corrections are dropped (taken as 1) after {WARMUP} steps",
           replaces=lambda: {"Arithmetic.one_minus_pow": _bias_corrections_dropped_after_warmup}),
    # A5: non-finite values repaired
    *_both("nan-grad-zeroed", ("A5",), ("A5",), "NaN inputs replaced by zeros before the step",
           replaces=lambda: {"Arithmetic.widen": _widen_zeroing_nan}),
    # A6: empty tensors
    *_both("empty-step-not-counted", ("A6", "S0"), ("A6", "D0"), "an empty parameter's step count does not move",
           replaces=lambda: {"empty_tensor_step": _empty_step_not_counted}),
    # S0/D0: the count
    *_both("step-count-from-zero", ("S0",), ("D0",), "t = step (0-based) in the bias corrections",
           replaces=lambda: {"count_step": _count_from_zero}),
    *_both("step-count-int32", ("S0",), ("D0",), "the step count is an int32, which wraps past 2**31 - 1",
           replaces=lambda: {"count_step": _count_in_int32}),
    *_both("step-count-float32", ("S0",), ("D0",),
           "the step count is kept in float32 (as torch.optim's optimizers keep it), which rounds past 2**24",
           replaces=lambda: {"count_step": _count_in_float32}),
)
