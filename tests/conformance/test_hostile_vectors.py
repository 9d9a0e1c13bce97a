"""Damaged and hostile vector directories (issue 10.6): every one is exit status 2 with one line on
stderr, never a traceback, with bounded memory; and reports stay well formed whatever a port says."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from refopt import cli
from refopt.conformance.encoding import encode

EXAMPLES = pathlib.Path(__file__).with_name("port_examples.py")


@pytest.fixture(scope="module")
def good_doc(vectors_helpers):
    return vectors_helpers.vector_doc("v-ok", "saveus", "float32", (3, 2), {"weight_decay": 0.1}, steps=2)


@pytest.fixture
def _dir(vectors_helpers):
    return lambda *a, **k: _make_dir(vectors_helpers.write_vectors, *a, **k)


def _make_dir(write_vectors, tmp_path, docs=None, raw: dict | None = None):
    """A vector directory from docs (JSON objects) and raw files {name: bytes}, all listed in SHA256SUMS."""
    root = write_vectors(tmp_path / "v", docs or [])
    lines = (root / "SHA256SUMS").read_text().splitlines()
    for name, data in (raw or {}).items():
        (root / "vectors" / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  vectors/{name}")
    (root / "SHA256SUMS").write_text("\n".join(ln for ln in lines if ln) + "\n")
    return root


def _check(capsys, root, *more):
    code = cli.main(["check", "--vectors", str(root), "--backend", "numpy", *more])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def _edited(doc, **changes):
    d = json.loads(json.dumps(doc))
    for path, value in changes.items():
        node, *keys = path.split("__")
        target = d
        for k in [node, *keys][:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = [node, *keys][-1]
        target[int(last) if isinstance(target, list) else last] = value
    return d


@pytest.mark.parametrize("changes, words", [
    ({"id": 12}, ["off-schema", "id must be a string"]),
    ({"id": "../../etc/passwd"}, ["id must be a string of letters"]),
    ({"name": ["x"]}, ["name must be a string"]),
    ({"tolerance": {"k": "4", "floor_ulps": 2.0}}, ["tolerance.k must be a finite number"]),
    ({"tolerance": {"k": float("nan"), "floor_ulps": 2.0}}, ["tolerance.k must be a finite number"]),
    ({"tolerance": {"k": 4.0, "floor_ulps": -1}}, ["tolerance.floor_ulps"]),
    ({"tolerance": [4]}, ["tolerance must be an object"]),
    ({"hparams__lr": -1.0}, ["hparams: Invalid learning rate"]),
    ({"hparams__betas": [0.9]}, ["hparams: Invalid betas"]),
    ({"hparams__decouple": True}, ["'decouple' is not a hyperparameter of saveus"]),
    ({"hparams__clip_lambda": {"power": "x"}}, ["clip_lambda must be null"]),
    ({"hparams": []}, ["hparams must be an object"]),
    ({"shape": [True, 2]}, ["shape must be a list"]),
    ({"shape": "32"}, ["shape must be a list"]),
    ({"dtype": "int64"}, ["dtype must be one of"]),
    ({"profile": "pytorch"}, ["profile must be one of"]),
    ({"clauses": "S1"}, ["clauses must be a list"]),
    ({"steps__0__state__step": True}, ["step must be an integer"]),
    ({"steps__0__state__step": 10**30}, ["step must be an integer"]),
    ({"steps__0__budget__dtype": ["float64"]}, ["dtype must be a string"]),
])
def test_wrongly_typed_fields_are_one_line(tmp_path, capsys, good_doc, changes, words, _dir):
    root = _dir(tmp_path, raw={"v-ok.json": json.dumps(_edited(good_doc, **changes)).encode()})
    code, _, err = _check(capsys, root)
    _assert_one_line(code, err, "v-ok.json", *words)


def test_nan_and_negative_budgets_are_refused(tmp_path, capsys, good_doc, _dir):
    for bad in (np.nan, -1.0, np.inf):
        budget = np.full((3, 2), bad)
        doc = _edited(good_doc, steps__0__budget=encode(budget))
        root = _dir(tmp_path / str(bad), raw={"v-ok.json": json.dumps(doc).encode()})
        code, _, err = _check(capsys, root)
        _assert_one_line(code, err, "budget must be finite and >= 0")


@pytest.mark.parametrize("raw, words", [
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    (b"{\"a\": \xff\xfe}", ["not UTF-8"]),
    (b"1" * 10_000, ["not JSON"]),
    (b"\x00" * 1000, ["not JSON"]),
    (b'"just a string"', ["top level must be an object"]),
])
def test_malformed_files_are_one_line(tmp_path, capsys, raw, words, _dir):
    root = _dir(tmp_path, raw={"v-bad.json": raw})
    code, _, err = _check(capsys, root)
    _assert_one_line(code, err, "v-bad.json", *words)


def test_id_must_be_its_file_name(tmp_path, capsys, good_doc, _dir):
    root = _dir(tmp_path, raw={"v-other.json": json.dumps(good_doc).encode()})
    code, _, err = _check(capsys, root)
    _assert_one_line(code, err, "is not its file name")


@pytest.mark.parametrize("kind", ["directory", "fifo", "link-to-dev-zero", "link-to-directory", "dangling-link"])
def test_listed_entries_that_are_not_regular_files(tmp_path, capsys, good_doc, kind, _dir):
    root = _dir(tmp_path, [good_doc])
    path = root / "vectors" / "v-odd.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block forever: it must never be opened
    elif kind == "link-to-dev-zero":
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        path.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "link-to-directory":
        path.symlink_to(root)
    else:
        path.symlink_to(root / "nowhere")
    with open(root / "SHA256SUMS", "a") as f:
        f.write(f"{'0' * 64}  vectors/v-odd.json\n")
    code, _, err = _check(capsys, root)
    if kind == "dangling-link":
        _assert_one_line(code, err, "v-odd.json", "cannot read (No such file")
    else:
        _assert_one_line(code, err, "v-odd.json", "not a regular file")


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe not ascii\n", ["SHA256SUMS", "not ASCII"]),
    (b"abc  vectors/x.json\n", ["malformed line"]),
    (("0" * 64 + "  ../../etc/passwd\n").encode(), ["is not a vector file name"]),
    (("0" * 64 + "  vectors/../x.json\n").encode(), ["is not a vector file name"]),
])
def test_damaged_checksum_file(tmp_path, capsys, good_doc, content, words, _dir):
    root = _dir(tmp_path, [good_doc])
    (root / "SHA256SUMS").write_bytes(content)
    code, _, err = _check(capsys, root)
    _assert_one_line(code, err, *words)


def test_checksum_file_that_is_a_device_or_directory(tmp_path, capsys, good_doc, _dir):
    root = _dir(tmp_path, [good_doc])
    (root / "SHA256SUMS").unlink()
    (root / "SHA256SUMS").mkdir()
    code, _, err = _check(capsys, root)
    _assert_one_line(code, err, "SHA256SUMS", "not a regular file")
    if os.path.exists("/dev/zero"):
        (root / "SHA256SUMS").rmdir()
        (root / "SHA256SUMS").symlink_to("/dev/zero")
        code, _, err = _check(capsys, root)
        _assert_one_line(code, err, "not a regular file")


def test_oversized_file_is_refused_before_it_is_read(tmp_path, capsys, good_doc, monkeypatch, _dir):
    from refopt.conformance import vectors

    root = _dir(tmp_path, [good_doc])
    monkeypatch.setattr(vectors, "MAX_VECTOR_BYTES", 1000)
    code, _, err = _check(capsys, root)
    _assert_one_line(code, err, "more than the 1000")


def test_empty_report_name_is_a_usage_error(tmp_path, capsys, good_doc, _dir):
    root = _dir(tmp_path, [good_doc])
    for option in ("--report", "--junit"):
        code, _, err = _check(capsys, root, option, "")
        assert code == 2 and "needs a file name" in err and "Traceback" not in err


def test_junit_stays_well_formed_whatever_a_port_says(tmp_path, capsys, good_doc, _dir):
    root = _dir(tmp_path, [good_doc])
    xml, rep = tmp_path / "r.xml", tmp_path / "r.json"
    code = cli.main(["check", "--vectors", str(root), "--port", f"python:{EXAMPLES}:control_characters",
                     "--junit", str(xml), "--report", str(rep)])
    out = capsys.readouterr().out
    assert code == 1 and "bad ???[31m? text" in out
    failure = ET.parse(xml).getroot().find(".//failure")
    assert "bad" in failure.get("message") and "\x00" not in failure.text
    assert json.loads(rep.read_text())["totals"]["failed"] == 1
