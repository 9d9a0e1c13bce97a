"""`refopt check`: runner, port adapters, robustness (issue 6.4), reports and diagnosis.

Most tests use a small vector directory written here from refopt's core (float64 goldens, a tight
budget), so they exercise the runner independently of the committed vectors; a few run the
committed vectors when they are present.
"""
from __future__ import annotations

import json
import pathlib
import sys
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import refopt
from refopt import cli
from refopt.conformance import adapters, diagnose, ports, runner
from refopt.conformance.vectors import load

NAMES = ports.STATE_NAMES


@pytest.fixture(scope="module")
def vdir(tmp_path_factory, vectors_helpers):
    _vector_doc, write_vectors = vectors_helpers.vector_doc, vectors_helpers.write_vectors
    docs = [
        _vector_doc("d-f64", "dope", "float64", (4, 3), {"eps_floor": 1e-3}),
        _vector_doc("d-f32-state", "dope", "float32", (5,), {}, state0=True),
        _vector_doc("d-doc-f64", "dope", "float64", (3, 4), {}, profile="documented"),
        _vector_doc("s-f64", "saveus", "float64", (4, 3), {"weight_decay": 0.1}),
        _vector_doc("s-f32-state", "saveus", "float32", (6,), {"clip_gradients": True}, state0=True),
        _vector_doc("s-f16", "saveus", "float16", (3, 4), {}),
    ]
    return write_vectors(tmp_path_factory.mktemp("vectors"), docs)


# ports used by the tests: python-port functions on refopt's core, some deliberately broken
EXAMPLES = pathlib.Path(__file__).with_name("port_examples.py")
examples = adapters.load_object(f"{EXAMPLES}:good_port", "python").__globals__
good_port, lerp_port = examples["good_port"], examples["lerp_port"]


@pytest.fixture
def portmod():
    """The examples file, as --port python:PATH:FN names its functions."""
    return str(EXAMPLES)


def run_cli(capsys, *argv):
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- core backends ------------------------------------------------------------------------------

def test_core_backends_pass_every_vector(vdir, capsys):
    code, out, err = run_cli(capsys, "--vectors", str(vdir), "--backend", "numpy", "--backend", "array-api-strict")
    assert code == 0, out + err
    assert "11 passed, 0 failed, 1 skipped" in out
    assert "refopt[array-api-strict]" in out and "dope" in out and " s" in out  # table + elapsed


@pytest.mark.parametrize("backend", ["torch-cpu", "jax"])
def test_framework_backends(vdir, capsys, backend):
    pytest.importorskip(backend.split("-")[0])
    # jax compiles per configuration and shape (~1 s each): three vectors cover f64, f16, a given state
    code, out, _ = run_cli(capsys, "--vectors", str(vdir), "--backend", backend, "-q",
                           "--ids", "d-f64,s-f32-state,s-f16")
    assert code == 0 and "3 passed" in out


# -- python ports -------------------------------------------------------------------------------

def test_good_python_port_passes_reference_vectors_only(vdir, capsys, portmod):
    code, out, _ = run_cli(capsys, "--vectors", str(vdir), "--port", f"python:{portmod}:good_port", "-v", "--in-process")
    assert code == 0, out
    assert "d-doc-f64" not in out  # a port is checked against one profile (reference by default)
    assert out.count("PASSED") == 5


def test_broken_port_fails_with_diagnosis_and_reproduction(vdir, capsys, portmod, tmp_path):
    rep, xml = tmp_path / "r.json", tmp_path / "r.xml"
    code, out, _ = run_cli(capsys, "--vectors", str(vdir), "--port", f"python:{portmod}:lerp_port",
                           "--report", str(rep), "--junit", str(xml), "--in-process")
    assert code == 1
    assert "matches the documented profile on aliased_lerp (Q1, clause S2, D2)" in out
    assert f"refopt check --port python:{portmod}:lerp_port --vectors {vdir} --ids d-f64 -v" in out
    report = json.loads(rep.read_text())
    # d-f32-state passes: for a 1-D DOPE gradient the interpolation only rescales g, and D3's norm
    # clip removes the scale, so Q1 cannot show there
    assert report["totals"] == {"passed": 1, "failed": 4, "skipped": 0}
    case = next(c for c in report["cases"] if c["id"] == "s-f64")
    assert case["first_bad"]["step"] == 1 and case["first_bad"]["what"] == "param"
    assert "aliased_lerp" in case["diagnosis"]["verdict"]
    suite = ET.parse(xml).getroot()
    assert suite.tag == "testsuites" and suite.get("failures") == "4"
    assert len(suite.findall(".//testcase")) == 5 and len(suite.findall(".//failure")) == 4


@pytest.mark.parametrize("fn, msg", [
    ("raising_port", "raised RuntimeError: boom"),
    ("wrong_shape_port", "returned param of shape (1,), expected"),
    ("wrong_dtype_port", "returned param of dtype float16, expected"),
    ("nan_port", "NaN where golden is finite"),
])
def test_port_failure_fails_that_vector_only(vdir, capsys, portmod, fn, msg):
    code, out, _ = run_cli(capsys, "--vectors", str(vdir), "--port", f"python:{portmod}:{fn}", "-v", "--in-process")
    assert code == 1
    assert msg in out
    assert out.count("PASSED") >= 2 and out.count("FAILED") >= 2  # the other optimizer's vectors still ran


@pytest.mark.parametrize("port, msg", [
    ("nonsense", "expected one of exec:COMMAND, torch:MODULE:NAME"),
    ("python:only_module", "expected python:MODULE:NAME"),
    ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("python:json:no_such_fn", "has no attribute 'no_such_fn'"),
    ("torch:torch.optim:Adam", "cannot tell from its name"),
    ("torch:json:JSONDecoder --optimizer dope", "is not a torch.optim.Optimizer subclass"),
])
def test_bad_port_is_a_configuration_error(vdir, capsys, port, msg):
    if port.startswith("torch"):
        pytest.importorskip("torch")
    spec, *more = port.split()
    code, out, err = run_cli(capsys, "--vectors", str(vdir), "--port", spec, *more)
    assert code == 2
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- vector-file faults -------------------------------------------------------------------------

@pytest.mark.parametrize("fault, msg", [
    ("truncate", "truncated JSON"),
    ("notjson", "not JSON"),
    ("offschema", "off-schema"),
    ("checksum", "checksum mismatch"),
])
def test_bad_vector_file_is_exit_2(vdir, tmp_path, capsys, fault, msg, vectors_helpers):
    import shutil

    root = tmp_path / "v"
    shutil.copytree(vdir, root)
    raw = (root / "vectors" / "d-f64.json").read_bytes()
    bad = {"truncate": raw[: len(raw) // 2], "notjson": b"hello" + raw,
           "offschema": json.dumps(dict(json.loads(raw), steps="x")).encode(), "checksum": raw + b" "}[fault]
    vectors_helpers.rewrite(root, "d-f64", bad, fix_sum=fault != "checksum")
    code, out, err = run_cli(capsys, "--vectors", str(root), "--backend", "numpy")
    assert code == 2
    assert msg in err and "d-f64.json" in err and "Traceback" not in err


@pytest.mark.parametrize("args, msg", [
    (["--ids", "no-such-id"], "no vectors selected"),
    (["--vectors", "/nonexistent/dir"], "vector directory missing"),
    (["--backend", "nonesuch"], "is not available here"),
    (["--ids", "d-doc-f64", "--port", "python:json:dumps"], "no vector selected for the port"),
    (["--dtype", "float8"], "invalid choice"),
])
def test_empty_or_bad_selection_is_exit_2(vdir, capsys, args, msg):
    argv = args if "--vectors" in args else ["--vectors", str(vdir), *args]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and msg in err and "Traceback" not in err


def test_all_skipped_is_exit_2(vdir, capsys):
    code, _, err = run_cli(capsys, "--vectors", str(vdir), "--backend", "array-api-strict", "--dtype", "float16")
    assert code == 2 and "every selected vector was skipped" in err


# -- adapters -----------------------------------------------------------------------------------

def test_torch_port_with_given_state_keeps_its_own_extra_state(vdir):
    torch = pytest.importorskip("torch")

    class DOPEWithMask(torch.optim.Optimizer):
        """A torch port on refopt's core that, like some originals, keeps an extra 'mask' entry
        and an int step."""

        def __init__(self, params, **h):
            super().__init__(params, {})
            self.opt = refopt.DOPE(**h)

        @torch.no_grad()
        def step(self):
            for p in self.param_groups[0]["params"]:
                st = self.state[p]
                if not st:
                    st.update(self.opt.init(p).items(), mask=torch.ones_like(p), step=0)
                old = self.opt.State(torch.tensor(st["step"]), *(st[k] for k in self.opt.State._fields[1:]))
                new_p, new = self.opt.step(p.detach().clone(), p.grad, old)
                p.copy_(new_p)
                st.update({k: v for k, v in new.items() if k != "step"}, step=st["step"] + 1)

    target = ports.TorchPort("t:DOPEWithMask", cls=DOPEWithMask)
    for v in load(vdir, optimizer="dope", profile="reference"):
        r = runner.run_case(v, target)
        assert r.status == "passed", r.message
        assert set(r.outputs[0].state) == set(NAMES["dope"])


def test_optax_port_and_state_injection(vdir):
    pytest.importorskip("optax")
    import jax.numpy as jnp
    from typing import NamedTuple

    import optax

    class S(NamedTuple):
        step: object
        ema: object
        ema_squared: object

    def saveus_tx(learning_rate, **h):
        opt = refopt.SAVEUS(lr=learning_rate, **h)

        def update(g, state, p):
            new_p, new = opt.step(p, g, opt.State(*state))
            return new_p - p, S(*new)

        return optax.GradientTransformation(lambda p: S(*opt.init(p)), update)

    target = ports.OptaxPort("rtx:saveus_tx", factory=saveus_tx)  # lr arrives as learning_rate
    for v in load(vdir, ids=["s-f64", "s-f32-state"]):  # eager jax compiles every op: keep it short
        r = runner.run_case(v, target)
        # the update is p_new - p, which optax adds back: equal within float64 rounding
        assert r.status in ("passed", "failed") and r.worst_budget_units < 1e6, r.message
        assert r.outputs and set(r.outputs[0].state) == {"ema", "ema_squared"}
    assert adapters.inject_state((optax.EmptyState(), S(jnp.asarray(0), 1, 2)),
                              {"step": 3, "ema": np.ones(2), "ema_squared": np.ones(2)}, jnp.asarray)[1].step == 3
    assert adapters.inject_state((optax.EmptyState(),), {"step": 3, "ema": np.ones(2)}, jnp.asarray) is None


def test_hparam_map_renames_for_the_port(vdir, capsys, tmp_path):
    (tmp_path / "rtmap.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("examples", {str(EXAMPLES)!r})
        examples = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(examples)

        def port(optimizer, param, grad, state, hparams):
            h = dict(hparams)
            h["lr"] = h.pop("learning_rate")
            return examples.good_port(optimizer, param, grad, state, h)
    """))
    code, out, _ = run_cli(capsys, "--vectors", str(vdir), "--port", f"python:{tmp_path / 'rtmap.py'}:port",
                           "--hparam-map", "lr=learning_rate", "-q")
    assert code == 0, out
    code, _, err = run_cli(capsys, "--vectors", str(vdir), "--port", f"python:{tmp_path / 'rtmap.py'}:port",
                           "--hparam-map", "lr")
    assert code == 2 and "expected OLD=NEW" in err


# -- diagnosis ----------------------------------------------------------------------------------

def test_diagnosis_names_first_divergence_and_clauses(vdir):
    v = load(vdir, ids="d-f64")[0]
    r = runner.run_case(v, ports.PythonPort("rt:lerp_port", fn=lerp_port))
    d = diagnose.diagnose(r)
    text = d.text()
    assert "first divergence: step 1, param[" in text and "expected" in text and "got" in text
    assert "clauses: D4" in text
    assert d.matches and "aliased_lerp" in d.matches[0]


def test_pytest_helpers(vdir):
    from refopt.conformance.pytest_plugin import check_port, conformance_cases

    cases = conformance_cases(vectors=vdir, optimizer="dope")
    assert [c.values[0].id for c in cases] == ["d-f32-state", "d-f64"]
    check_port(cases[0].values[0], good_port)
    with pytest.raises(pytest.fail.Exception, match="aliased_lerp"):
        check_port(cases[1].values[0], lerp_port)


def test_help_and_usage_errors(capsys):
    assert cli.main(["check", "--help"]) == 0
    assert "--port" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_progress_bar_only_on_a_tty():
    import io

    from refopt.conformance.report import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    plain, tty = io.StringIO(), Tty()
    for stream in (plain, tty):
        p = Progress(stream, min_total=1)
        for i in range(3):
            p(i + 1, 3, "x")
    assert plain.getvalue() == "" and "3/3" in tty.getvalue()


def test_module_docstring_examples_are_valid_python():
    from refopt.conformance import pytest_plugin

    compile(textwrap.dedent(pytest_plugin.__doc__.split("\n\n")[1]), "<doc>", "exec")


def test_pytest_plugin_options_parametrize_refopt_vector(vdir, tmp_path):
    import subprocess
    from importlib.metadata import entry_points

    if not any(ep.value == "refopt.conformance.pytest_plugin" for ep in entry_points(group="pytest11")):
        pytest.skip("refopt's pytest11 entry point is not installed")
    (tmp_path / "rtplug.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("examples", {str(EXAMPLES)!r})
        examples = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(examples)
        good_port, lerp_port = examples.good_port, examples.lerp_port
    """))
    (tmp_path / "test_port.py").write_text(textwrap.dedent("""
        from refopt.conformance.pytest_plugin import check_port

        def test_named(refopt_vector):
            check_port(refopt_vector, "python:rtplug:good_port")

        def test_from_option(refopt_vector, refopt_port):
            check_port(refopt_vector, refopt_port)

        def test_untouched():
            pass
    """))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_port.py",
                          "--refopt-vectors", str(vdir), "--refopt-port", "python:rtplug:lerp_port"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=dict(__import__("os").environ, PYTHONPATH=f"{tmp_path}:{pathlib.Path(refopt.__file__).parents[1]}"))
    # 5 reference vectors: all pass on the good port; the lerp port fails 4 (see above)
    assert res.returncode == 1 and "4 failed, 7 passed" in res.stdout, res.stdout + res.stderr
    assert "aliased_lerp" in res.stdout


def test_port_module_that_raises_on_import_and_unwritable_report(vdir, capsys, tmp_path, monkeypatch):
    (tmp_path / "rtbroken.py").write_text("raise ImportError('half-installed')\n")
    (tmp_path / "rtbroken2.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(capsys, "--vectors", str(vdir), "--port", "python:rtbroken:f")
    assert code == 2 and "cannot import module 'rtbroken' (half-installed)" in err
    code, _, err = run_cli(capsys, "--vectors", str(vdir), "--port", "python:rtbroken2:f")
    assert code == 2 and "importing 'rtbroken2' raised ZeroDivisionError" in err
    code, _, err = run_cli(capsys, "--vectors", str(vdir), "--backend", "numpy", "--report",
                           str(tmp_path / "no" / "such" / "dir" / "r.json"))
    assert code == 2 and "cannot write report" in err


def test_port_returning_garbage_fails_that_vector(vdir):
    v = load(vdir, ids="s-f64")[0]
    for ret in (None, (1, 2), (np.zeros(3), {})):
        r = runner.run_case(v, ports.PythonPort("rt:garbage", fn=lambda *a, ret=ret: ret))
        assert r.status == "failed" and "step 1" in r.message, r.message


def test_json_report_writes_non_finite_values_as_strings(vdir, tmp_path, capsys, portmod):
    rep = tmp_path / "r.json"
    code, _, _ = run_cli(capsys, "--vectors", str(vdir), "--port", f"python:{portmod}:nan_port", "--report", str(rep),
                         "--in-process")
    assert code == 1
    cases = json.loads(rep.read_text())["cases"]  # strict JSON: no NaN/Infinity tokens
    bad = next(c for c in cases if c["status"] == "failed")
    assert bad["first_bad"]["actual"] == "nan" and bad["worst_budget_units"] == "inf"
