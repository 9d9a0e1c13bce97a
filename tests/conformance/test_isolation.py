"""Ports run in their own process (issue 10.1): nothing a port does gives a false pass or ends the
run. Also the protocol from the runner's side, with ports that speak it themselves (exec:)."""
from __future__ import annotations

import json
import pathlib
import shlex
import sys

import pytest

from refopt import cli
from refopt.conformance import ports, process, protocol, runner
from refopt.conformance.vectors import load

HERE = pathlib.Path(__file__).parent
EXAMPLES = HERE / "port_examples.py"
EXEC = shlex.join([sys.executable, str(HERE / "exec_port.py")])


@pytest.fixture(scope="module")
def vdir(tmp_path_factory, vectors_helpers):
    doc = vectors_helpers.vector_doc
    docs = [doc("d-f64", "dope", "float64", (4, 3), {}), doc("s-f64", "saveus", "float64", (4, 3), {}),
            doc("s-f32", "saveus", "float32", (5,), {}, state0=True)]
    return vectors_helpers.write_vectors(tmp_path_factory.mktemp("iso"), docs)


def check(capsys, vdir, port, *more):
    code = cli.main(["check", "--vectors", str(vdir), "--port", port, "--no-diagnose", *more])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("body, words", [
    ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    ("import os\nos._exit(0)\n", "exited with status 0 before its hello message"),
    pytest.param("raise KeyboardInterrupt\n", "raised KeyboardInterrupt", marks=pytest.mark.slow),
])
def test_a_port_that_exits_while_imported_is_exit_2(vdir, capsys, tmp_path, body, words):
    (tmp_path / "leaving.py").write_text(body + "def step(o, p, g, s, h):\n    return p, s\n")
    code, out, err = check(capsys, vdir, f"python:{tmp_path / 'leaving.py'}:step")
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out == ""


@pytest.mark.parametrize("fn, words", [
    ("exits_in_step", "called sys.exit(0)"),
    pytest.param("hard_exits_in_step", "the port exited with status 0 while running this case",
                 marks=pytest.mark.slow),
    ("crashes_in_step", "was killed by signal SIGSEGV"),
])
def test_a_port_that_dies_in_a_step_fails_that_vector_only(vdir, capsys, tmp_path, fn, words):
    rep = tmp_path / "r.json"
    code, out, _ = check(capsys, vdir, f"python:{EXAMPLES}:{fn}", "--report", str(rep))
    assert code == 1 and words in out
    report = json.loads(rep.read_text())  # the report is written, and the DOPE vector passed
    assert report["totals"] == {"passed": 1, "failed": 2, "skipped": 0}


def test_a_hanging_port_is_ended_at_the_time_limit(vdir, capsys):
    code, out, _ = check(capsys, vdir, f"python:{EXAMPLES}:hangs_in_step", "--timeout", "1", "--ids", "d-f64,s-f64")
    assert code == 1 and "no answer within 1 s (--timeout)" in out and "1 passed, 1 failed" in out


def test_output_floods_are_drained_and_harmless(vdir, capsys):
    code, out, _ = check(capsys, vdir, f"python:{EXAMPLES}:floods_output")
    assert code == 0 and "3 passed" in out


@pytest.mark.slow
def test_a_process_that_keeps_dying_is_not_restarted_forever(vdir, monkeypatch):
    monkeypatch.setattr(process, "MAX_DEATHS", 1)
    target = ports.make_port(f"python:{EXAMPLES}:hard_exits_in_step")
    try:
        results = [runner.run_case(v, target) for v in load(vdir, optimizer="saveus")]
    finally:
        target.close()
    assert "exited with status 0" in results[0].message
    assert results[1].status == "failed" and "died during the last 1 cases" in results[1].message


# -- the protocol, from ports that speak it themselves --------------------------------------------

def test_exec_port_passes_and_reuses_one_process(vdir, capsys):
    code, out, _ = check(capsys, vdir, f"exec:{EXEC}", "-v")
    assert code == 0 and out.count("PASSED") == 3
    target = ports.make_port(f"exec:{EXEC}")
    try:
        first = target.transport.proc.pid
        for v in load(vdir):
            assert runner.run_case(v, target).status == "passed"
        assert target.transport.proc.pid == first
    finally:
        target.close()


@pytest.mark.parametrize("mode, words", [
    ("exit-before-hello", "exited with status 3 before its hello message; last line on its standard error: "
                          "'no licence for this port'"),
    pytest.param("garbage-hello", "not a protocol message: 'Hello, world!'", marks=pytest.mark.slow),
    ("bad-version", "protocol version 99 is not one this runner speaks"),
])
def test_a_port_without_a_valid_hello_is_exit_2(vdir, capsys, mode, words):
    code, _, err = check(capsys, vdir, f"exec:{EXEC} --mode {mode}")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("mode, status, words", [
    ("garbage-step", "failed", "protocol error: a line that is not a protocol message: 'DEBUG: step done'"),
    pytest.param("wrong-index", "failed", "step message 1: index must be 1, got 2", marks=pytest.mark.slow),
    ("error", "failed", "cannot do that"),
    ("skip", "skipped", "not today"),
])
def test_protocol_answers_and_violations(vdir, mode, status, words):
    target = ports.make_port(f"exec:{EXEC} --mode {mode}")
    try:
        results = [runner.run_case(v, target) for v in load(vdir, ids=["d-f64", "s-f32"])]
    finally:
        target.close()
    assert all(r.status == status and words in r.message for r in results), [r.message for r in results]


def test_a_line_over_the_limit_ends_the_port(vdir, monkeypatch):
    monkeypatch.setattr(protocol, "MIN_LINE_LIMIT", 1 << 20)
    monkeypatch.setattr(protocol, "LINE_LIMIT_FACTOR", 1)
    target = ports.make_port(f"exec:{EXEC} --mode long-line")
    try:
        r = runner.run_case(load(vdir, ids="d-f64")[0], target)
    finally:
        target.close()
    assert r.status == "failed" and "a line longer than 1048576 bytes" in r.message


def test_exec_command_that_cannot_start(vdir, capsys):
    code, _, err = check(capsys, vdir, "exec:/no/such/program --flag")
    assert code == 2 and "cannot start '/no/such/program'" in err
    code, _, err = check(capsys, vdir, "exec:")
    assert code == 2 and "expected exec:COMMAND" in err


def test_messages_round_trip():
    import numpy as np

    case = protocol.Case("x", "dope", "reference", {"aliased_lerp": True}, {"lr": 0.1, "betas": [0.9, 0.99]},
                         "float32", (2,), np.ones(2, np.float32), None, [np.zeros(2, np.float32)])
    back = protocol.read_case(protocol.loads(protocol.dumps(protocol.case_message(case))))
    assert back.hparams == case.hparams and back.param.flags.writeable and back.grads[0].dtype == np.float32
    result = protocol.StepResult(np.ones(2, np.float64), {"fim": np.zeros(2, np.float32)}, 1, ("n",), ())
    step = protocol.read_step(protocol.loads(protocol.dumps(protocol.step_message(1, result))), 1, case)
    assert step.step == 1 and step.param.dtype == np.float64 and step.notes == ("n",)
    with pytest.raises(protocol.ProtocolError, match="nested too deeply"):
        protocol.loads(b"[" * 100_000)
