"""(c) every backend follows the original code's trajectories (<repo>/../shared/reference).

Each recorded run is replayed from its start parameter with its gradients (given in the run's
dtype). Bound, relative to the largest finite |value| of the recorded parameter at each step:
1e-12 in float64, 2e-4 in float32 and bfloat16 (semantics.md: DOPE float32 differs from float64
by ~2.8e-5, and the recorded float32 run used PyTorch's reduction order, not ours). The oracle
(float64 only) must follow them too. NaN exactly where the recording has NaN.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from refopt.builders.oracle import trajectory

BOUND = {"float64": 1e-12, "float32": 2e-4, "bfloat16": 2e-4}
#: jax.jit compiles each recording's optimizer afresh (~1 s each on 2 cores): it replays one
#: recording per optimizer and dtype; the other backends replay them all.
JIT_SUBSET = {"saveus_default_3x5_f64", "saveus_default_3x5_bf16", "saveus_conv_2x2x3x3_f32",
              "dope_default_3x5_f64", "dope_conv_2x2x3x3_f32", "dope_scalar_f64"}


@pytest.fixture(scope="module")
def recordings(request):
    shared = request.getfixturevalue("shared_dir")
    root = shared / "reference" / "trajectories"
    manifest = json.loads((root / "manifest.json").read_text())
    return {name: (meta, dict(np.load(root / f"{name}.npz"))) for name, meta in manifest.items()}



def test_backend_follows_trajectories(xp, core, recordings):
    ran = 0
    for name, (meta, rec) in sorted(recordings.items()):
        dtype = meta["dtype"]
        if dtype not in xp.dtypes or (xp.jit and name not in JIT_SUBSET):
            continue
        opt = core.OPTIMIZERS[meta["optimizer"].lower()](**meta["hparams"])
        got = core.run(xp, opt, rec["params"][0], list(rec["grads"][: meta["steps"]]), dtype)
        for k, (p, _) in enumerate(got):
            err = core.scaled_error(p, rec["params"][k + 1])
            assert err <= BOUND[dtype], f"{name} step {k + 1}: {err:.3e}"
        state = got[-1][1]
        assert int(state["step"]) == int(rec["state_step"])
        for key in state:
            if key != "step":
                assert core.scaled_error(state[key], rec[f"state_{key}"]) <= BOUND[dtype] * 1e3, (name, key)
        ran += 1
    assert ran, "no recording in a dtype this backend supports"


def test_oracle_follows_trajectories(recordings, core):
    for name, (meta, rec) in sorted(recordings.items()):
        if meta["dtype"] != "float64":
            continue
        steps = trajectory(meta["optimizer"].lower(), rec["params"][0], list(rec["grads"]), meta["hparams"])
        for k, out in enumerate(steps):
            assert core.scaled_error(out["param"], rec["params"][k + 1]) <= 1e-15, (name, k + 1)
        for key, value in steps[-1]["state"].items():
            if key != "step":
                assert core.scaled_error(value, rec[f"state_{key}"]) <= 1e-12, (name, key)
