// SAVEUS and DOPE in plain JavaScript, written from spec/ alone: an example of a port in another
// language (port.js serves it to `refopt check` over conformance/PROTOCOL.md).
//
// Arrays are Float64Arrays holding values of the storage dtype D. Every operation is evaluated in
// the work dtype W (float32 for float16/bfloat16/float32, float64 for float64: Math.fround after
// each float64 operation is the correctly rounded float32 result for + - * / sqrt), and R(.)
// rounds a W value to D where the clauses write it (common.md, A3). Reductions add pairwise,
// rounding to W after each addition (numerics.md lets any order do).
"use strict";
const { ROUND } = require("./arrays.js");

const SAVEUS_STATE = ["ema", "ema_squared"];
const DOPE_STATE = ["exp_avg", "fim", "fim_diff", "prev_grad"];

// ---- A3: the arithmetic of one tensor ---------------------------------------------------------
function arithmetic(dtype) {
  const W = dtype === "float64" ? (x) => x : Math.fround;
  const R = dtype === "float16" || dtype === "bfloat16" ? ROUND[dtype] : (x) => x;
  const map = (n, f) => { const out = new Float64Array(n); for (let i = 0; i < n; i++) out[i] = f(i); return out; };
  const at = (x) => (typeof x === "number" ? () => x : (i) => x[i]); // a scalar or an array, by index
  const ops = {
    W, R,
    inW: (c) => W(c),          // <c>_W: a factor, divisor or bound
    inD: (c) => R(W(c)),       // <c>_D: an added constant or an add's alpha, through float32 (A3.3)
    n: 0,
    mul: (x, y) => { const b = at(y); return map(ops.n, (i) => R(W(x[i] * b(i)))); },
    div: (x, y) => { const b = at(y); return map(ops.n, (i) => R(W(x[i] / b(i)))); },
    sub: (x, y) => { const b = at(y); return map(ops.n, (i) => R(W(x[i] - b(i)))); },
    add: (x, y, alpha) => {
      const b = at(y), a = alpha === undefined ? null : ops.inD(alpha);
      return map(ops.n, (i) => R(W(x[i] + (a === null ? b(i) : W(a * b(i))))));
    },
    addConstant: (x, c) => { const a = ops.inD(c); return map(ops.n, (i) => R(W(x[i] + a))); },
    addcmul: (x, y, z, value) => { const v = W(value); return map(ops.n, (i) => R(W(x[i] + W(W(v * y[i]) * z[i])))); },
    subcdiv: (x, y, z, value) => { const v = W(value); return map(ops.n, (i) => R(W(x[i] - W(v * W(y[i] / z[i]))))); },
    lerp: (x, y, w) => { const v = W(w); return map(ops.n, (i) => R(W(x[i] + W(v * W(y[i] - x[i]))))); },
    sqrt: (x) => map(ops.n, (i) => R(W(Math.sqrt(x[i])))),
  };
  return ops;
}

function sumW(W, xs, start, end) { // pairwise, each addition rounded to W
  const n = end - start;
  if (n === 0) return 0;
  const a = Float64Array.from(xs.subarray(start, end));
  let m = n;
  while (m > 1) {
    const half = m >> 1;
    for (let i = 0; i < half; i++) a[i] = W(a[2 * i] + a[2 * i + 1]);
    if (m & 1) { a[half] = a[m - 1]; m = half + 1; } else m = half;
  }
  return a[0];
}

// The rows reduced by A1/A2: one per channel (axis 0) when ndim > 1, else the whole tensor.
function rows(shape, n, channels) {
  if (channels && shape.length > 1) { const len = n / shape[0]; return { count: shape[0], len }; }
  return { count: 1, len: n };
}

function meanW(ops, x, start, end) { return ops.W(sumW(ops.W, x, start, end) / (end - start)); }

// A1: R(trailing-axes mean), broadcast back to every element.
function trailingMean(ops, x, shape, q2) {
  if (shape.length <= 1 && !q2) return x.map(ops.R); // a mean over no axes reduces nothing
  const r = rows(shape, x.length, true), out = new Float64Array(x.length);
  for (let c = 0; c < r.count; c++) out.fill(ops.R(meanW(ops, x, c * r.len, (c + 1) * r.len)), c * r.len, (c + 1) * r.len);
  return out;
}

// A2: R(normalizer std), broadcast, or null when the clause does not act.
function normalizerStd(ops, x, shape, channels) {
  if (!(shape.length > 1 && channels) && x.length <= 2) return null;
  const r = rows(shape, x.length, channels), out = new Float64Array(x.length);
  for (let c = 0; c < r.count; c++) {
    const start = c * r.len, end = start + r.len, m = meanW(ops, x, start, end);
    const sq = new Float64Array(r.len);
    for (let i = start; i < end; i++) { const d = ops.W(x[i] - m); sq[i - start] = ops.W(d * d); }
    const variance = ops.W(sumW(ops.W, sq, 0, r.len) / (r.len - 1));
    out.fill(ops.R(ops.W(Math.sqrt(variance))), start, end);
  }
  return out;
}

function centralize(ops, g, shape, strength, q2) { // S1, D1
  const shift = ops.mul(trailingMean(ops, g, shape, q2), ops.inW(strength));
  return ops.sub(g, shift);
}

function normalize(ops, g, shape, weight, channels, aliasedLerp) { // S2, D2
  const std = normalizerStd(ops, g, shape, channels);
  if (std === null) return g;
  const normalized = ops.div(g, ops.addConstant(std, 1e-8));
  if (aliasedLerp) return normalized.map((v) => (Number.isFinite(v) || Number.isNaN(v) ? v : NaN)); // Q1
  return ops.lerp(g, normalized, weight);
}

const oneMinusPow = (b, t) => (b === 0 ? 1 : 1 - b ** t); // A4: in binary64

// ---- SAVEUS (saveus.md, S0-S10) -----------------------------------------------------------------
function saveusStep(h, q, shape, dtype, p, g, st) {
  const ops = arithmetic(dtype); ops.n = p.length;
  const t = st.step + 1;                                                              // S0
  if (p.length === 0) return { p, state: { ...st, step: t } };                        // A6
  let { ema, ema_squared: emaSquared } = st;
  if (h.centralization !== 0) g = centralize(ops, g, shape, h.centralization, q.torch_empty_axis_mean);   // S1
  if (h.normalization !== 0) g = normalize(ops, g, shape, h.normalization, h.normalize_channels, q.aliased_lerp); // S2
  const [beta1, beta2] = h.betas;
  const rho = Math.sqrt(oneMinusPow(beta2, t)), stepSize = h.lr / oneMinusPow(beta1, t); // S3
  ema = ops.add(ops.mul(ema, ops.inW(beta1)), g, 1 - beta1);                          // S4
  g = ops.add(g, ema, h.amp_fac);                                                     // S5
  emaSquared = ops.addcmul(ops.mul(emaSquared, ops.inW(beta2)), g, g, 1 - beta2);     // S6
  const denom = ops.addConstant(ops.div(ops.sqrt(emaSquared), ops.inW(rho)), h.eps);  // S7
  if (h.decouple_weight_decay && h.weight_decay !== 0) p = ops.mul(p, ops.inW(1 - stepSize * h.weight_decay)); // S8
  else if (h.weight_decay !== 0) g = ops.add(g, p, h.weight_decay);
  if (h.clip_gradients && h.clip_lambda !== null) {                                   // S9
    const bound = ops.inW(t ** h.clip_lambda.power);
    g = g.map((v) => ops.R(Math.min(Math.max(v, -bound), bound)));
  }
  p = ops.subcdiv(p, g, denom, stepSize);                                             // S10
  return { p, state: { step: t, ema, ema_squared: emaSquared } };
}

// ---- DOPE (dope.md, D0-D14) ---------------------------------------------------------------------
function dopeStep(h, q, shape, dtype, p, g, st) {
  const ops = arithmetic(dtype), n = p.length; ops.n = n;
  const t = st.step + 1;                                                              // D0
  if (n === 0) return { p, state: { ...st, step: t } };                               // A6
  let { exp_avg: m, fim: f, fim_diff: dh } = st;
  const gPrev = st.prev_grad;
  if (h.centralization > 0) g = centralize(ops, g, shape, h.centralization, q.torch_empty_axis_mean);     // D1
  if (h.normalization > 0) g = normalize(ops, g, shape, h.normalization, h.normalize_channels, q.aliased_lerp); // D2
  if (h.clip > 0) {                                                                   // D3
    const squares = new Float64Array(n);
    for (let i = 0; i < n; i++) squares[i] = ops.W(g[i] * g[i]);
    const norm = ops.R(ops.W(Math.sqrt(sumW(ops.W, squares, 0, n))));
    const inverse = ops.R(ops.W(1 / ops.R(ops.W(norm + ops.inD(1e-6)))));
    const k = Math.min(ops.R(ops.W(inverse * ops.inW(h.clip))), 1);
    g = ops.mul(g, k);
  }
  const [beta1, beta2] = h.betas;
  f = ops.addcmul(ops.mul(f, ops.inW(beta2)), g, g, 1 - beta2);                       // D4
  const diff = ops.sub(g, gPrev);
  dh = ops.addcmul(ops.mul(dh, ops.inW(beta1)), diff, diff, 1 - beta1);
  const b1 = oneMinusPow(beta1, t), b2 = oneMinusPow(beta2, t);                       // D5
  const epsHat = h.eps_floor === null ? h.eps : Math.max(h.eps_floor, h.eps * Math.sqrt(t)); // D6
  const denom = ops.addConstant(ops.div(ops.sqrt(f), ops.inW(Math.sqrt(b2))), epsHat);        // D7
  const denomDiff = ops.addConstant(ops.mul(ops.div(ops.sqrt(dh), ops.inW(Math.sqrt(b1))), ops.inW(h.diff_mult)), h.eps2);
  let u = ops.div(ops.div(g, denom), denomDiff);                                      // D8
  const kappa = h.gamma * (beta1 / (1 - beta1));                                      // D9
  u = ops.add(u, ops.mul(q.mars_current_grad ? g : gPrev, ops.inW(kappa)));
  const ct = u;
  m = ops.add(ops.mul(m, ops.inW(h.momentum_beta)), ct, 1 - h.momentum_beta);         // D10
  m = ops.sub(m, trailingMean(ops, m, shape, q.torch_empty_axis_mean));
  const lambda = h.momentum_lambda;                                                   // D11
  let amp;
  if (q.float32_scalars) {
    amp = Math.fround(Math.pow(Math.fround(t), Math.fround(lambda)));   // binary64 power rounded once
    if (q.lambda_scaled_amplification) amp = Math.fround(Math.fround(lambda) * amp);
  } else {
    amp = ops.inW(q.lambda_scaled_amplification ? lambda * t ** lambda : t ** lambda);
  }
  u = ops.add(u, ops.mul(m, ops.W(amp)));
  if (h.cautious) {                                                                   // D12
    const against = q.cautious_processed_grad ? g : ct;
    const product = ops.mul(u, against);
    let k = 0;
    for (let i = 0; i < n; i++) if (product[i] > 0) k++;
    const scale = q.float32_scalars
      ? Math.fround(Math.fround(1 / Math.fround(Math.fround(k) + Math.fround(1e-8))) * Math.fround(n))
      : n / (k + 1e-8);
    const mask = ops.mul(product.map((v) => (v > 0 ? 1 : 0)), ops.inW(scale));
    u = ops.mul(u, mask);
  }
  if (h.weight_decay > 0) {                                                           // D13
    const w = ops.div(ops.div(p, denom), denomDiff);
    p = ops.add(p, w, -h.lr * h.weight_decay);
  }
  p = ops.add(p, u, -h.lr);                                                           // D14
  return { p, state: { step: t, exp_avg: m, fim: f, fim_diff: dh, prev_grad: g } };
}

const OPTIMIZERS = {
  saveus: { step: saveusStep, state: SAVEUS_STATE },
  dope: { step: dopeStep, state: DOPE_STATE },
};

module.exports = { OPTIMIZERS };
