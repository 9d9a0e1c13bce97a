"""The golden vector files: format, schema, checksums, determinism, coverage, loader errors."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import refopt
from refopt.builders import catalog, generate
from refopt.conformance import Vector, VectorFileError, default_dir, load
from refopt.conformance.encoding import decode, encode
from refopt.conformance import vectors as vectors_module
from refopt.conformance.vectors import CHECKSUMS, VECTORS_SUBDIR, hparams_to_json

ROOT = default_dir()
SUBSET = (  # regenerated bit for bit in the tests (the whole set takes ~20 s; CI runs --check)
    "saveus/default/3x5/float64", "saveus/decoupled-clip/4x6/bfloat16", "saveus/warm-single/3x5/float32",
    "dope/default/scalar/float16", "dope/nan-channel/4x1/float32", "dope/knife-zero-grad/4x6/bfloat16",
    "dope/warm/17/float64", "dope/empty/0x3/float16",
)


@pytest.fixture(scope="module")
def vectors():
    return load()


@pytest.fixture
def copy_dir(tmp_path):
    dst = tmp_path / "v1"
    shutil.copytree(ROOT, dst)
    return dst


def test_counts_cover_both_optimizers_every_dtype_and_both_profiles(vectors):
    combos = {(v.optimizer, v.dtype) for v in vectors}
    assert combos == {(o, d) for o in ("saveus", "dope") for d in catalog.DTYPES}
    assert {v.profile for v in vectors} == {"reference", "documented"}
    assert len(vectors) == len(catalog.all_cases())
    assert len({v.id for v in vectors}) == len(vectors)


@pytest.mark.slow  # jsonschema over every file; the reader checks each file's shape in every run
def test_every_file_matches_the_schema():
    schema = json.loads((ROOT / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for f in sorted((ROOT / VECTORS_SUBDIR).glob("*.json")):
        errors = list(validator.iter_errors(json.loads(f.read_bytes())))
        assert not errors, f"{f.name}: {errors[0].message} at {list(errors[0].path)}"


def test_checksum_file_lists_exactly_the_vector_files():
    listed = {}
    for line in (ROOT / CHECKSUMS).read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    files = {f"{VECTORS_SUBDIR}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
             for f in (ROOT / VECTORS_SUBDIR).glob("*.json")}
    assert listed == files


@pytest.mark.parametrize("name", SUBSET)
def test_fresh_generation_is_bit_identical(name):
    case = next(c for c in catalog.all_cases() if c.name == name)
    files = generate.generate([case])
    (path, data), = files.items()
    assert (ROOT / path).read_bytes() == data


def test_ids_are_content_hashes_and_file_names(vectors):
    for v in vectors[:: 7]:
        case = next(c for c in catalog.all_cases() if c.name == v.name)
        param0, grads, state0 = generate.inputs(case)
        assert v.id == generate.vector_id(case, param0, grads, state0) == Path(v.path).stem
        param0 = vectors_module.materialize(param0)
        assert v.param0.tobytes() == param0.tobytes() and v.param0.dtype == param0.dtype


def test_every_flag_is_explained_and_every_explanation_used(vectors):
    text = (ROOT / "FLAGS.md").read_text()
    documented = set()
    for heading in re.findall(r"^### (.+)$", text, flags=re.M):
        documented |= {h.strip() for h in heading.split("/")}
    used = {f for v in vectors for f in v.flags} | {"Fuzz"}  # Fuzz: the vectors `refopt check --fuzz` writes
    assert used <= documented, f"flags without an entry in FLAGS.md: {sorted(used - documented)}"
    assert documented <= used, f"FLAGS.md entries no vector uses: {sorted(documented - used)}"


def test_every_clause_and_quirk_is_exercised_in_every_dtype(vectors):
    every = {*(f"A{i}" for i in range(1, 7)), *(f"S{i}" for i in range(11)), *(f"D{i}" for i in range(15)),
             *(f"Q{i}" for i in range(1, 7))}
    for dtype in catalog.DTYPES:
        seen = {c for v in vectors if v.dtype == dtype for c in v.clauses}
        missing = every - seen - ({"A3"} if dtype in ("float64", "float32") else set())
        assert not missing, f"{dtype}: no vector exercises {sorted(missing)}"


def test_each_quirk_has_vectors_with_it_on_and_off(vectors):
    for q in refopt.Quirks.names():
        assert {v.quirks[q] for v in vectors} == {True, False}, q


def test_coverage_of_shapes_switches_and_situations(vectors):
    shapes = {v.shape for v in vectors}
    assert {(), (1,), (2,), (17,), (3, 5), (2, 2, 3, 3), (4, 1), (0, 3)} <= shapes
    flags = {f for v in vectors for f in v.flags}
    assert {"WarmState", "SingleStep", "IllConditioned", "KnifeEdge", "NaNChannel", "EmptyTensor",
            "DecoupledDecay", "ClipByValue", "EpsFloor", "CautiousOff", "ClipOff", "DiffMult",
            "MomentumLambda", "NegativeCentralization", "GlobalStd", "NormalizationOff"} <= flags
    assert min(len(v.steps) for v in vectors if "Trajectory" in v.flags) >= 8
    assert all(v.state0 is not None and v.state0["step"] > 0 for v in vectors if "WarmState" in v.flags)


def test_float16_dope_vectors_are_finite_where_they_should_be(vectors):
    for v in vectors:
        if v.dtype == "float16" and not {"NaNChannel", "NonFiniteGrad"} & set(v.flags):
            for s in v.steps:
                assert np.isfinite(s.param).all() and np.isfinite(s.budget).all(), v.name
                assert np.isfinite(s.param.astype(np.float16)).all(), v.name


def test_vector_api(vectors):
    v = next(v for v in vectors if v.name == "saveus/coupled-clip-power/4x6/float32")
    assert isinstance(v, Vector) and v.optimizer == "saveus" and v.shape == (4, 6)
    h = v.optimizer_hparams()
    assert h["betas"] == (0.8, 0.99) and float(h["clip_lambda"](np.float64(16.0))) == 4.0
    opt = v.make_reference()
    assert isinstance(opt, refopt.SAVEUS) and opt.clip_gradients and opt.profile == "reference"
    assert hparams_to_json("saveus", opt.hparams) == v.hparams
    assert v.param0.dtype == np.float32 and v.steps[0].grad.dtype == np.float32
    assert v.steps[0].param.dtype == np.float64 and v.steps[0].budget.shape == (4, 6)
    assert v.steps[0].state["step"] == 1 and set(v.steps[0].state_budget) == {"ema", "ema_squared"}


def test_load_filters(vectors):
    sel = load(optimizer="DOPE", dtype=("float32", "bfloat16"), profile="reference")
    assert sel and all(v.optimizer == "dope" and v.dtype in ("float32", "bfloat16") and v.profile == "reference"
                       for v in sel)
    one = load(ids=[vectors[3].id])
    assert [v.id for v in one] == [vectors[3].id]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_encoding_round_trips_bits(dtype):
    x = np.array([[0.0, -0.0, 1.5, np.inf], [np.nan, -3.25, 1e-3, 65504.0]])
    from refopt.conformance.encoding import np_dtype

    y = x.astype(np_dtype(dtype))
    back = decode(encode(y))
    assert back.dtype == y.dtype and back.shape == y.shape
    assert back.view(np.uint8).tobytes() == y.view(np.uint8).tobytes()
    assert decode(encode(np.float32(2.5).reshape(()))).shape == ()


# --- loader errors: one line each, naming the file -------------------------------------------

def _one_file(d: Path) -> Path:
    return sorted((d / VECTORS_SUBDIR).glob("*.json"))[0]


def _fix_sum(d: Path, f: Path):
    lines = [ln for ln in (d / CHECKSUMS).read_text().splitlines() if not ln.endswith(f.name)]
    lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {VECTORS_SUBDIR}/{f.name}")
    (d / CHECKSUMS).write_text("\n".join(sorted(lines, key=lambda s: s.split("  ")[1])) + "\n")


def _raises(d, match, **kw):
    with pytest.raises(VectorFileError, match=match) as info:
        load(d, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_error_missing_directory(tmp_path):
    _raises(tmp_path / "nope", "vector directory missing")


def test_error_missing_checksums(copy_dir):
    (copy_dir / CHECKSUMS).unlink()
    _raises(copy_dir, "checksum file missing")


def test_error_checksum_mismatch(copy_dir):
    f = _one_file(copy_dir)
    data = bytearray(f.read_bytes())
    i = data.index(b'"b64": "') + 9
    data[i] = ord("A") if data[i] != ord("A") else ord("B")
    f.write_bytes(bytes(data))
    msg = _raises(copy_dir, "checksum mismatch")
    assert f.name in msg


def test_error_truncated(copy_dir):
    f = _one_file(copy_dir)
    f.write_bytes(f.read_bytes()[:500])
    _fix_sum(copy_dir, f)
    _raises(copy_dir, "truncated JSON")


def test_error_not_json(copy_dir):
    f = _one_file(copy_dir)
    f.write_bytes(b"<html>not a vector</html>\n")
    _fix_sum(copy_dir, f)
    _raises(copy_dir, "not JSON")


def test_error_off_schema(copy_dir):
    f = _one_file(copy_dir)
    doc = json.loads(f.read_bytes())
    doc["steps"][0]["param"]["shape"] = [99]
    f.write_text(json.dumps(doc))
    _fix_sum(copy_dir, f)
    _raises(copy_dir, "off-schema")


def test_error_unlisted_and_missing_files(copy_dir):
    f = _one_file(copy_dir)
    shutil.copy(f, f.with_name("dope-000000000000.json"))
    _raises(copy_dir, "not listed")
    f.with_name("dope-000000000000.json").unlink()
    f.unlink()
    _raises(copy_dir, "listed in SHA256SUMS but missing")


def test_error_nothing_selected():
    _raises(None, "no vectors selected", optimizer="adam")


def test_generator_check_mode(tmp_path, capsys, monkeypatch):
    case = next(c for c in catalog.all_cases() if c.name == SUBSET[0])
    monkeypatch.setattr(catalog, "all_cases", lambda: [case])
    files = generate.generate([case])
    generate.write(tmp_path, files)
    assert generate.compare(tmp_path, files) == []
    assert generate.main(["--out", str(tmp_path), "--check"]) == 0
    assert load(tmp_path)[0].name == case.name
    (tmp_path / next(iter(files))).write_bytes(b"{}")
    assert generate.compare(tmp_path, files) == [f"differs {next(iter(files))}"]
    (tmp_path / CHECKSUMS).write_text("")
    assert generate.compare(tmp_path, files)[-1] == f"differs {CHECKSUMS}"
    assert generate.main(["--out", str(tmp_path), "--check"]) == 1
    assert "difference" in capsys.readouterr().out
