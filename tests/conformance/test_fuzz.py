"""`refopt check --fuzz`: random cases judged by budgets computed on the fly. A correct port never
fails (no false alarms, in any dtype); a port wrong only for a combination no vector file has is
caught, shrunk, and written as a vector file that `refopt check --vectors` replays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refopt import cli
from refopt.conformance import fuzz, load, ports, runner, vectors

HERE = Path(__file__).resolve().parent
FLOOR_PORT = f"python:{HERE / 'fuzz_ports.py'}:floor_only_without_clip"


def run_cli(capsys, *argv):
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # the no-false-alarm sweep below, in short
def test_correct_cores_pass_a_short_fuzz(tmp_path):
    from refopt.conformance import backends

    targets = [backends.CoreTarget(backends.numpy_backend()), backends.CoreTarget(backends.torch_backend("cpu"))]
    outcome = fuzz.run(targets, examples=5, seed=3, out=tmp_path)
    assert outcome.examples >= 3 and outcome.failure is None and not list(tmp_path.iterdir())


def test_the_floor_in_the_no_clip_branch_passes_every_vector_file(capsys):
    # the static vectors never set eps_floor with clip > 0: the mistake is invisible to them
    code, out, _ = run_cli(capsys, "--port", FLOOR_PORT, "--optimizer", "dope", "--in-process", "-q",
                           "--no-diagnose")
    assert code == 0, out


def test_fuzz_catches_it_and_writes_a_replayable_vector(capsys, tmp_path):
    out_dir = tmp_path / "found"
    code, out, _ = run_cli(capsys, "--port", FLOOR_PORT, "--optimizer", "dope", "--fuzz", "40", "--seed", "1",
                           "--fuzz-out", str(out_dir))
    assert code == 1 and "a failure, shrunk and written to" in out
    written = load(out_dir)
    assert len(written) == 1
    v = written[0]
    assert "Fuzz" in v.flags and v.hparams["eps_floor"] is not None and v.hparams["clip"] > 0
    assert "eps-floor-ignored" in out  # the diagnosis names the mistake it looks like
    # replayed from the file: the same failure; refopt's own core passes it
    code, out, _ = run_cli(capsys, "--port", FLOOR_PORT, "--vectors", str(out_dir), "-q")
    assert code == 1
    code, out, _ = run_cli(capsys, "--vectors", str(out_dir), "--backend", "numpy", "-q")
    assert code == 0, out


def test_a_fuzz_vector_is_a_standard_file_and_excludes_unstable_elements():
    # a float16 case at DOPE's defaults overflows: those elements are not judged, the rest are
    draw = dict(optimizer="dope", dtype="float16", shape=(3, 5), hparams={}, profile="reference", quirks={},
                steps=2, warm=0, start_step=0, family="normal", scale=0, seed=5)
    from refopt.builders import catalog

    draw["hparams"] = dict(catalog.DOPE_DEFAULTS, eps=0.0)
    try:
        vector, doc = fuzz.build(draw)
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "NothingToJudge"
        return
    assert doc["format_version"] in (1, 2)
    if vector.judged is not None:
        assert 0 < vector.judged.size < 15
    target = ports.in_process("core", lambda o, p, g, s, h: _core_step(o, p, g, s, h))
    assert runner.run_case(vector, target).status == "passed"


def _core_step(optimizer, param, grad, state, hparams):
    import refopt

    opt = (refopt.DOPE if optimizer == "dope" else refopt.SAVEUS)(**vectors.hparams_from_json(optimizer, hparams))
    st = opt.State(step=np.asarray(state["step"]), **{k: state[k] for k in opt.State._fields[1:]})
    with np.errstate(all="ignore"):
        p, new = opt.step(param, grad, st)
    return p, dict(new.items(), step=int(new.step))


def test_fuzz_options_are_checked(capsys):
    code, _, err = run_cli(capsys, "--fuzz", "0")
    assert code == 2 and "positive integer" in err
    code, _, err = run_cli(capsys, "--fuzz", "3", "--ids", "x")
    assert code == 2 and "cannot be combined" in err


def test_fuzz_time_limit_stops_drawing(tmp_path):
    from refopt.conformance import backends

    outcome = fuzz.run([backends.CoreTarget(backends.numpy_backend())], examples=10_000, seed=0,
                       seconds=0.5, out=tmp_path)
    assert outcome.stopped_by_time and outcome.examples < 10_000 and outcome.failure is None


@pytest.mark.slow
@pytest.mark.parametrize("port", [None, "torch:refopt.torch:DOPE", "torch:refopt.torch:SAVEUS",
                                  "optax:refopt.optax:dope", "optax:refopt.optax:saveus"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_no_false_alarm_on_refopt_itself_in_any_dtype(capsys, tmp_path, port, dtype):
    argv = (["--port", port] if port else ["--backend", "numpy", "--backend", "torch-cpu"])
    code, out, _ = run_cli(capsys, *argv, "--dtype", dtype, "--fuzz", "40", "--seed", "1",
                           "--fuzz-out", str(tmp_path))
    assert code == 0, out


def test_report_records_the_fuzz_run(capsys, tmp_path):
    rep = tmp_path / "r.json"
    code, _, _ = run_cli(capsys, "--backend", "numpy", "--fuzz", "3", "--seed", "2", "--report", str(rep),
                         "--fuzz-out", str(tmp_path / "none"))
    data = json.loads(rep.read_text())
    assert code == 0 and data["fuzz"]["seed"] == 2 and data["fuzz"]["written"] is None
