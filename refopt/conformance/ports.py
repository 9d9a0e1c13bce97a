"""The ports `refopt check --port` checks, and what the runner does for every one of them.

A port is a program speaking the port protocol (conformance/PROTOCOL.md): ``exec:COMMAND`` in any
language, or a Python port (``torch:``, ``optax:``, ``python:`` KIND:MODULE:NAME, or
KIND:path/to/file.py:NAME) served by refopt's worker (``worker.py``) in its own process. A port
object handed over in Python (the pytest helpers, the self-test's mutants) runs in this process
through the same adapters.

``PortTarget`` is the runner's side for all of them: it turns a vector into the case the port
gets (hyperparameters renamed by ``--hparam-map``, those the port does not take left out where the
vector uses their default, the vector not run where it does not), selects the vectors of the
configuration the port implements, and checks what comes back (``targets.checked_output``).
"""
from __future__ import annotations

import os
import shlex
import sys

from .. import registry
from ..quirks import Quirks
from . import adapters, protocol
from .encoding import np_dtype  # noqa: F401 - re-exported for tests and port authors
from .process import DEFAULT_TIMEOUT, PortProcess
from .protocol import Case
from .runner import config_matches
from .targets import STATE_NAMES, ConfigError, PortFailure, checked_output
from .vectors import hparams_to_json

KINDS = ("exec", *adapters.KINDS)
#: The reference's defaults in the vectors' JSON form, to tell which vectors a port can run.
DEFAULTS_JSON = {key: hparams_to_json(key, facts.defaults) for key, facts in registry.OPTIMIZERS.items()}


def parse_hparam_map(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        old, sep, new = item.strip().partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConfigError(f"--hparam-map {text!r}: expected OLD=NEW[,OLD=NEW...]")
        out[old.strip()] = new.strip()
    known = {h.name for facts in registry.OPTIMIZERS.values() for h in facts.hparams}
    unknown = sorted(set(out) - known)
    if unknown:
        raise ConfigError(f"--hparam-map: {unknown[0]!r} is not a reference hyperparameter "
                          f"(known: {', '.join(sorted(known))})")
    return out


def parse_quirks(text: str | None) -> dict[str, bool]:
    """``--quirks aliased_lerp=off,float32_scalars=on`` -> {name: bool}."""
    if not text:
        return {}
    values = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    out = {}
    for item in text.split(","):
        name, sep, value = (x.strip() for x in item.partition("="))
        if name not in registry.QUIRKS or not sep or value.lower() not in values:
            raise ConfigError(f"--quirks {text!r}: expected NAME=on|off[,...] with NAME one of "
                              f"{', '.join(registry.QUIRK_NAMES)}")
        out[name] = values[value.lower()]
    return out


def configuration(profile: str = "reference", quirks: dict | None = None) -> dict:
    """Every quirk's setting for a profile with overrides."""
    return dict(Quirks.for_profile(profile).as_dict(), **(quirks or {}))


class InProcess:
    """An adapter in this process, behind the same interface as ``PortProcess``."""

    def __init__(self, adapter):
        self.adapter = adapter

    def hello(self) -> protocol.Hello:
        return protocol.read_hello(protocol.hello_message(**self.adapter.hello()))

    def run(self, case: Case):
        yield from self.adapter.run(case)

    def close(self) -> None:
        pass


class PortTarget:
    """A port as `refopt check` runs it (see the module docstring)."""

    def __init__(self, spec: str, transport, *, hparam_map: dict | None = None, optimizers=None,
                 profile: str = "reference", quirks: dict | None = None, configured: bool = False):
        self.spec = self.name = spec
        self.kind = spec.partition(":")[0] if spec.partition(":")[0] in KINDS else "python"
        self.transport = transport
        hello = transport.hello()
        self.optimizers = tuple(optimizers) if optimizers else hello.optimizers
        self.accepts = hello.hparams  # optimizer -> names the port takes (None: any)
        #: the configuration it implements; None: it applies each vector's own (configurable)
        self.config = None if hello.configurable and not configured else configuration(profile, quirks)
        self.hparam_map = {o: self._map(o, hparam_map or {}) for o in STATE_NAMES}

    def _map(self, optimizer: str, user: dict) -> dict:
        """Reference name -> the port's: ``--hparam-map``, and ``lr`` -> ``learning_rate`` for a
        port that takes only the latter (optax's name)."""
        out = dict(user)
        takes = (self.accepts or {}).get(optimizer)
        if takes is not None and "lr" not in out and "lr" not in takes and "learning_rate" in takes:
            out["lr"] = "learning_rate"
        return out

    def selects(self, vector) -> bool:
        if self.optimizers and vector.optimizer not in self.optimizers:
            return False
        return self.config is None or config_matches(vector, self.config)

    def skip_reason(self, vector) -> str | None:
        return None

    def unsupported(self, vector) -> list[tuple[str, str]]:
        """(reference name, port name) of each hyperparameter the port does not take and the
        vector sets to something other than the reference default."""
        takes = (self.accepts or {}).get(vector.optimizer)
        if takes is None:
            return []
        mapping, default = self.hparam_map[vector.optimizer], DEFAULTS_JSON[vector.optimizer]
        return [(k, mapping.get(k, k)) for k, v in vector.hparams.items()
                if mapping.get(k, k) not in takes and v != default.get(k)]

    def case(self, vector) -> Case:
        takes = (self.accepts or {}).get(vector.optimizer)
        mapping = self.hparam_map[vector.optimizer]
        hparams = {mapping.get(k, k): v for k, v in vector.hparams.items()}
        if takes is not None:
            hparams = {k: v for k, v in hparams.items() if k in takes}
        state = None if vector.state0 is None else {k: (v if k == "step" else v.copy())
                                                    for k, v in vector.state0.items()}
        return Case(vector.id, vector.optimizer, vector.profile, dict(vector.quirks), hparams, vector.dtype,
                    tuple(vector.shape), vector.param0.copy(), state, [s.grad.copy() for s in vector.steps])

    def run(self, vector) -> list:
        outputs = []
        try:
            for k, result in enumerate(self.transport.run(self.case(vector))):
                outputs.append(checked_output(vector, k, result, where=self.name))
        except PortFailure as exc:
            exc.outputs = outputs
            raise
        return outputs

    def close(self) -> None:
        self.transport.close()


def worker_command(text: str, *, in_place: bool = False, optimizers=None, module="refopt.conformance.worker") -> list:
    argv = [sys.executable, "-m", module, text]
    if in_place:
        argv.append("--in-place")
    if optimizers:
        argv += ["--optimizer", ",".join(optimizers)]
    return argv


def worker_env() -> dict:
    """The runner's environment, with the current folder and the runner's own import path first,
    so a worker imports a port exactly as the runner would."""
    paths = [os.getcwd()] + [p for p in sys.path if p and os.path.isdir(p)]
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths + ([old] if old else []))))


def make_port(text: str, hparam_map: dict | None = None, optimizers=None, *, profile: str = "reference",
              quirks: dict | None = None, configured: bool = False, timeout: float = DEFAULT_TIMEOUT,
              in_place: bool = False, isolated: bool = True, shard: int | None = None) -> PortTarget:
    """``exec:COMMAND`` or a Python port (``torch:``/``optax:``/``python:`` MODULE:NAME or
    path/to/file.py:NAME; ``MODULE:NAME`` alone when the kind can be told) -> a started target.

    A python port is told the optimizer on every case, so it takes the vectors of both. A torch
    class or optax factory implements one: the one its name contains, else ``optimizers``.
    ``isolated=False`` runs a Python port in this process (to debug it: its exit is then ours).
    ``shard=N``: a torch port run with its parameter sharded by FSDP2 over N processes (sharded.py)."""
    kind, sep, rest = text.partition(":")
    options = dict(hparam_map=hparam_map, optimizers=optimizers, profile=profile, quirks=quirks,
                   configured=configured)
    if shard is not None:
        from .sharded import sharded_port

        if kind != "torch" or not isolated:
            raise ConfigError(f"--shard checks a torch port (torch:MODULE:CLASS) in its own processes; got --port "
                              f"{text}{' with --in-process' if isolated is False and kind == 'torch' else ''}")
        plain = dict(options, timeout=timeout)
        argv = worker_command(text, optimizers=optimizers, module="refopt.conformance.sharded") + ["--shard", str(shard)]
        process = PortProcess(argv, text, timeout=timeout, env=worker_env(), worker=True)
        return sharded_port(text, process, shard, lambda: make_port(text, **plain), **options)
    if kind == "exec":
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise ConfigError(f"--port {text}: cannot split the command ({exc})") from None
        if not argv:
            raise ConfigError(f"--port {text!r}: expected exec:COMMAND")
        return PortTarget(text, PortProcess(argv, text, timeout=timeout), **options)
    if kind not in adapters.KINDS and (not sep or ":" not in text):
        raise ConfigError(f"--port {text!r}: expected one of exec:COMMAND, "
                          f"{', '.join(k + ':MODULE:NAME' for k in adapters.KINDS)} (or KIND:path/to/file.py:NAME)")
    if kind in adapters.KINDS and ":" not in rest:
        raise ConfigError(f"--port {text}: expected {kind}:MODULE:NAME or {kind}:path/to/file.py:NAME")
    if not isolated:
        adapter = adapters.make_adapter(text, in_place=in_place, optimizers=optimizers)
        return PortTarget(text, InProcess(adapter), **options)
    process = PortProcess(worker_command(text, in_place=in_place, optimizers=optimizers), text,
                          timeout=timeout, env=worker_env(), worker=True)
    return PortTarget(text, process, **options)


def in_process(text: str, obj, *, kind: str = "python", hparam_map: dict | None = None, optimizers=None,
               in_place: bool = False, profile: str = "reference", quirks: dict | None = None) -> PortTarget:
    """A port object of this process (a step function, a torch class, an optax factory)."""
    adapter = adapters.make_adapter(f"{kind}:{text}", obj, in_place=in_place, optimizers=optimizers)
    return PortTarget(adapter.name, InProcess(adapter), hparam_map=hparam_map, profile=profile, quirks=quirks)


def PythonPort(spec: str, fn=None, hparam_map: dict | None = None, **kw) -> PortTarget:  # noqa: N802
    return in_process(spec, fn, kind="python", hparam_map=hparam_map, **kw) if fn is not None \
        else make_port(f"python:{spec}", hparam_map, **kw)


def TorchPort(spec: str, cls=None, hparam_map: dict | None = None, **kw) -> PortTarget:  # noqa: N802
    return in_process(spec, cls, kind="torch", hparam_map=hparam_map, **kw) if cls is not None \
        else make_port(f"torch:{spec}", hparam_map, **kw)


def OptaxPort(spec: str, factory=None, hparam_map: dict | None = None, **kw) -> PortTarget:  # noqa: N802
    return in_process(spec, factory, kind="optax", hparam_map=hparam_map, **kw) if factory is not None \
        else make_port(f"optax:{spec}", hparam_map, **kw)
