#!/usr/bin/env node
// Reads one refopt golden vector file without any Python: checks its SHA-256 against
// SHA256SUMS, decodes the base64 little-endian arrays and prints the first values as JSON.
//
//   node read_vector.js conformance/v1/vectors/<id>.json [count]
//
// A port in any language does the same: decode param0 / state0 / steps[i].grad in the vector's
// dtype, run its own step, and compare with steps[i].param (float64) within the tolerance of
// spec/tolerance.md:  |actual - golden| <= k * budget + floor_ulps * ulp(golden).
"use strict";
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");

function half(bits) { // IEEE binary16 -> number
  const s = bits & 0x8000 ? -1 : 1, e = (bits >> 10) & 0x1f, m = bits & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

function bfloat16(bits) { // the upper half of a float32
  const b = Buffer.alloc(4);
  b.writeUInt32LE((bits << 16) >>> 0);
  return b.readFloatLE(0);
}

// A tensor is {dtype, shape, b64}: raw little-endian values in C order.
function decode(t) {
  const raw = Buffer.from(t.b64, "base64");
  const read = {
    float64: [8, (o) => raw.readDoubleLE(o)],
    float32: [4, (o) => raw.readFloatLE(o)],
    float16: [2, (o) => half(raw.readUInt16LE(o))],
    bfloat16: [2, (o) => bfloat16(raw.readUInt16LE(o))],
    int64: [8, (o) => Number(raw.readBigInt64LE(o))],
  }[t.dtype];
  if (!read) throw new Error(`unknown dtype ${t.dtype}`);
  const n = t.shape.reduce((a, b) => a * b, 1);
  if (raw.length !== n * read[0]) throw new Error(`${raw.length} bytes for ${n} ${t.dtype} values`);
  return Array.from({ length: n }, (_, i) => read[1](i * read[0]));
}

function checkSum(file, bytes) {
  const sums = path.join(path.dirname(file), "..", "SHA256SUMS");
  if (!fs.existsSync(sums)) return "no SHA256SUMS next to the vectors";
  const name = `vectors/${path.basename(file)}`;
  const line = fs.readFileSync(sums, "ascii").split("\n").find((l) => l.endsWith(`  ${name}`));
  const digest = crypto.createHash("sha256").update(bytes).digest("hex");
  if (!line) throw new Error(`${name} is not listed in ${sums}`);
  if (line.slice(0, 64) !== digest) throw new Error(`${file}: checksum mismatch`);
  return "ok";
}

function main() {
  const [file, countArg] = process.argv.slice(2);
  if (!file) {
    console.error("usage: node read_vector.js VECTOR.json [count]");
    process.exit(2);
  }
  const bytes = fs.readFileSync(file);
  const checksum = checkSum(file, bytes);
  const v = JSON.parse(bytes.toString("utf8"));
  const count = Number(countArg || 5);
  const step0 = v.steps[0];
  console.log(JSON.stringify({
    id: v.id, optimizer: v.optimizer, dtype: v.dtype, shape: v.shape, profile: v.profile,
    hparams: v.hparams, steps: v.steps.length, fresh_state: v.state0 === null, checksum,
    first_grad: decode(step0.grad).slice(0, count),
    first_expected: decode(step0.param).slice(0, count),
    first_budget: decode(step0.budget).slice(0, count),
  }, null, 1));
}

main();
