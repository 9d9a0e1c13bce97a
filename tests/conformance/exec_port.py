"""A port run as ``--port exec:"python exec_port.py ..."``: it speaks the port protocol
(conformance/PROTOCOL.md) itself, with json and base64 on the wire and refopt's core for the
numbers, as a port in another language would with its own. ``--without NAME`` declares a
hyperparameter its constructor lacks (partial verdicts); ``--mode`` breaks the protocol one way."""
from __future__ import annotations

import argparse
import base64
import json
import sys

import ml_dtypes
import numpy as np

import refopt

DTYPES = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": ml_dtypes.bfloat16}
NAMES = {"saveus": refopt.SAVEUS, "dope": refopt.DOPE}


def decode(t):
    return np.frombuffer(base64.b64decode(t["b64"]), dtype=DTYPES[t["dtype"]]).reshape(t["shape"]).copy()


def encode(a, name):
    a = np.ascontiguousarray(np.asarray(a, dtype=DTYPES[name]))
    return {"dtype": name, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--without", action="append", default=[])
    ap.add_argument("--mode", default="good")
    args = ap.parse_args()
    if args.mode == "exit-before-hello":
        print("no licence for this port", file=sys.stderr)
        sys.exit(3)
    if args.mode == "garbage-hello":
        print("Hello, world!")
    elif args.mode == "bad-version":
        send({"type": "hello", "protocol": "refopt-port", "version": 99})
    else:
        takes = {o: [h.name for h in c.facts.hparams if h.name not in args.without] for o, c in NAMES.items()}
        send({"type": "hello", "protocol": "refopt-port", "version": 1, "name": "exec-port", "hparams": takes})
    for line in sys.stdin:
        case = json.loads(line)
        if args.mode == "error":
            send({"type": "error", "message": "cannot do that"})
            continue
        if args.mode == "skip":
            send({"type": "skip", "reason": "not today"})
            continue
        h = dict(case["hparams"])
        if "betas" in h:
            h["betas"] = tuple(h["betas"])
        if isinstance(h.get("clip_lambda"), dict):
            power = h["clip_lambda"]["power"]
            h["clip_lambda"] = lambda t, p=power: t**p
        opt = NAMES[case["optimizer"]](**h)
        p = decode(case["param"])
        st = opt.init(p) if case["state"] is None else opt.State(
            step=np.asarray(case["state"]["step"]), **{n: decode(case["state"][n]) for n in opt.State._fields[1:]})
        for i, g in enumerate(case["grads"], 1):
            p, st = opt.step(p, decode(g), st)
            msg = {"type": "step", "index": i, "param": encode(p, case["dtype"]),
                   "state": dict({n: encode(st[n], case["dtype"]) for n in opt.State._fields[1:]}, step=int(st.step))}
            if args.mode == "garbage-step":
                print("DEBUG: step done")
            elif args.mode == "wrong-index":
                msg["index"] = i + 1
            elif args.mode == "long-line":
                msg["padding"] = "x" * (4 << 20)
            send(msg)


if __name__ == "__main__":
    main()
