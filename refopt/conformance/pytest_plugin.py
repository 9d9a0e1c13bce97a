"""Golden vectors inside a port's own pytest suite, one test per vector.

    import pytest
    from refopt.conformance.pytest_plugin import conformance_cases, check_port
    from mypkg import MyDOPE

    @pytest.mark.parametrize("vector", conformance_cases(optimizer="dope"))
    def test_conformance(vector):
        check_port(vector, MyDOPE)            # or "torch:mypkg:MyDOPE", an optax factory, a function

Installed as a pytest plugin (entry point ``refopt``) it stays inert unless asked: it adds the
options ``--refopt-port`` and ``--refopt-vectors`` and parametrizes only tests that take a
``refopt_vector`` argument (the port in ``--refopt-port`` then comes as ``refopt_port``).
"""
from __future__ import annotations


def conformance_cases(*, optimizer=None, dtype=None, profile: str = "reference", ids=None, vectors=None):
    """``pytest.param(vector, id=...)`` for each selected vector whose quirks are ``profile``'s."""
    import pytest

    from .runner import profile_matches
    from .vectors import load

    vecs = load(vectors, optimizer=optimizer, dtype=dtype, ids=ids)
    return [pytest.param(v, id=f"{v.id}-{v.dtype}") for v in vecs if profile_matches(v, profile)]


_STARTED: dict = {}  # port text -> its target: one worker process per port for the whole session


def _target(port, kind, hparam_map, optimizer):
    from . import ports

    if isinstance(port, str):
        key = (port, tuple(sorted((hparam_map or {}).items())), optimizer)
        if key not in _STARTED:
            try:
                _STARTED[key] = ports.make_port(port, hparam_map)
            except ports.ConfigError as exc:  # a name that does not say which optimizer: trust the caller
                if "cannot tell" not in str(exc):
                    raise
                _STARTED[key] = ports.make_port(port, hparam_map, [optimizer])
        return _STARTED[key]
    try:
        import torch

        if isinstance(port, type) and issubclass(port, torch.optim.Optimizer):
            kind = "torch"
    except ImportError:
        pass
    name = getattr(port, "__qualname__", type(port).__name__)
    return ports.in_process(f"{getattr(port, '__module__', '?')}:{name}", port, kind=kind or "python",
                            hparam_map=hparam_map, optimizers=None if kind in (None, "python") else [optimizer])


def check_port(vector, port, *, kind: str | None = None, hparam_map: dict | None = None) -> None:
    """Run ``vector`` on ``port`` and fail the test with a diagnosis when it does not conform.

    ``port``: a ``--port`` string (``torch:MODULE:CLASS``...), a ``torch.optim.Optimizer``
    subclass, or a callable with ``kind="python"`` (default) or ``kind="optax"``."""
    import pytest

    from .diagnose import diagnose
    from .runner import run_case

    target = _target(port, kind, hparam_map, vector.optimizer)
    if target.optimizers and vector.optimizer not in target.optimizers:
        pytest.skip(f"{target.name} implements {', '.join(target.optimizers)}, not {vector.optimizer}")
    result = run_case(vector, target)
    if result.status == "skipped":
        pytest.skip(result.message)
    if result.status == "failed":
        result.diagnosis = diagnose(result)
    if result.status == "failed":
        pytest.fail(result.diagnosis.text(), pytrace=False)


# -- pytest hooks (inert unless a test asks for refopt_vector) ------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("refopt", "refopt conformance vectors")
    group.addoption("--refopt-port", default=None, metavar="KIND:MODULE:NAME",
                    help="port for tests taking refopt_vector/refopt_port (as `refopt check --port`)")
    group.addoption("--refopt-vectors", default=None, metavar="DIR", help="vector directory")


def pytest_generate_tests(metafunc):
    if "refopt_vector" not in metafunc.fixturenames:
        return
    cases = conformance_cases(vectors=metafunc.config.getoption("refopt_vectors", None))
    metafunc.parametrize("refopt_vector", [p.values[0] for p in cases], ids=[p.id for p in cases])


def _refopt_port(request):
    spec = request.config.getoption("refopt_port", None)
    if spec is None:
        import pytest

        pytest.skip("no --refopt-port given")
    return spec


try:  # the fixture exists only where pytest does; importing this module never needs pytest
    import pytest as _pytest

    refopt_port = _pytest.fixture(name="refopt_port")(_refopt_port)
except ImportError:  # pragma: no cover
    pass
