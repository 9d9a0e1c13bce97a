// Arrays of the refopt vector files and port protocol, in plain Node.js (no dependencies).
//
// A tensor is {dtype, shape, <form>}: "b64" (raw little-endian values in C order, base64),
// "zlib_b64" (the same bytes compressed as one zlib stream, then base64; format 2) or
// "counter" (not stored: regenerated from a SplitMix64 counter; format 2, see counterValues).
// Values are returned as a Float64Array (every float16/bfloat16/float32 value is exact in it).
"use strict";
const zlib = require("zlib");

const ITEMSIZE = { float64: 8, float32: 4, float16: 2, bfloat16: 2, int64: 8 };
// Significant bits of each float dtype (with the implicit one).
const PRECISION = { float64: 53, float32: 24, float16: 11, bfloat16: 8 };

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function halfToNumber(bits) { // IEEE binary16 -> number
  const s = bits & 0x8000 ? -1 : 1, e = (bits >> 10) & 0x1f, m = bits & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

function bfloat16ToNumber(bits) { // the upper half of a float32
  u32[0] = (bits << 16) >>> 0;
  return f32[0];
}

// Round a number to float32 (nearest, ties to even), then to bfloat16 or float16, as a number.
function roundBfloat16(x) {
  f32[0] = x;
  const b = u32[0];
  if ((b & 0x7f800000) === 0x7f800000) return f32[0]; // inf, NaN
  u32[0] = (b + 0x7fff + ((b >>> 16) & 1)) & 0xffff0000;
  return f32[0];
}

const f64 = new Float64Array(1);
const f64words = new Uint32Array(f64.buffer);

function exponentOf(a) { // floor(log2(a)) of a normal float64 a > 0, exactly
  f64[0] = a;
  return ((f64words[1] >>> 20) & 0x7ff) - 1023;
}

function roundFloat16(x) {
  x = Math.fround(x);
  if (!Number.isFinite(x) || x === 0) return x;
  const a = Math.abs(x);
  const quantum = 2 ** (Math.max(exponentOf(a), -14) - 10); // subnormals share the binade of 2**-14
  const q = a / quantum, lo = Math.floor(q), frac = q - lo;
  const m = frac > 0.5 || (frac === 0.5 && lo % 2 === 1) ? lo + 1 : lo;
  const r = m * quantum;
  return Math.sign(x) * (r > 65504 ? Infinity : r);
}

const ROUND = { float64: (x) => x, float32: Math.fround, bfloat16: roundBfloat16, float16: roundFloat16 };

function bytesOf(t) {
  if ("b64" in t) return Buffer.from(t.b64, "base64");
  if ("zlib_b64" in t) return zlib.inflateSync(Buffer.from(t.zlib_b64, "base64"));
  throw new Error(`a ${Object.keys(t).join("/")} tensor has no stored bytes`);
}

function count(shape) { return shape.reduce((a, b) => a * b, 1); }

// The values of a tensor object (any form) as a Float64Array (int64 as exact numbers). A generated
// tensor's first `limit` elements can be made alone: element j depends on j only.
function decode(t, limit = Infinity) {
  if ("counter" in t) {
    const c = t.counter;
    return counterValues(c.seed, c.stream, Math.min(count(t.shape), limit), t.dtype, c.exponent, c.centred);
  }
  const raw = bytesOf(t), n = count(t.shape), size = ITEMSIZE[t.dtype];
  if (!size) throw new Error(`unknown dtype ${t.dtype}`);
  if (raw.length !== n * size) throw new Error(`${raw.length} bytes for ${n} ${t.dtype} values`);
  const read = {
    float64: (o) => raw.readDoubleLE(o), float32: (o) => raw.readFloatLE(o),
    float16: (o) => halfToNumber(raw.readUInt16LE(o)), bfloat16: (o) => bfloat16ToNumber(raw.readUInt16LE(o)),
    int64: (o) => Number(raw.readBigInt64LE(o)),
  }[t.dtype];
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = read(i * size);
  return out;
}

function numberToHalfBits(x) { // x exact in float16
  if (Number.isNaN(x)) return 0x7e00;
  const s = x < 0 || Object.is(x, -0) ? 0x8000 : 0, a = Math.abs(x);
  if (a === Infinity) return s | 0x7c00;
  if (a < 2 ** -14) return s | (a / 2 ** -24);
  const e = exponentOf(a);
  return s | ((e + 15) << 10) | ((a / 2 ** e - 1) * 1024);
}

// {dtype, shape, b64} of values that are exact in dtype (the caller rounds first).
function encode(values, dtype, shape) {
  const size = ITEMSIZE[dtype], n = values.length, buf = Buffer.alloc(n * size);
  for (let i = 0; i < n; i++) {
    const x = values[i], o = i * size;
    if (dtype === "float64") buf.writeDoubleLE(x, o);
    else if (dtype === "float32") buf.writeFloatLE(x, o);
    else if (dtype === "bfloat16") { f32[0] = x; buf.writeUInt16LE(u32[0] >>> 16, o); }
    else if (dtype === "float16") buf.writeUInt16LE(numberToHalfBits(x), o);
    else throw new Error(`cannot encode ${dtype}`);
  }
  return { dtype, shape, b64: buf.toString("base64") };
}

// ---- counter-generated inputs (conformance/PORTING.md, "Generated inputs") ----------------------
const MASK = (1n << 64n) - 1n;
const GAMMA = 0x9e3779b97f4a7c15n, MIX1 = 0xbf58476d1ce4e5b9n, MIX2 = 0x94d049bb133111ebn;

function mix(z) {
  z = ((z ^ (z >> 30n)) * MIX1) & MASK;
  z = ((z ^ (z >> 27n)) * MIX2) & MASK;
  return z ^ (z >> 31n);
}

// SplitMix64's (i+1)-th output from state key.
function word(key, i) { return mix((key + (BigInt(i) + 1n) * GAMMA) & MASK); }

// Elements 0..n-1 of stream `stream` of the 64-bit seed (16 hex digits), exact in dtype.
function counterValues(seedHex, stream, n, dtype, exponent, centred) {
  const q = PRECISION[dtype] - 2, key = word(BigInt("0x" + seedHex), stream);
  const shift = BigInt(64 - q), offset = centred ? 2 ** (q + 1) : 0, scale = 2 ** (exponent - q);
  const out = new Float64Array(n);
  for (let j = 0; j < n; j++) {
    let total = 0;
    for (let r = 0; r < 4; r++) total += Number(word(key, 4 * j + r) >> shift);
    out[j] = (total - offset) * scale;
  }
  return out;
}

module.exports = { decode, encode, counterValues, word, ROUND, PRECISION, count };
