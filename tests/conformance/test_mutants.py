"""Self-test: every known porting mistake (refopt.conformance.mutants) is rejected by the vectors."""
from __future__ import annotations

import numpy as np
import pytest

import refopt
from refopt import cli
from refopt.conformance import diagnose, mutants, ports, runner, vectors


def _committed():
    try:
        return vectors.load()
    except vectors.VectorFileError as exc:  # pragma: no cover - only before the vectors exist
        pytest.skip(f"committed vectors unavailable: {exc}")


def test_catalogue_is_large_and_named_uniquely():
    assert len(mutants.CATALOGUE) >= 15
    assert len(mutants.BY_NAME) == len(mutants.CATALOGUE)
    assert {m.optimizer for m in mutants.CATALOGUE} == {"saveus", "dope"}


@pytest.mark.parametrize("name", [m.name for m in mutants.CATALOGUE if m.edits or m.helper_edits])
def test_each_source_edit_applies_and_keeps_the_api(name):
    m = mutants.BY_NAME[name]
    cls = mutants.mutant_class(name)
    base = refopt.SAVEUS if m.optimizer == "saveus" else refopt.DOPE
    assert issubclass(cls, base) and cls._update is not base._update
    opt = mutants.make_optimizer(name, {})
    p = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    new_p, st = opt.step(p, p[::-1] * 0.5, opt.init(p))
    assert new_p.shape == p.shape and isinstance(st, base.State)


def test_port_function_round_trips_state():
    fn = mutants.port_function("swapped_betas_d4")
    p = np.ones(4, np.float32)
    state = {"step": 0, **{k: np.zeros(4, np.float32) for k in ports.STATE_NAMES["dope"]}}
    new_p, new_state = fn("dope", p, p, state, {})
    assert new_state["step"] == 1 and new_p.dtype == np.float32
    with pytest.raises(ValueError, match="implements dope"):
        fn("saveus", p, p, state, {})


def test_self_test_detects_every_mutant(capsys):
    _committed()
    code = cli.main(["check", "--self-test"])
    out = capsys.readouterr().out
    n = len(mutants.CATALOGUE)
    assert f"self-test: {n}/{n} mutants detected" in out, out
    assert code == 0


@pytest.mark.parametrize("name", ["swapped_betas_d4", "decoupled_decay_without_bc1", "mars_previous_grad"])
def test_diagnosis_recognises_the_mistake(name):
    m = mutants.BY_NAME[name]
    target = ports.PythonPort(f"refopt.conformance.mutants:{name}", fn=mutants.port_function(name))
    vecs = [v for v in _committed() if v.optimizer == m.optimizer and runner.profile_matches(v, "reference")]
    failed = next(r for r in (runner.run_case(v, target) for v in vecs) if r.status == "failed")
    d = diagnose.diagnose(failed)
    assert any(name in label or m.clause.split(" ")[0] in label for label in d.matches), d.text()
