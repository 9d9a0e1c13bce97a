"""`refopt check --port torch:... --shard N`: a torch port run with its parameter sharded as FSDP2
shards it, in N processes, judged on the gathered result; a failure that the port does not have
unsharded is diagnosed as caused by sharding."""
import json
import os
import pathlib

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from refopt import cli  # noqa: E402
from refopt.conformance import vectors  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
PER_SHARD = f"torch:{HERE / 'per_shard_port.py'}:DOPE"
VERDICT = "the sharded result differs from the unsharded one"


def check(capsys, *argv):
    code = cli.main(["check", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ids(predicate):
    return [v.id for v in vectors.load(None, profile=["reference"]) if predicate(v)]


def test_a_port_that_reduces_per_shard_fails_and_sharding_is_named(capsys, tmp_path):
    """One 1-D vector it fails (A1's mean per shard), one 2-D vector it passes (its reductions
    over the channel axes are local under Shard(0)), one 0-d vector that cannot be sharded."""
    one_d = "dope-637f8065e2ac"
    two_d = ids(lambda v: v.optimizer == "dope" and v.dtype == "float64" and len(v.shape) == 2 and v.state0 is None)[0]
    zero_d = ids(lambda v: v.optimizer == "dope" and v.dtype == "float64" and v.shape == ())[0]
    report = tmp_path / "r.json"
    code, out, err = check(capsys, "--port", PER_SHARD, "--shard", "2", "--ids", f"{one_d},{two_d},{zero_d}",
                           "--report", str(report))
    assert code == 1, out + err
    assert VERDICT in out and "unsharded, this port passes this vector" in out, out
    assert "this parameter is 1-D" in out and "--shard 2 --ids dope-637f8065e2ac" in out, out
    cases = {c["id"]: c for c in json.loads(report.read_text())["cases"]}
    assert cases[one_d]["status"] == "failed" and cases[two_d]["status"] == "passed", cases
    assert cases[zero_d]["status"] == "skipped" and "0-d" in cases[zero_d]["message"], cases[zero_d]


@pytest.mark.parametrize("argv, message", [
    (["--shard", "2"], "--shard needs --port"),
    (["--shard", "2", "--port", "python:refopt.builders.mutants:x"], "--shard checks a torch port"),
    (["--shard", "2", "--in-process", "--port", "torch:refopt.torch:DOPE"], "with --in-process"),
    (["--shard", "0", "--port", "torch:refopt.torch:DOPE"], "expected a positive integer"),
    (["--shard", "65", "--port", "torch:refopt.torch:DOPE"], "expected 1 to 64 processes"),
])
def test_what_shard_refuses(capsys, argv, message):
    code, out, err = check(capsys, *argv)
    assert code == 2 and message in err, err


@pytest.mark.slow  # every vector, both optimizers: about a minute on 2 cores
def test_refopt_torch_passes_every_vector_sharded(capsys):
    code, out, err = check(capsys, "--port", "torch:refopt.torch:SAVEUS", "--port", "torch:refopt.torch:DOPE",
                           "--shard", "2", "-q")
    assert code == 0, out + err
    skipped = len(ids(lambda v: v.shape == ()))
    assert f"0 failed, {skipped} skipped" in out, out


@pytest.mark.slow
def test_refopt_torch_on_four_processes(capsys):
    code, out, err = check(capsys, "--port", "torch:refopt.torch:DOPE", "--shard", "4", "--dtype", "float64,bfloat16",
                           "-q")
    assert code == 0, out + err


@pytest.mark.slow
def test_the_public_dope_fails_sharded():
    """The public code (a local copy named by REFOPT_PUBLIC_DOPE, never committed): its A1 mean
    of a 1-D tensor is per shard under FSDP2 (backends/README.md)."""
    path = os.environ.get("REFOPT_PUBLIC_DOPE")
    if not path or not os.path.isfile(path):
        pytest.skip("set REFOPT_PUBLIC_DOPE to a local copy of the public DOPE code to run this test")
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "refopt.cli", "check", "--port", f"torch:{path}:DOPE", "--shard", "2",
                          "--dtype", "float64"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and VERDICT in res.stdout, res.stdout + res.stderr
