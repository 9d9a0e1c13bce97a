"""Narrowing a failure no known deviation explains to the earliest clause whose output differs
(issue 10.5): one reference step from the port's own state, quantity by quantity."""
from __future__ import annotations

import numpy as np
import pytest

import refopt
from refopt import dope
from refopt.builders.mutants import relinked
from refopt.conformance import diagnose, ports, runner
from refopt.conformance.vectors import load


@pytest.fixture(scope="module")
def vdir(tmp_path_factory, vectors_helpers):
    doc = vectors_helpers.vector_doc
    docs = [doc("d", "dope", "float64", (4, 3), {"lr": 0.01, "clip": 0.0}),
            doc("s", "saveus", "float64", (4, 3), {"lr": 0.01}, state0=True)]
    return vectors_helpers.write_vectors(tmp_path_factory.mktemp("narrow"), docs)


def port(optimizer, replacements):
    """refopt's core with some clause functions replaced: a mistake of our own making."""
    cls = relinked(refopt.SAVEUS if optimizer == "saveus" else refopt.DOPE, replacements)

    def step(opt_name, param, grad, state, hparams):
        opt = cls(**hparams)
        st = opt.State(step=np.asarray(state["step"]), **{k: state[k] for k in opt.State._fields[1:]})
        p, new = opt.step(param, grad, st)
        return p, dict(new.items(), step=int(new.step))

    return ports.PythonPort(f"t:{optimizer}", fn=step)


def skip_normalization(ops, g, weight, channels, aliased_lerp):
    return g


def momentum_a_little_off(ops, exp_avg, c_t, momentum_beta, empty_axis_mean):
    return dope.momentum(ops, exp_avg, ops.mul(c_t, 1.07), momentum_beta, empty_axis_mean)


def decay_a_little_off(ops, p, denom, denom_diff, lr, weight_decay):
    return dope.preconditioned_weight_decay(ops, p, denom, denom_diff, lr, weight_decay * 3.3)


@pytest.mark.parametrize("vid, replacements, words", [
    ("d", {"normalize": skip_normalization},
     "'prev_grad' is the first quantity that differs from the reference; its processed gradient agrees with "
     "the reference's after D1 (centralization) but not after D2 (normalization): check D2"),
    ("s", {"normalize": skip_normalization},
     "'ema' is the first quantity that differs from the reference; its processed gradient agrees with the "
     "reference's after S1 (centralization) but not after S2 (normalization): check S2"),
    ("d", {"momentum": momentum_a_little_off}, "'exp_avg' is the first quantity that differs from the reference: "
                                               "check D10 (and D5-D9, which feed it)"),
    ("d", {"preconditioned_weight_decay": decay_a_little_off},
     "the parameter is the first quantity that differs from the reference: check D11-D14"),
])
def test_the_earliest_differing_clause_is_named(vdir, vid, replacements, words):
    v = load(vdir, ids=vid)[0]
    r = runner.run_case(v, port(v.optimizer, replacements))
    assert r.status == "failed"
    d = diagnose.diagnose(r)
    assert not d.matches  # no known deviation: the search falls back to the narrowing
    assert words in d.narrowed and d.verdict.startswith("no single known deviation explains it; one step")


def test_a_step_count_that_differs_is_named(vdir):
    from refopt.conformance.narrow import narrow

    honest = port("dope", {}).transport.adapter.fn

    def liar(*args):
        p, s = honest(*args)
        return p, dict(s, step=s["step"] + 5)

    v = load(vdir, ids="d")[0]
    r = runner.run_case(v, ports.PythonPort("t:liar", fn=liar))
    assert narrow(v, r.outputs, r.first_bad) == "the step count the port reports differs (D0)"
