"""(e) under jax.jit the step is traced once and then reused for every later step."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")


@pytest.mark.parametrize("name", ["saveus", "dope"])
def test_step_does_not_retrace(core, name):
    opt = core.OPTIMIZERS[name]()
    traces = []

    def step(p, g, s):
        traces.append(1)  # runs only while tracing
        return opt.step(p, g, s)

    fn = jax.jit(step)
    p0, grads = core.problem((3, 5), 5, seed=7)
    p = jax.numpy.asarray(p0)
    s = opt.init(p)
    for g in grads:
        p, s = fn(p, jax.numpy.asarray(g), s)
    assert len(traces) == 1
    assert int(s.step) == 5
    want = core.run(core.numpy, opt, p0, grads)[-1][0]
    assert core.scaled_error(np.asarray(p), want) <= 1e-12
