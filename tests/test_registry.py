"""The registry (refopt.registry) states each fact once; here it is checked against the tables of
spec/, and everything said to derive from it is checked to do so (signatures, docstrings, the
CLI's choices, the vector catalogue's defaults, the oracle's own copy)."""
from __future__ import annotations

import ast
import doctest
import inspect
import re
from pathlib import Path

import pytest

import refopt
from refopt import _docs, cli, registry
from refopt.builders import catalog, oracle
from refopt.conformance import vectors

SPEC = Path(__file__).resolve().parents[1] / "spec"


def table(path: Path, header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``header_start``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def _code(text: str) -> str:
    return text.strip().strip("`")


@pytest.mark.parametrize("facts", registry.OPTIMIZERS.values(), ids=lambda f: f.key)
def test_hyperparameter_table_is_the_spec_table(facts):
    rows = table(SPEC / facts.spec_file, "| name | symbol | default |")
    assert [_code(r[0]) for r in rows] == [h.name for h in facts.hparams]
    for row, h in zip(rows, facts.hparams):
        name, symbol, default, valid = row[:4]
        assert symbol == h.symbol, h.name
        assert valid == h.valid, h.name
        if h.default is registry.clip_lambda_default:
            assert default == r"$t \mapsto t^{0.25}$", default
        else:
            assert ast.literal_eval(_code(default)) == h.default, (h.name, default)


@pytest.mark.parametrize("facts", registry.OPTIMIZERS.values(), ids=lambda f: f.key)
def test_state_table_is_the_spec_table(facts):
    rows = table(SPEC / facts.spec_file, "| name | dtype | shape |")
    assert tuple(_code(r[0]) for r in rows) == facts.state


def test_clause_index_is_the_spec_index():
    rows = table(SPEC / "README.md", "| id | title | anchor |")
    assert [r[0] for r in rows] == list(registry.CLAUSE_IDS)
    for cid, title, anchor in rows:
        c = registry.CLAUSES[cid]
        assert title == c.title, cid
        assert anchor == f"[{c.file}#{cid.lower()}]({c.file}#{cid.lower()})"
        # the anchor exists in its file
        assert f'<a id="{cid.lower()}"></a>' in (SPEC / c.file).read_text(encoding="utf-8"), cid


def test_quirk_register_is_the_spec_register():
    rows = table(SPEC / "quirks.md", "| id | name (refopt) |")
    assert [r[0] for r in rows] == [q.id for q in registry.QUIRKS.values()]
    for (qid, name, clauses, ref, doc, optimizer), q in zip(rows, registry.QUIRKS.values()):
        assert _code(name) == q.name
        assert (ref, doc) == ("on" if q.reference else "off", "on" if q.documented else "off"), qid
        assert set(re.findall(r"[ASD]\d+", clauses)) == set(q.clauses), qid
        assert {"both": {"saveus", "dope"}, "DOPE": {"dope"}}[optimizer] == set(q.optimizers), qid


@pytest.mark.parametrize("cls", [refopt.SAVEUS, refopt.DOPE])
def test_signature_and_defaults_come_from_the_registry(cls):
    params = inspect.signature(cls).parameters
    hp = [p for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in hp] == [h.name for h in cls.facts.hparams]
    assert [p.default for p in hp] == [h.default for h in cls.facts.hparams]
    assert cls().hparams == cls.facts.defaults
    assert cls(*(h.default for h in cls.facts.hparams)).hparams == cls.facts.defaults


def _args_rows(doc: str):
    block = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.startswith("    ") and not ln.startswith("     ")]


def _documented_objects():
    out = [(refopt.SAVEUS, registry.SAVEUS), (refopt.DOPE, registry.DOPE)]
    try:
        import refopt.torch as rt

        out += [(rt.SAVEUS, registry.SAVEUS), (rt.DOPE, registry.DOPE)]
    except ImportError:  # pragma: no cover - torch is optional
        pass
    try:
        import refopt.optax as ro

        out += [(ro.saveus, registry.SAVEUS), (ro.dope, registry.DOPE)]
    except ImportError:  # pragma: no cover - jax is optional
        pass
    return out


@pytest.mark.parametrize("obj,facts", _documented_objects(), ids=lambda x: getattr(x, "__module__", "") + "."
                         + getattr(x, "__name__", "") if callable(x) else "")
def test_docstrings_list_every_hyperparameter_with_symbol_default_and_clauses(obj, facts):
    rows = _args_rows(obj.__doc__)
    spec_rows = table(SPEC / facts.spec_file, "| name | symbol | default |")
    for (name, symbol, *_), h in zip(spec_rows, facts.hparams):
        line = next(r for r in rows if r.startswith(f"{_code(name)} ("))
        sym = _docs.plain_symbol(symbol)
        assert (f"({sym}, default " in line) if symbol != "—" else ("(default " in line), line
        assert f"default {_docs.default_text(h)})" in line, line
        assert line.endswith(f"[{', '.join(h.clauses)}]"), line
    text = obj.__doc__
    assert f"Update (spec/{facts.spec_file}" in text
    for cid in facts.clauses:
        assert re.search(rf"^\s+{cid}\s+\w+: ", text, re.M), cid


@pytest.mark.parametrize("cls", [refopt.SAVEUS, refopt.DOPE])
def test_update_table_covers_every_clause_in_order(cls):
    ids = [cid for cid, _ in cls.UPDATE]
    assert list(dict.fromkeys(ids)) == list(cls.facts.clauses)
    for cid, fn in cls.UPDATE:
        assert f"{cid}" in inspect.getdoc(fn).split("\n\n")[0] or fn.__name__ in ("count_step",), fn


@pytest.mark.parametrize("cls", [refopt.SAVEUS, refopt.DOPE])
def test_docstring_example_runs(cls):
    parser = doctest.DocTestParser()
    test = parser.get_doctest(cls.__doc__, {}, cls.__name__, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 5


def test_derived_tables_agree():
    assert cli.OPTIMIZERS == tuple(registry.OPTIMIZERS) and cli.DTYPES == registry.DTYPES
    assert cli.PROFILES == registry.PROFILES
    from_json = vectors.hparams_from_json("saveus", catalog.SAVEUS_DEFAULTS)
    assert from_json.pop("clip_lambda")(16.0) == 2.0
    assert from_json == {k: v for k, v in registry.SAVEUS.defaults.items() if k != "clip_lambda"}
    assert vectors.hparams_from_json("dope", catalog.DOPE_DEFAULTS)["betas"] == registry.DOPE.defaults["betas"]
    assert refopt.Quirks.names() == registry.QUIRK_NAMES
    assert refopt.SAVEUSState._fields == registry.SAVEUS.state and refopt.DOPEState._fields == registry.DOPE.state


def test_the_oracle_keeps_its_own_copy_and_it_agrees():
    """refopt.builders.oracle is independent on purpose (written from the spec, not from the
    registry); its copy of the facts must agree with the registry's."""
    imports = [n for n in ast.walk(ast.parse(inspect.getsource(oracle))) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("refopt")) for n in imports)
    assert not any(a.name.startswith("refopt") for n in imports if isinstance(n, ast.Import) for a in n.names)
    for facts, defaults in ((registry.SAVEUS, oracle.SAVEUS_DEFAULTS), (registry.DOPE, oracle.DOPE_DEFAULTS)):
        assert list(defaults) == [h.name for h in facts.hparams]
        for h in facts.hparams:
            if h.name == "clip_lambda":
                assert defaults[h.name](16.0) == h.default(16.0) == 2.0
            else:
                assert defaults[h.name] == h.default, h.name
        assert oracle.STATE_NAMES[facts.key] == facts.buffers
    assert oracle.QUIRKS == registry.QUIRK_NAMES
    assert oracle.REFERENCE == {n: q.reference for n, q in registry.QUIRKS.items()}
    assert oracle.DOCUMENTED == {n: q.documented for n, q in registry.QUIRKS.items()}


def test_every_spec_file_states_the_version_the_code_implements():
    version = refopt.SPEC_VERSION
    for path in sorted(SPEC.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        if path.name == "CHANGELOG.md":
            assert f"## {version} " in text
        elif path.name == "README.md":
            assert f"**Version {version}**" in text
        elif path.name == "errors.md":
            assert f"specification {version}" in text
        else:
            assert f"Specification version {version}." in text, path.name
    assert all(v.spec_version == version for v in vectors.load()) if hasattr(vectors.Vector, "spec_version") \
        else True
