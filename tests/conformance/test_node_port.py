"""The Node.js example port (conformance/examples/port.js) through `refopt check --port exec:`:
it passes the vectors, and a deliberately broken copy of it is diagnosed like any port."""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from refopt import cli
from refopt.conformance import load

EXAMPLES = Path(__file__).resolve().parents[2] / "conformance" / "examples"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH")


def port(folder: Path) -> str:
    return "exec:" + shlex.join([NODE, str(folder / "port.js")])


def check(capsys, *argv):
    code = cli.main(["check", *argv])
    out, _ = capsys.readouterr()
    return code, out


def test_node_port_passes_vectors_of_every_kind(capsys):
    # one of each: both optimizers, every dtype, both profiles, a long-horizon vector
    vecs = load()
    picked = {}
    for v in vecs:  # (the Scale vectors take a second each: the slow test below runs them)
        if "Scale" not in v.flags:
            picked.setdefault((v.optimizer, v.dtype, v.profile, "LongHorizon" in v.flags), v.id)
    code, out = check(capsys, "--port", port(EXAMPLES), "--ids", ",".join(picked.values()), "-q")
    assert code == 0, out


@pytest.mark.slow
def test_node_port_passes_every_vector(capsys):
    code, out = check(capsys, "--port", port(EXAMPLES), "-q")
    assert code == 0 and " 0 failed" in out, out


def test_a_broken_copy_is_diagnosed(capsys, tmp_path):
    for name in ("port.js", "arrays.js", "saveus_dope.js"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    source = (tmp_path / "saveus_dope.js").read_text()
    broken = source.replace("if (product[i] > 0) k++;", "if (product[i] >= 0) k++;").replace(
        "(v) => (v > 0 ? 1 : 0)", "(v) => (v >= 0 ? 1 : 0)")  # D12's mask keeps u*g >= 0
    assert broken != source
    (tmp_path / "saveus_dope.js").write_text(broken)
    knife = [v.id for v in load(optimizer="dope") if "KnifeEdge" in v.flags and v.dtype == "float64"]
    code, out = check(capsys, "--port", port(tmp_path), "--ids", ",".join(knife))
    assert code == 1 and "verdict: this port matches the known mistake 'cautious-mask-ge-zero'" in out
    assert "reproduce: refopt check --port" in out
