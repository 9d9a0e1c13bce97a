#!/usr/bin/env node
// A port in another language, checked by refopt's runner over conformance/PROTOCOL.md:
//
//   refopt check --port exec:"node conformance/examples/port.js"
//
// JSON lines in on stdin (one `case` each), JSON lines out on stdout (`hello`, then a `step` per
// gradient, or an `error`). The numbers come from saveus_dope.js; this file is only the protocol.
// It applies each case's profile and quirks (it is "configurable"), so it gets every vector.
"use strict";
const readline = require("readline");
const { decode, encode } = require("./arrays.js");
const { OPTIMIZERS } = require("./saveus_dope.js");

function send(message) { process.stdout.write(JSON.stringify(message) + "\n"); }

function runCase(c) {
  const opt = OPTIMIZERS[c.optimizer];
  if (!opt) throw new Error(`unknown optimizer ${c.optimizer}`);
  const shape = c.shape, n = shape.reduce((a, b) => a * b, 1);
  let p = decode(c.param);
  let state = { step: 0 };
  for (const name of opt.state) state[name] = c.state === null ? new Float64Array(n) : decode(c.state[name]);
  if (c.state !== null) state.step = c.state.step;
  c.grads.forEach((grad, i) => {
    ({ p, state } = opt.step(c.hparams, c.quirks, shape, c.dtype, p, decode(grad), state));
    const out = { step: state.step };
    for (const name of opt.state) out[name] = encode(state[name], c.dtype, shape);
    send({ type: "step", index: i + 1, param: encode(p, c.dtype, shape), state: out });
  });
}

send({ type: "hello", protocol: "refopt-port", version: 1, name: "node-example",
       optimizers: Object.keys(OPTIMIZERS), configurable: true });
readline.createInterface({ input: process.stdin, crlfDelay: Infinity }).on("line", (line) => {
  if (!line.trim()) return;
  try {
    runCase(JSON.parse(line));
  } catch (err) {
    send({ type: "error", message: `${err.name}: ${err.message}` });
  }
});
