"""The GitHub Action (action.yml) for port authors: its structure is valid for a composite action,
inputs reach scripts only through the environment, and its shell steps run here as GitHub would
run them (the upload step is GitHub's own action and is checked, not run)."""
from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
ACTION = yaml.safe_load((ROOT / "action.yml").read_text())
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def test_action_is_a_well_formed_composite_action():
    assert {"name", "description", "inputs", "runs"} <= set(ACTION)
    assert ACTION["runs"]["using"] == "composite"
    for name, spec in ACTION["inputs"].items():
        assert re.fullmatch(r"[a-z][a-z0-9-]*", name) and spec.get("description")
        if spec.get("required"):
            assert "default" not in spec, f"required input {name} has a default"
        else:
            assert isinstance(spec.get("default"), str), f"input {name}: defaults are strings"
    for step in ACTION["runs"]["steps"]:
        assert step.get("name") and ("run" in step) != ("uses" in step)
        if "run" in step:
            assert step.get("shell") == "bash"  # composite run steps must name their shell
            assert not EXPR.search(step["run"]), "inputs reach scripts through env, never pasted into them"
        else:
            assert re.fullmatch(r"actions/[a-z-]+@v\d+", step["uses"])
    used = {m for text in re.findall(EXPR, (ROOT / "action.yml").read_text()) for m in re.findall(r"inputs\.([a-z0-9-]+)", text)}
    assert used == set(ACTION["inputs"]), "every input is used, and only declared ones"
    assert set(ACTION["outputs"]) == {"junit", "report"}


def _expand(value: str, inputs: dict) -> str:
    def one(m):
        expr = m.group(1)
        if expr == "github.action_path":
            return str(ROOT)
        name = re.fullmatch(r"inputs\.([a-z0-9-]+)", expr)
        assert name, f"unexpected expression {expr!r} in a step's env"
        return inputs[name.group(1)]
    return EXPR.sub(one, str(value))


def run_action(inputs: dict, cwd: Path) -> list:
    """Run every shell step as the runner would: env from the step, the script with bash."""
    values = {k: v.get("default", "") for k, v in ACTION["inputs"].items()} | inputs
    codes = []
    for step in ACTION["runs"]["steps"]:
        if "run" not in step:
            continue
        env = dict(os.environ, **{k: _expand(v, values) for k, v in step.get("env", {}).items()})
        res = subprocess.run(["bash", "-c", step["run"]], env=env, cwd=cwd, capture_output=True, text=True,
                             timeout=600)
        codes.append((step["name"], res.returncode, res.stdout + res.stderr))
        if res.returncode:
            break
    return codes


def test_the_steps_check_a_port_and_write_the_reports(tmp_path):
    from refopt.conformance import load

    ids = ",".join(v.id for v in load(optimizer="saveus", dtype="float32", profile="reference")[:2])
    # pip resolves refopt without installing (already installed here) and without the network
    codes = run_action({"port": "python:refopt.builders.mutants:switch-positive-saveus", "refopt": "refopt",
                        "pip-args": "--dry-run --no-index --no-deps", "args": f"--ids {ids} --no-diagnose",
                        "junit": "out/junit.xml", "report": "out/report.json"}, tmp_path)
    assert [c[1] for c in codes[:-1]] == [0]
    # the switch mistake shows on negative switches only, which these two vectors lack
    name, code, out = codes[-1]
    assert name == "Check the port" and code == 0, out
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert int(suite.get("tests") or suite[0].get("tests")) >= 2
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.slow
def test_a_failing_port_fails_the_step(tmp_path):
    from refopt.conformance import load

    ids = ",".join(v.id for v in load(optimizer="saveus", dtype="float64")[:3])
    codes = run_action({"port": "python:refopt.builders.mutants:step-sign-flipped", "refopt": "refopt",
                        "pip-args": "--dry-run --no-index --no-deps", "args": f"--ids {ids} --no-diagnose"},
                       tmp_path)
    assert codes[-1][0] == "Check the port" and codes[-1][1] == 1
    assert "failures=" in (tmp_path / "refopt-junit.xml").read_text()
