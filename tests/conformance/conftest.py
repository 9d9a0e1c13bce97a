"""Helpers shared by the runner tests: small vector directories written from refopt's core."""
from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import pytest

import refopt
from refopt.conformance import ports
from refopt.conformance.encoding import encode
from refopt.conformance.vectors import hparams_to_json
from refopt.quirks import Quirks

NAMES = ports.STATE_NAMES


def vector_doc(vid, optimizer, dtype, shape, hparams, *, profile="reference", steps=3, seed=0, state0=False,
               quirks=None):
    """A vector file's JSON, golden from the core: float64 values, budget 16 eps(dtype) of the largest magnitude."""
    rng = np.random.default_rng(seed)
    dt = ports.np_dtype(dtype)
    cls = refopt.SAVEUS if optimizer == "saveus" else refopt.DOPE
    opt = cls(**hparams, profile=profile, quirks=quirks)
    p = rng.standard_normal(shape).astype(dt)
    grads = [rng.standard_normal(shape).astype(dt) for _ in range(steps)]
    st = opt.init(p)
    doc0, eps = None, float(np.finfo(np.float32 if dt.itemsize < 8 else np.float64).eps)
    if state0:
        _, st = opt.step(p, rng.standard_normal(shape).astype(dt), st)
        doc0 = dict({k: encode(np.asarray(st[k])) for k in NAMES[optimizer]}, step=int(st.step))
    out = {"format": "refopt-conformance-vector", "format_version": 1, "id": vid, "name": f"test {vid}",
           "optimizer": optimizer, "profile": profile, "quirks": Quirks.for_profile(profile, quirks).as_dict(),
           "hparams": hparams_to_json(optimizer, dict(opt.hparams)), "dtype": dtype, "shape": list(shape),
           "clauses": ["S4"] if optimizer == "saveus" else ["D4"], "flags": [], "param0": encode(p),
           "state0": doc0, "tolerance": {"k": 4.0, "floor_ulps": 2.0}, "steps": []}
    for g in grads:
        p, st = opt.step(p, g, st)
        pf = np.asarray(p).astype(np.float64)
        state = {k: encode(np.asarray(st[k]).astype(np.float64)) for k in NAMES[optimizer]}
        budget = lambda x: encode(np.full(x.shape, np.max(np.abs(x), initial=0.0) * 16 * eps + 1e-30))  # noqa: E731
        out["steps"].append({"grad": encode(g), "param": encode(pf), "budget": budget(pf),
                             "state": dict(state, step=int(st.step)),
                             "state_budget": {k: budget(np.asarray(st[k]).astype(np.float64)) for k in NAMES[optimizer]}})
    return out


def write_vectors(root, docs):
    (root / "vectors").mkdir(parents=True)
    lines = []
    for doc in docs:
        raw = json.dumps(doc).encode()
        (root / "vectors" / f"{doc['id']}.json").write_bytes(raw)
        lines.append(f"{hashlib.sha256(raw).hexdigest()}  vectors/{doc['id']}.json")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return root


def rewrite(root, vid, raw: bytes, fix_sum=True):
    path = root / "vectors" / f"{vid}.json"
    path.write_bytes(raw)
    if fix_sum:
        sums = [ln for ln in (root / "SHA256SUMS").read_text().splitlines() if not ln.endswith(f"/{vid}.json")]
        sums.append(f"{hashlib.sha256(raw).hexdigest()}  vectors/{vid}.json")
        (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")




@pytest.fixture(scope="session")
def vectors_helpers():
    return types.SimpleNamespace(vector_doc=vector_doc, write_vectors=write_vectors, rewrite=rewrite)
