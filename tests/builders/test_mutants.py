"""The mistake catalogue (refopt.builders.mutants): every clause and quirk has a mutant, every
mutant is rejected by the committed vectors (in float64 and float32 at least, where the mistake can
show there), mutants replace functions rather than text, and the diagnosis names the mistake."""
from __future__ import annotations

import ast
import pathlib
import sys
import types
import warnings

import numpy as np
import pytest

import refopt
from refopt import cli, registry
from refopt.builders import mutants
from refopt.conformance import diagnose, judge, load, ports, runner, vectors
from refopt.conformance.encoding import np_dtype


@pytest.fixture(scope="module")
def committed():
    try:
        # the Scale vectors last: most mistakes are caught before them, and they take longest
        return tuple(sorted(vectors.load(), key=lambda v: "Scale" in v.flags))
    except vectors.VectorFileError as exc:  # pragma: no cover - only before the vectors exist
        pytest.skip(f"committed vectors unavailable: {exc}")


def kills(opt, vec) -> bool:
    """True when ``opt`` (NumPy, the vector's dtype) fails ``vec``: the parameter or the state
    (step count included) at some step."""
    dt = np_dtype(vec.dtype)
    p = np.asarray(vec.param0, dtype=dt)
    st = opt.init(p) if vec.state0 is None else opt.State(
        **{k: np.asarray(v, dtype=np.int64 if k == "step" else dt) for k, v in vec.state0.items()})
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for i, s in enumerate(vec.steps):
            try:
                p, st = opt.step(p, np.asarray(s.grad, dtype=dt), st)
            except ValueError:  # e.g. a wrapped step count the next step refuses: a port that raises fails
                return True
            if not judge(vec, i, p).passed or not all(judge(vec, i, x, what=w).passed for w, x in st.items()):
                return True
    return False


def test_catalogue_covers_every_clause_and_quirk():
    assert {i for m in mutants.CATALOGUE for i in m.breaks} == set(registry.CLAUSE_IDS)
    assert len(mutants.BY_NAME) == len(mutants.CATALOGUE)
    assert {m.optimizer for m in mutants.CATALOGUE} == set(registry.OPTIMIZERS)


@pytest.mark.parametrize("name", list(mutants.BY_NAME))
def test_vectors_reject_each_single_mistake(committed, name):
    m = mutants.BY_NAME[name]
    killed, seen = set(), set()
    must = set(m.only or ("float64", "float32"))
    for vec in committed:
        if vec.optimizer != m.optimizer or (m.only and vec.dtype not in m.only):
            continue
        seen.add(vec.dtype)
        if "Scale" in vec.flags and vec.dtype not in must:
            continue  # the Scale vectors (the slowest) only in the dtypes a mistake must show in
        if vec.dtype not in killed:
            opt = mutants.make_optimizer(name, vec.optimizer_hparams(), dict(vec.quirks), vec.profile)
            if kills(opt, vec):
                killed.add(vec.dtype)
    assert killed, f"{name}: no vector rejects it"
    want = set(m.only or ("float64", "float32")) & seen
    assert want <= killed, f"{name}: survives in {sorted(want - killed)}"


@pytest.mark.parametrize("name", [m.name for m in mutants.CATALOGUE if m.replaces])
def test_each_mutant_replaces_functions_and_keeps_the_api(name):
    m = mutants.BY_NAME[name]
    cls = mutants.mutant_class(name)
    base = mutants.CORE_CLASSES[m.optimizer]
    assert issubclass(cls, base) and cls._update is not base._update
    opt = mutants.make_optimizer(name, {})
    p = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    new_p, st = opt.step(p, p[::-1] * 0.5, opt.init(p))
    assert new_p.shape == p.shape and isinstance(st, base.State)


def test_a_mutant_does_not_touch_the_core():
    p = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    before = refopt.DOPE().step(p, p[::-1], refopt.DOPE().init(p))[0]
    mutants.make_optimizer("fisher-betas-swapped", {}).step(p, p[::-1], refopt.DOPE().init(p))
    np.testing.assert_array_equal(refopt.DOPE().step(p, p[::-1], refopt.DOPE().init(p))[0], before)


def test_a_renamed_clause_fails_loudly():
    with pytest.raises(RuntimeError, match="no core function named 'no_such_clause'"):
        mutants.relinked(refopt.DOPE, {"no_such_clause": lambda: None})


def _reformatted(module) -> types.ModuleType:
    """``module`` rebuilt from its source after ast.unparse: other layout, same program."""
    original = pathlib.Path(module.__file__).read_text()  # not the loader's get_source: pytest's
    source = ast.unparse(ast.parse(original))  # assertion-rewriting hook may be the loader, and has none
    assert source != original
    new = types.ModuleType(module.__name__)
    new.__package__ = "refopt"
    exec(compile(source, f"<reformatted {module.__name__}>", "exec"), new.__dict__)  # noqa: S102
    return new


def test_reformatting_the_core_cannot_disarm_a_mutant(committed):
    """Mutants name functions, not text: against a reformatted copy of the core they still differ
    from it and are rejected by the same vector as against the real core."""
    modules = tuple(_reformatted(m) for m in mutants.CORE_MODULES)
    for name in ("fisher-betas-swapped", "cautious-mask-ge-zero", "decay-after-update", "nan-grad-zeroed-dope",
                 "float16-rounded-as-bfloat16-saveus", "switch-positive-saveus"):
        m = mutants.BY_NAME[name]
        vec = next(v for v in committed if v.optimizer == m.optimizer and kills(
            mutants.make_optimizer(name, v.optimizer_hparams(), dict(v.quirks), v.profile), v))
        cls = mutants.mutant_class(name, modules)
        core = cls.__mro__[1]
        assert core.__module__ == f"refopt.{m.optimizer}" and core is not mutants.CORE_CLASSES[m.optimizer]
        assert kills(cls(**vec.optimizer_hparams(), profile=vec.profile, quirks=dict(vec.quirks)), vec), name
        assert not kills(core(**vec.optimizer_hparams(), profile=vec.profile, quirks=dict(vec.quirks)), vec)


def test_port_function_round_trips_state():
    fn = mutants.port_function("fisher-betas-swapped")
    p = np.ones(4, np.float32)
    state = {"step": 0, **{k: np.zeros(4, np.float32) for k in registry.DOPE.buffers}}
    new_p, new_state = fn("dope", p, p, state, {})
    assert new_state["step"] == 1 and new_p.dtype == np.float32
    with pytest.raises(ValueError, match="implements dope"):
        fn("saveus", p, p, state, {})


@pytest.mark.slow  # the CLI path; test_vectors_reject_each_single_mistake covers detection
def test_self_test_detects_every_mutant(capsys):
    code = cli.main(["check", "--self-test"])
    out = capsys.readouterr().out
    n = len(mutants.CATALOGUE)
    assert f"self-test: {n}/{n} mutants detected" in out, out
    assert code == 0


@pytest.mark.parametrize("name", ["fisher-betas-swapped", "decoupled-decay-without-bc1", "mars-previous-grad"])
def test_diagnosis_recognises_the_mistake(committed, name):
    m = mutants.BY_NAME[name]
    target = ports.PythonPort(f"refopt.builders.mutants:{name}", fn=mutants.port_function(name))
    vecs = [v for v in committed if v.optimizer == m.optimizer and runner.profile_matches(v, "reference")]
    failed = next(r for r in (runner.run_case(v, target) for v in vecs) if r.status == "failed")
    d = diagnose.diagnose(failed)
    assert any(name in label or m.breaks[0] in label for label in d.matches), d.text()
