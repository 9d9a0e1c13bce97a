"""The in-place torch kernels behind refopt.torch: one call updates a *batch* of pieces.

A piece is a parameter or a block of its leading-axis rows, with matching views of its grad,
state buffers and scratch. A batch is a list of pieces processed by ``torch._foreach_*`` ops, so
one op covers many small tensors, and a row block stays in cache across the ~35 ops of a step
(cache blocking, used when torch runs ops on one thread; see _plan.row_blocks and
benchmarks/bench_torch.py). Op for op the kernels follow the reference's in-place sequence, which
is what the core models (clause ids as in spec/), so per element they round as the core does,
with these exceptions: reductions sum in their own order (the float32/64 std in two passes,
much faster than torch.std), and in float32/64 three places use one fused op where the reference
has two (``add_(alpha=)`` for the D9 and D11 terms, ``lerp_`` for D10, one ``addcmul_`` for D12's
scale and D14): an ulp at most, and the same conformance budgets as the original code. 16-bit
tensors get the reference's own ops throughout.

The kernels write the optimizer's own buffers (state, scratch) and the parameter; never the grad.

Step scalars (``s``, from _optim/__init__): Python floats computed on the host in float64, except
the ones that carry the learning rate (SAVEUS ``step_size``, DOPE ``lr``), which are 0-d float64
tensors on the parameters' device when ``lr`` is a tensor there (read without a host sync;
``mul_`` and ``add_times_`` take either).
"""
from __future__ import annotations

import math

import torch

F32 = torch.float32
LOW = (torch.float16, torch.bfloat16)
#: Below this many elements one torch.std call beats the four calls of the two-pass std.
SMALL = 1 << 14


def trailing_mean(x, torch_empty_axis_mean: bool):
    """A1: mean over axes 1.., keepdim; with no trailing axes all axes (Q2) or none. For
    float32/64 as sum / n, which is how torch's CPU mean computes it (bit for bit) in fewer
    calls; 16-bit tensors use mean itself, which rounds once."""
    if x.dim() <= 1 and not torch_empty_axis_mean:
        return x
    dims = tuple(range(1, x.dim())) if x.dim() > 1 else None
    if x.dtype in LOW:
        return x.mean(dim=dims, keepdim=True) if dims else x.mean()
    total = x.sum(dim=dims, keepdim=True) if dims else x.sum()
    return total.div_(x.numel() // x.shape[0] if dims else x.numel())


def normalizer_std(x, channels: bool, tmp):
    """A2: channel-wise std when ndim > 1 and ``channels``, global when numel > 2, else None.

    Correction 1. For large float32/64 tensors in two passes, the mean then the norm of the
    deviations (written to the scratch ``tmp``; a one-element channel gives 0/0 = NaN as torch.std
    does): as accurate as torch.std's Welford loop and several times faster on CPU. Small tensors,
    where the number of calls counts, get torch.std."""
    if x.dim() > 1 and channels:
        dims = tuple(range(1, x.dim()))
    elif x.numel() > 2:
        dims = None
    else:
        return None
    if x.dtype in LOW or x.numel() <= SMALL:  # torch's own reduction: for 16 bits the
        return x.std(dim=dims, keepdim=True) if dims else x.std()  # reference's rounding
    n = x.numel() // (x.shape[0] if dims else 1)
    mean = x.mean(dim=dims, keepdim=True) if dims else x.mean()
    dev = torch.sub(x, mean, out=tmp)
    norm = torch.linalg.vector_norm(dev, dim=dims, keepdim=True) if dims else torch.linalg.vector_norm(dev)
    return norm.div_(math.sqrt(n - 1) if n > 1 else 0.0)


def process_grad(b, q, *, c, center: bool, a, normalize: bool, channels: bool):
    """S1/D1 centralize and S2/D2 normalize ``b["grad"]`` into the scratch views ``b["g"]``."""
    grads, gs = b["grad"], b["g"]
    if center:
        for grad, g in zip(grads, gs):
            torch.sub(grad, trailing_mean(grad, q.torch_empty_axis_mean) * c, out=g)
    else:
        torch._foreach_copy_(gs, grads)
    if not normalize:
        return
    for g, tmp in zip(gs, b["t1"]):
        s = normalizer_std(g, channels, tmp)
        if s is None:
            continue
        s = s.to(g.dtype).add_(1e-8)
        if q.aliased_lerp:  # Q1: the lerp of g/s with itself leaves g/s, NaN where it is infinite
            g.div_(s)
            g.lerp_(g, a)
        else:  # documented interpolation g + a*(g/s - g), one R(.): in float32 for a 16-bit g
            torch.div(g, s, out=tmp)
            if g.dtype in LOW:  # (g/s - g) rounded to 16 bits first loses g/s where |g| >> |g/s|
                w = g.float()
                g.copy_(w.add_(tmp.float().sub_(w), alpha=a))
            else:
                g.add_(tmp.sub_(g), alpha=a)


def scalar(xs, c: float):
    """``c`` as torch's CPU foreach ops take it fastest: a 0-d tensor of the list's dtype (a
    float32/64 op rounds a Python scalar to its dtype too, so the results are bit-identical),
    converted once rather than once per tensor. Elsewhere the float itself."""
    x = xs[0]
    return torch.tensor(c, dtype=x.dtype) if x.device.type == "cpu" and x.dtype not in LOW else c


def mul_(xs, c):
    """xs *= c for a Python float. For 16-bit tensors one tensor at a time: torch's foreach
    multiply rounds ``c`` to the tensor's dtype first, where ``x.mul_(c)`` (the reference's op,
    which the core models) multiplies by it in float32.

    ``c`` may also be a 0-d tensor on the tensors' device (a step scalar derived from a tensor
    ``lr`` there, see _optim.step_lr): the same rounding, without reading it on the host."""
    if isinstance(c, torch.Tensor):
        if xs and xs[0].dtype in LOW:  # the product in float32, then rounded, as x.mul_(float)
            c32 = c.to(F32)
            for x in xs:
                x.copy_(x.to(F32).mul_(c32))
        elif xs:
            torch._foreach_mul_(xs, c.to(xs[0].dtype))
        return
    if xs and xs[0].dtype in LOW:
        for x in xs:
            x.mul_(c)
    else:
        torch._foreach_mul_(xs, scalar(xs, c))


def add_times_(xs, ys, alpha, denoms=None):
    """xs += alpha * ys, or alpha * (ys / denoms) (torch's addcdiv): one fused op for a Python
    float ``alpha``. For a 0-d tensor ``alpha`` (a tensor ``lr`` on the parameters' device, never
    read on the host) float32/64 scale ``ys``, a scratch, in place and then add: within an ulp of
    the fused op; 16-bit tensors compute in float32 and round once, as the fused op does."""
    if not isinstance(alpha, torch.Tensor):
        if denoms is None:
            torch._foreach_add_(xs, ys, alpha=alpha)
        else:
            torch._foreach_addcdiv_(xs, ys, denoms, value=alpha)
    elif xs and xs[0].dtype in LOW:
        a = alpha.to(F32)
        for i, x in enumerate(xs):
            y = ys[i].to(F32) if denoms is None else ys[i].to(F32).div_(denoms[i])
            x.copy_(y.mul_(a).add_(x))
    elif xs:
        if denoms is not None:
            torch._foreach_div_(ys, denoms)
        mul_(ys, alpha)
        torch._foreach_add_(xs, ys)


def _fill(dst, src):
    """dst := src, elementwise over lists (the scratch a temporary lives in)."""
    torch._foreach_copy_(dst, src)
    return dst


_INPLACE = {torch.sub: torch._foreach_sub_, torch.mul: torch._foreach_mul_, torch.div: torch._foreach_div_,
            torch.sqrt: torch._foreach_sqrt_}


def into(dst, op, x, *rest):
    """dst := op(x, *rest) over lists: ``out=`` per tensor for a few pieces (no extra pass),
    else one foreach copy and the in-place foreach op (two calls for any number of tensors)."""
    if len(dst) <= 4:
        for i, o in enumerate(dst):
            op(x[i], *(r[i] for r in rest), out=o)
    else:
        _INPLACE[op](_fill(dst, x), *rest)
    return dst


def denominator(dst, sq, bc_sqrt: float, eps: float, mult: float = 1.0):
    """S7/D7: ``sqrt(sq) / bc_sqrt (* mult) + eps`` into the scratch ``dst``, op by op."""
    torch._foreach_div_(into(dst, torch.sqrt, sq), scalar(dst, bc_sqrt))
    if mult != 1.0:  # x * 1.0 == x exactly, so skipping it changes no bit
        mul_(dst, mult)
    torch._foreach_add_(dst, scalar(dst, eps))
    return dst


def add_scaled(x, y, alpha: float, tmp, low: bool):
    """``x += alpha * y``. For 16-bit tensors the product is rounded first, as the reference's
    separate multiply does; in float32/float64 one fused add (at most an ulp from it)."""
    if low:
        mul_(_fill(tmp, y), alpha)
        torch._foreach_add_(x, tmp)
    else:
        torch._foreach_add_(x, y, alpha=alpha)


def saveus_batch(b, h, q, s):
    """S1-S10 on batch ``b`` (lists p, grad, ema, ema_squared, g, t1); ``s`` the step scalars."""
    p, ema, sq, g = b["p"], b["ema"], b["ema_squared"], b["g"]
    b1, b2 = h["betas"]
    process_grad(b, q, c=h["centralization"], center=h["centralization"] != 0,
                 a=h["normalization"], normalize=h["normalization"] != 0, channels=h["normalize_channels"])
    mul_(ema, b1)  # S4
    torch._foreach_add_(ema, g, alpha=1 - b1)
    torch._foreach_add_(g, ema, alpha=h["amp_fac"])  # S5
    mul_(sq, b2)  # S6
    torch._foreach_addcmul_(sq, g, g, value=1 - b2)
    denom = denominator(b["t1"], sq, s["bc2_sqrt"], h["eps"])  # S7
    wd = h["weight_decay"]
    if h["decouple_weight_decay"] and wd != 0:  # S8
        mul_(p, 1 - s["step_size"] * wd)
    elif wd != 0:
        torch._foreach_add_(g, p, alpha=wd)
    if s["clip"] is not None:  # S9
        torch._foreach_clamp_min_(g, -s["clip"])
        torch._foreach_clamp_max_(g, s["clip"])
    add_times_(p, g, -s["step_size"], denom)  # S10 (addcdiv; g is scratch)


def dope_grad(b, h, q):
    """DOPE phase 1: D1/D2 into the scratch ``g``; returns the pieces' D3 norms (or None)."""
    process_grad(b, q, c=h["centralization"], center=h["centralization"] > 0,
                 a=h["normalization"], normalize=h["normalization"] > 0, channels=h["normalize_channels"])
    if h["clip"] <= 0:
        return None
    acc = torch.float64 if b["g"][0].dtype == torch.float64 else F32
    return torch._foreach_norm(b["g"], 2, dtype=acc)


def clip_coef(norm, clip, dtype):
    """D3 ``min(clip / (norm + 1e-6), 1)``, rounded to the parameter dtype as the reference does."""
    return (clip / (norm.to(dtype) + 1e-6)).clamp_(max=1.0)


def dope_update(b, h, q, s, coefs, counts):
    """DOPE phase 2: D3 scaling to D13, and D14 when not cautious. With cautious, leaves
    ``u * positive`` in ``g`` and puts each piece's positive count into ``counts``.
    Temporaries live in the scratch views t1, t2, t4 (and t3 where Q3 or Q6 is off)."""
    p, g, fim, fd, prev, ea = (b[k] for k in ("p", "g", "fim", "fim_diff", "prev_grad", "exp_avg"))
    t1, t2, t3, t4 = b["t1"], b["t2"], b.get("t3"), b["t4"]
    low = p[0].dtype in LOW
    b1, b2 = h["betas"]
    if coefs is not None:
        torch._foreach_mul_(g, coefs)  # D3
    mul_(fim, b2)  # D4
    torch._foreach_addcmul_(fim, g, g, value=1 - b2)
    diff = into(t1, torch.sub, g, prev)
    mul_(fd, b1)
    torch._foreach_addcmul_(fd, diff, diff, value=1 - b1)
    mars = h["gamma"] * (b1 / (1 - b1))  # D9 (a Python float, as in the reference)
    g_prev = None if q.mars_current_grad else _fill(t3, prev)  # Q3 off: g_{t-1}
    torch._foreach_copy_(prev, g)
    denom = denominator(t1, fim, s["bc2_sqrt"], s["eps_hat"])  # D7
    denom_diff = denominator(t2, fd, s["bc1_sqrt"], h["eps2"], h["diff_mult"])
    u = g  # D8: the natural gradient overwrites g (prev_grad holds g_t now)
    torch._foreach_div_(u, denom)  # two divisions, in this order
    torch._foreach_div_(u, denom_diff)
    add_scaled(u, prev if g_prev is None else g_prev, mars, t4, low)  # D9
    cautious = h["cautious"]
    c_t = _fill(t3, u) if cautious and not q.cautious_processed_grad else None  # Q6 off
    mb = h["momentum_beta"]
    if low:  # D10, rounded after the multiply as the reference is
        mul_(ea, mb)
        torch._foreach_add_(ea, u, alpha=1 - mb)
    else:  # one pass; within an ulp of mul-then-add
        torch._foreach_lerp_(ea, u, 1 - mb)
    for x in ea:
        x.sub_(trailing_mean(x, q.torch_empty_axis_mean))
    add_scaled(u, ea, s["amp"], t4, low)  # D11
    wd = h["weight_decay"]
    if wd > 0:  # D13: pre-update p over the same denominators
        w = into(t4, torch.div, p, denom)
        torch._foreach_div_(w, denom_diff)
        add_times_(p, w, -s["lr"] * wd)
    if cautious:  # D12 part 1: the mask; its scale needs every piece's count
        pos = into(t4, torch.mul, u, prev if c_t is None else c_t)
        for i, m in enumerate(pos):
            m.gt_(0)  # 1.0 where positive, else 0.0 (NaN too): u * m is u or +-0, as u * mask
            exact = m.dtype == torch.float64 or m.numel() > 2**24  # float32 counts exactly to 2**24
            counts[i] = m.sum(dtype=torch.float64 if exact else F32)
        torch._foreach_mul_(u, pos)
    else:
        add_times_(p, u, -s["lr"])  # D14 (u is the scratch g)


def cautious_scale(count, numel: int, dtype, float32_scalars: bool):
    """D12 ``numel / (k + 1e-8)``: float32 reciprocal then multiply (Q5), rounded to the dtype
    as the reference's mask is; without Q5 exact in float64."""
    if float32_scalars:
        return (torch.reciprocal(count.to(F32) + 1e-8) * float(numel)).to(dtype)
    return (float(numel) / (count.to(torch.float64) + 1e-8)).to(dtype)


def dope_apply(b, lr, scales):
    """DOPE phase 3 (cautious): D12 scale and D14, ``p - lr * ((u * pos) * scale)``; in one
    pass for float32/64, as two rounded ops for 16-bit tensors (and for a device tensor lr)."""
    if b["p"][0].dtype in LOW or isinstance(lr, torch.Tensor):
        if b["p"][0].dtype in LOW:
            for g, scale in zip(b["g"], scales):
                # the reference's mask is R(P * sigma): 0 where P is 0 even when sigma overflows the
                # dtype (n / k > 65504 in float16, e.g. k = 0), where (u * P) * R(sigma) is 0 * inf = NaN
                g.copy_(torch.where(g == 0, g, g * scale))
        else:
            torch._foreach_mul_(b["g"], scales)
        add_times_(b["p"], b["g"], -lr)
    else:
        torch._foreach_addcmul_(b["p"], b["g"], scales, value=-lr)


def amplification(t: int, lam: float, q) -> float:
    """D11 ``lambda * t**lambda``: a float32 power and product (Q4, Q5), else float64."""
    if q.float32_scalars:
        a = torch.pow(torch.tensor(float(t), dtype=F32), lam)
        return float(lam * a if q.lambda_scaled_amplification else a)
    a = float(t) ** lam
    return lam * a if q.lambda_scaled_amplification else a


def one_minus_pow(b: float, t: int) -> float:
    """S3/D5 bias correction ``1 - b**t`` in float64, as the reference's Python floats."""
    return 1.0 - b**t
