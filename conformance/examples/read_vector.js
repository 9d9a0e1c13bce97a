#!/usr/bin/env node
// Reads one refopt golden vector file without any Python: checks its SHA-256 against
// SHA256SUMS, decodes the arrays (format 1: base64 little-endian; format 2 also zlib-compressed
// and counter-generated ones, see arrays.js) and prints the first values as JSON.
//
//   node read_vector.js conformance/v1/vectors/<id>.json [count]
//
// A port in any language does the same: decode param0 / state0 / steps[i].grad in the vector's
// dtype, run its own step, and compare with steps[i].param (float64) within the tolerance of
// spec/tolerance.md:  |actual - golden| <= k * budget + floor_ulps * ulp(golden).
// In format 2, `judged` (when not null) lists the flat indices whose goldens the steps hold:
// compare element judged[i] of your result with element i of steps[s].param.
"use strict";
const fs = require("fs");
const path = require("path");
const crypto = require("crypto");
const { decode } = require("./arrays.js"); // b64, zlib_b64 and counter tensors

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
  const first = (t) => Array.from(decode(t, count).subarray(0, count));
  console.log(JSON.stringify({
    id: v.id, format_version: v.format_version, optimizer: v.optimizer, dtype: v.dtype, shape: v.shape,
    profile: v.profile, hparams: v.hparams, steps: v.steps.length, fresh_state: v.state0 === null, checksum,
    first_judged: v.judged ? first(v.judged) : null,
    first_grad: first(step0.grad),
    first_expected: first(step0.param),
    first_budget: first(step0.budget),
  }, null, 1));
}

main();
