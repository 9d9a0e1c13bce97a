"""What the runner checks in a port's answers (issue 10.2-10.4): step counts, untouched inputs,
state names, return kinds, wider dtypes, in-place ports, partial verdicts for constructors that lack
a hyperparameter, declared quirks, ports named by file, grouped failures."""
from __future__ import annotations

import json
import pathlib
import shlex
import sys
import textwrap

import pytest

from refopt import cli
from refopt.conformance import ports, runner
from refopt.conformance.vectors import load

HERE = pathlib.Path(__file__).parent
EXAMPLES = HERE / "port_examples.py"


@pytest.fixture(scope="module")
def vdir(tmp_path_factory, vectors_helpers):
    doc = vectors_helpers.vector_doc
    docs = [doc("d-f64", "dope", "float64", (4, 3), {}), doc("d-f32", "dope", "float32", (5,), {}, state0=True),
            doc("s-f64", "saveus", "float64", (4, 3), {"weight_decay": 0.1}),
            doc("s-f32", "saveus", "float32", (6,), {"clip_gradients": True}, state0=True),
            doc("s-lerp", "saveus", "float64", (3, 4), {}, quirks={"aliased_lerp": False}),
            doc("d-doc", "dope", "float64", (3, 4), {}, profile="documented")]
    return vectors_helpers.write_vectors(tmp_path_factory.mktemp("checks"), docs)


@pytest.fixture(scope="module")
def examples_port():
    """One worker serving every example function would need one per function: the runner's
    in-process adapters check the same things, so most tests use them (the worker is tested in
    test_isolation.py)."""
    module = ports.adapters.load_object(f"{EXAMPLES}:good_port", "python").__globals__
    return lambda name, **kw: ports.PythonPort(f"{EXAMPLES}:{name}", fn=module[name], **kw)


def run(vdir, target, **select):
    return {r.vector.id: r for r in (runner.run_case(v, target) for v in load(vdir, **select))
            if target.selects(r.vector)}


def check(capsys, *argv):
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 10.2: everything the spec requires ----------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("step_liar", "step 100"),
    ("stepless_port", "the port reports no step count"),
    ("renamed_state_port", "the port's state has no 'ema_squared' (the state of SAVEUS is step, ema, ema_squared"),
    ("inplace_port", "the port wrote into its input param (spec conformance rule 2"),
    ("grad_scribbler", "the port wrote into its input grad"),
    ("tuple_returner", "returned a list of length 1; expected a pair (new_param, new_state)"),
    ("state_list_port", "returned a new_state of type list; expected a dict, a mapping or a NamedTuple"),
    ("string_param_port", "returned param as a str, not an array"),
])
def test_a_port_that_breaks_a_rule_never_passes(vdir, examples_port, name, words):
    results = run(vdir, examples_port(name), optimizer="saveus", profile="reference")
    bad = [r for r in results.values() if r.status != "failed" or words not in r.message]
    assert not bad, [(r.vector.id, r.status, r.message) for r in bad]


def test_in_place_port_passes_when_declared(vdir, examples_port, capsys):
    for r in run(vdir, examples_port("inplace_port", in_place=True)).values():
        assert r.status == "passed", r.message
    for r in run(vdir, examples_port("grad_scribbler", in_place=True)).values():
        assert r.status == "passed" and "wrote into its input grad" in r.notes[0]
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", f"python:{EXAMPLES}:inplace_port", "--in-place")
    assert code == 0 and "4 passed, 0 failed" in out
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", f"python:{EXAMPLES}:inplace_port", "--no-diagnose",
                         "--in-process")
    assert code == 1 and "fault: step 1: the port wrote into its input param" in out


@pytest.mark.parametrize("name", ["namedtuple_port", "wide_port", "configurable_port"])
def test_correct_ports_in_other_forms_pass(vdir, examples_port, name):
    results = run(vdir, examples_port(name))
    assert results and all(r.status == "passed" for r in results.values()), \
        [(r.vector.id, r.message) for r in results.values()]
    assert ("d-doc" in results) == (name == "configurable_port")  # it takes each vector's own quirks


def test_a_wider_dtype_must_hold_exact_values(vdir):
    import numpy as np

    def inexact(optimizer, param, grad, state, hparams):
        p, s = ports.adapters.load_object(f"{EXAMPLES}:good_port", "python")(optimizer, param, grad, state, hparams)
        return p.astype(np.float64) + 1e-12, s

    r = runner.run_case(load(vdir, ids="d-f32")[0], ports.PythonPort("t:inexact", fn=inexact))
    assert r.status == "failed" and "returned param in float64 with values that are not exact in float32" in r.message


def test_torch_port_writing_into_grad_gets_a_note(vdir):
    torch = pytest.importorskip("torch")
    import refopt.torch

    class Scribbler(refopt.torch.DOPE):
        def step(self, closure=None):
            super().step(closure)
            for p in self.param_groups[0]["params"]:
                p.grad.mul_(2)

    target = ports.TorchPort("t:ScribblerDOPE", cls=Scribbler)
    for r in run(vdir, target, optimizer="dope").values():
        assert r.status == "passed" and "wrote into p.grad (the public code does" in r.notes[0]
    del torch


# -- 10.4: real ports without glue ---------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vdir(tmp_path_factory, vectors_helpers):
    """What a port of the other public SAVEUS can be checked on: decoupled decay without clipping,
    the default clip_lambda with clip_gradients off, and a vector that needs clip_gradients."""
    doc = vectors_helpers.vector_doc
    lr = {"lr": 0.05}
    docs = [doc("s-decoupled", "saveus", "float64", (4, 3),
                dict(lr, weight_decay=0.1, decouple_weight_decay=True, clip_lambda=None)),
            doc("s-lambda-set", "saveus", "float64", (4, 3), dict(lr, weight_decay=0.0)),
            doc("s-plain", "saveus", "float64", (4, 3), dict(lr, weight_decay=0.0, clip_lambda=None)),
            doc("s-clip", "saveus", "float64", (4, 3), dict(lr, clip_gradients=True, clip_lambda=None))]
    return vectors_helpers.write_vectors(tmp_path_factory.mktemp("other"), docs)


def test_the_other_public_saveus_gets_a_partial_verdict_naming_its_differences(other_vdir, capsys, tmp_path):
    pytest.importorskip("torch")
    rep = tmp_path / "r.json"
    code, out, _ = check(capsys, "--vectors", str(other_vdir), "--port", f"torch:{HERE / 'other_saveus.py'}:SAVEUS",
                         "--hparam-map", "decouple_weight_decay=decouple", "--report", str(rep),
                         "--no-multi-tensor")  # one tensor per optimizer: the counts below are per vector
    assert code == 1
    assert "PARTIAL: torch:" in out and "takes no 'clip_gradients' (1 vector)" in out
    assert "known mistake 'decoupled-decay-without-bc1' (clause S8)" in out
    assert "known mistake 'clip-whenever-lambda-set' (clause S9)" in out
    assert "NOTE torch:" in out and "wrote into p.grad" in out
    report = json.loads(rep.read_text())
    assert report["totals"] == {"passed": 1, "failed": 2, "skipped": 1}
    assert list(report["partial"].values()) == [{"clip_gradients": 1}]
    assert {g["cause"].split("'")[1] for g in report["failure_groups"]} == {
        "decoupled-decay-without-bc1", "clip-whenever-lambda-set"}


def test_partial_verdict_exit_status_and_skip_reason(vdir, capsys):
    port = f"exec:{shlex.join([sys.executable, str(HERE / 'exec_port.py'), '--without', 'clip_gradients'])}"
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", port, "-v")
    assert code == 3, out
    assert "needs clip_gradients=true, which the port does not take" in out
    assert "PARTIAL: " in out and "takes no 'clip_gradients' (1 vector)" in out
    code, _, err = check(capsys, "--vectors", str(vdir), "--port", port, "--ids", "s-f32")
    assert code == 2 and "every selected vector needs a hyperparameter the port does not take" in err


def test_declared_quirks_select_vectors_and_reach_the_port(vdir, capsys):
    lerp = f"python:{EXAMPLES}:lerp_port"
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", lerp, "--quirks", "aliased_lerp=off", "-v",
                         "--in-process")
    assert code == 0 and out.count("PASSED") == 1 and "s-lerp" in out
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", f"python:{EXAMPLES}:configurable_port",
                         "--quirks", "aliased_lerp=off", "-v", "--in-process")
    assert code == 0 and out.count("PASSED") == 1  # a configurable port restricted to the declaration
    code, _, err = check(capsys, "--vectors", str(vdir), "--port", lerp, "--quirks", "aliased_lerp=maybe")
    assert code == 2 and "expected NAME=on|off" in err


def test_a_port_named_by_module_from_the_current_folder(vdir, capsys, tmp_path, monkeypatch):
    (tmp_path / "myport.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("examples", {str(EXAMPLES)!r})
        examples = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(examples)
        step = examples.good_port
    """))
    monkeypatch.chdir(tmp_path)
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", "myport:step")  # kind told from the function
    assert code == 0 and "4 passed" in out
    code, _, err = check(capsys, "--vectors", str(vdir), "--port", "myport:spec")
    assert code == 2 and "cannot tell what kind of port" in err


def test_identical_failures_are_grouped(vdir, capsys):
    code, out, _ = check(capsys, "--vectors", str(vdir), "--port", f"python:{EXAMPLES}:step_liar", "--no-diagnose",
                         "--in-process")
    assert code == 1 and out.count("FAILED") == 1 and "the same cause in 3 more vector(s)" in out
