"""`refopt` command line on the committed vectors, and the non-Python reader example."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from refopt import cli
from refopt.conformance import vectors

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def committed():
    try:
        return vectors.load()
    except vectors.VectorFileError as exc:  # pragma: no cover - only before the vectors exist
        pytest.skip(f"committed vectors unavailable: {exc}")


def test_default_check_passes_on_numpy(committed, capsys, tmp_path):
    rep, xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = cli.main(["check", "--backend", "numpy", "--report", str(rep), "--junit", str(xml)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(rep.read_text())
    assert report["totals"] == {"passed": len(committed), "failed": 0, "skipped": 0}
    assert {(r["optimizer"], r["dtype"]) for r in report["summary"]} == {
        (v.optimizer, v.dtype) for v in committed}
    assert len(ET.parse(xml).getroot().findall(".//testcase")) == len(committed)


def test_console_script_runs():
    exe = shutil.which("refopt")
    cmd = [exe] if exe else [sys.executable, "-m", "refopt.cli"]
    res = subprocess.run([*cmd, "check", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--port" in res.stdout


def test_node_example_reads_a_vector(committed):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    import numpy as np

    v = next(v for v in committed if v.dtype == "float32" and v.shape and v.state0 is None
             and np.isfinite(v.steps[0].param).all() and np.isfinite(v.steps[0].grad).all())
    res = subprocess.run([node, str(ROOT / "conformance" / "examples" / "read_vector.js"), v.path],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["id"] == v.id and got["shape"] == list(v.shape)
    n = len(got["first_expected"])
    assert got["first_expected"] == [float(x) for x in v.steps[0].param.reshape(-1)[:n]]
    assert got["first_grad"] == [float(x) for x in v.steps[0].grad.astype("float64").reshape(-1)[:n]]


DEVICE_PORT = """
import refopt.torch

SEEN = []


class SeenDOPE(refopt.torch.DOPE):
    def step(self, closure=None):
        SEEN.extend(str(p.device) for g in self.param_groups for p in g["params"])
        return super().step(closure)
"""


def test_device_option_puts_a_torch_ports_parameters_there(committed, capsys, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from refopt.conformance.adapters import DEVICE_VARIABLE

    (tmp_path / "seen_port.py").write_text(DEVICE_PORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    one = next(v.id for v in committed if v.optimizer == "dope")
    code = cli.main(["check", "--port", "torch:seen_port:SeenDOPE", "--device", "cpu", "--in-process", "-q",
                     "--ids", one, "--no-multi-tensor"])
    assert code == 0, capsys.readouterr().out
    import seen_port

    assert set(seen_port.SEEN) == {"cpu"}
    assert DEVICE_VARIABLE not in os.environ  # restored after the run


@pytest.mark.parametrize("argv,message", [
    (["--backend", "numpy", "--device", "cpu"], "--device needs --port torch:"),
    (["--port", "torch:refopt.torch:DOPE", "--device", "no-such-device"], "--device no-such-device"),
])
def test_device_option_errors(argv, message, capsys):
    pytest.importorskip("torch")
    assert cli.main(["check", *argv]) == 2
    assert message in capsys.readouterr().err
