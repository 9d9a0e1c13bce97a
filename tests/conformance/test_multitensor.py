"""Multi-tensor runs of torch ports: many tensors of mixed shapes and dtypes in one optimizer, over
param groups, each judged against its own vector."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refopt import cli
from refopt.conformance import load
from refopt.conformance.multitensor import BATCH, batches

HERE = Path(__file__).resolve().parent


def test_batches_are_deterministic_mixed_and_of_one_configuration():
    vecs = load(optimizer="dope")
    parts = batches(vecs)
    assert parts == batches(list(reversed(vecs)))  # by id, whatever the order given
    assert sum(len(b) for b in parts) == len(vecs) and all(1 <= len(b) <= BATCH for b in parts)
    for b in parts:
        assert len({json.dumps(v.quirks, sort_keys=True) for v in b}) == 1
    mixed = [b for b in parts if len({v.shape for v in b}) > 1 and len({v.dtype for v in b}) > 1
             and len({json.dumps(v.hparams, sort_keys=True) for v in b}) > 1]
    assert len(mixed) > len(parts) // 2  # most batches mix shapes, dtypes and param groups


def test_a_first_group_lr_port_fails_only_together(capsys, tmp_path):
    rep = tmp_path / "r.json"
    port = f"torch:{HERE / 'multitensor_ports.py'}:FirstGroupLrDOPE"
    # one batch of 8: four at the default learning rate, four at another (so two param groups at least)
    pool = [v for v in load(optimizer="dope", dtype="float64", profile="reference")
            if "Scale" not in v.flags and not v.flags.count("QuirkOff")]
    ids = [v.id for v in pool if v.hparams["lr"] == 1.5e-4][:4] + [v.id for v in pool if v.hparams["lr"] != 1.5e-4][:4]
    code = cli.main(["check", "--port", "torch:refopt.torch:DOPE", "--port", port, "--ids", ",".join(ids),
                     "--no-diagnose", "-q", "--report", str(rep), "--in-process"])
    capsys.readouterr()
    cases = json.loads(rep.read_text())["cases"]
    status = {}
    for c in cases:
        status.setdefault(c["target"], set()).add(c["status"])
    assert code == 1
    assert status["torch:refopt.torch:DOPE"] == {"passed"}
    assert status["torch:refopt.torch:DOPE [multi-tensor]"] == {"passed"}  # refopt's own foreach path
    assert status[port] == {"passed"}  # alone, the mistake cannot show
    assert "failed" in status[f"{port} [multi-tensor]"]


def test_multi_tensor_run_can_be_skipped(capsys):
    code = cli.main(["check", "--port", "torch:refopt.torch:SAVEUS", "--in-process", "--no-multi-tensor",
                     "-v", "--ids", ",".join(v.id for v in load(optimizer="saveus", dtype="float32")[:3])])
    out, _ = capsys.readouterr()
    assert code == 0 and "[multi-tensor]" not in out


@pytest.mark.slow
def test_the_multi_tensor_run_is_isolated_in_a_child_process(capsys, tmp_path):
    port = f"torch:{HERE / 'multitensor_ports.py'}:FirstGroupLrDOPE"
    ids = [v.id for v in load(optimizer="dope", dtype="float32") if "Scale" not in v.flags][:3]
    code = cli.main(["check", "--port", port, "--ids", ",".join(ids), "-v", "--no-diagnose"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.count("[multi-tensor]") >= 3  # one batch, each vector judged on its own
