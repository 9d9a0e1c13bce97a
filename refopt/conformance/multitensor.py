"""Multi-tensor runs of a torch port: many parameters of mixed shapes and dtypes in ONE optimizer,
spread over param groups (the path that ``foreach`` and fused implementations take), each tensor
judged against its own vector.

`refopt check --port torch:...` runs every vector twice: alone (one parameter per optimizer) and
here. The vectors a torch port takes are partitioned by configuration (a configurable port gets its
profile and quirks in the constructor), sorted by id and cut into batches of ``BATCH``; a batch
becomes one optimizer whose param groups are its vectors' distinct hyperparameter sets. Each step
gives every tensor whose vector still has a gradient that gradient; the others get ``grad = None``
(not stepped, common.md). Vectors that start from a given state get it after one throwaway
zero-gradient step that lets the port create its state, as a single run does; the others get their
fresh state back. The port runs in a child process (``python -m refopt.conformance.multitensor
SPEC``, batches pickled over its standard input and output), so a crash or a hang costs its
batch, not the run. ``--ids`` with a batch's ids reruns exactly that batch.
"""
from __future__ import annotations

import json
import os
import pickle
import select
import subprocess
import sys
import traceback

from .adapters import _torch_to_numpy, overwrite_state
from .protocol import StepResult, hparams_from_json
from .targets import STATE_NAMES, ConfigError, PortFailure, checked_output, step_count

BATCH = 8


def batches(vectors, size: int = BATCH) -> list[list]:
    """Deterministic batches: by optimizer and quirks, then by id, ``size`` at a time."""
    parts: dict = {}
    for v in vectors:
        parts.setdefault((v.optimizer, json.dumps(v.quirks, sort_keys=True), v.profile), []).append(v)
    out = []
    for key in sorted(parts):
        ordered = sorted(parts[key], key=lambda v: v.id)
        out += [ordered[i:i + size] for i in range(0, len(ordered), size)]
    return out


def run_batch(adapter, cases) -> dict:
    """{case id: [StepResult per step]} of one joint run (in the child process)."""
    torch, to = adapter.torch, adapter.backend.to
    params = [torch.nn.Parameter(to(c.param)) for c in cases]
    groups: dict = {}
    for p, c in zip(params, cases):
        groups.setdefault(json.dumps(c.hparams, sort_keys=True), []).append(p)
    param_groups = [{"params": ps, **hparams_from_json(json.loads(h))} for h, ps in groups.items()]
    opt = adapter.cls(param_groups, **hparams_from_json(cases[0].hparams), **adapter.config(cases[0]))
    if any(c.state is not None for c in cases):
        _restore(adapter, opt, params, cases)
    names = STATE_NAMES[cases[0].optimizer]
    out = {c.id: [] for c in cases}
    for k in range(max(len(c.grads) for c in cases)):
        for p, c in zip(params, cases):
            p.grad = to(c.grads[k]) if k < len(c.grads) else None
        opt.step()
        for p, c in zip(params, cases):
            if k < len(c.grads):
                st = opt.state.get(p, {})
                buffers = {n: _torch_to_numpy(st[n]) for n in names if torch.is_tensor(st.get(n))}
                count = None if st.get("step") is None else step_count(st["step"], k, adapter.name)
                out[c.id].append(StepResult(_torch_to_numpy(p), buffers, count))
    return out


def _restore(adapter, opt, params, cases):
    """One zero-gradient step creates the port's state; then every parameter is put back, a given
    state written over the port's (its ``step`` keeping the port's type), a fresh one dropped."""
    torch, to = adapter.torch, adapter.backend.to
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, c in zip(params, cases):
        with torch.no_grad():
            p.copy_(to(c.param))
        p.grad = None
        if c.state is None:
            opt.state.pop(p, None)
            continue
        overwrite_state(torch, to, opt.state[p], c.state)


def _answer(adapter, cases) -> tuple:
    try:
        return ("ok", run_batch(adapter, cases))
    except BaseException as exc:  # noqa: BLE001 - whatever the port does fails its batch
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return ("error", f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})")


def main(argv=None) -> int:
    """The child process: load the port once, then answer each pickled batch with a pickled
    ("ok", {id: [StepResult]}) or ("error", message)."""
    from .adapters import make_adapter
    from .worker import claim_stdio

    out, inp = claim_stdio()  # what the port prints goes to standard error, not into the channel
    argv = sys.argv[1:] if argv is None else argv
    try:
        adapter = make_adapter(argv[0], optimizers=argv[1].split(",") if len(argv) > 1 else None)
    except ConfigError as exc:
        adapter, failure = None, str(exc)
    while True:
        try:
            cases = pickle.load(inp)
        except EOFError:
            return 0
        pickle.dump(("error", failure) if adapter is None else _answer(adapter, cases), out)
        out.flush()


class MultiTensorTarget:
    """The multi-tensor run of a torch port target (``ports.PortTarget`` of kind torch)."""

    kind = "torch"

    def __init__(self, base, batch: int = BATCH, timeout: float = 60.0):
        self.base, self.batch, self.timeout = base, batch, timeout
        self.spec, self.name = base.spec, f"{base.name} [multi-tensor]"
        self.optimizers = base.optimizers
        self._batch_of: dict = {}
        self._done: dict = {}
        self._child = None
        #: a port run in refopt's own process (--in-process, or a port object) is batched there too
        self._adapter = getattr(base.transport, "adapter", None)

    def selects(self, vector) -> bool:
        return self.base.selects(vector)

    def skip_reason(self, vector) -> str | None:
        return self.base.skip_reason(vector)

    def unsupported(self, vector):
        return self.base.unsupported(vector)

    def prepare(self, vectors) -> None:
        """Cut the vectors this target will run into batches (before the first ``run``)."""
        runnable = [v for v in vectors if not self.unsupported(v)]
        for group in batches(runnable, self.batch):
            for v in group:
                self._batch_of[v.id] = group

    def run(self, vector) -> list:
        if vector.id not in self._done:
            self._run(self._batch_of.get(vector.id) or [vector])
        result = self._done.pop(vector.id)
        if isinstance(result, str):
            raise PortFailure(result)
        return [checked_output(vector, k, r, where=self.name) for k, r in enumerate(result)]

    def _run(self, group) -> None:
        limit = self.timeout * len(group)
        try:
            if self._adapter is not None:
                answer = _answer(self._adapter, [self.base.case(v) for v in group])
            else:
                answer = self._ask(group, limit)
        except (EOFError, OSError, pickle.UnpicklingError):
            self.close()
            answer = ("error", "the port process died while running this batch")
        ids = ", ".join(v.id for v in group)
        for v in group:
            if answer[0] == "ok":
                self._done[v.id] = answer[1][v.id]
            else:
                self._done[v.id] = f"in one optimizer with {ids}: {answer[1]}"

    def _ask(self, group, limit: float):
        """The child process's answer to one batch."""
        proc = self._process()
        pickle.dump([self.base.case(v) for v in group], proc.stdin)
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], limit)
        if ready:
            return pickle.load(proc.stdout)
        self.close()
        return ("error", f"no answer within {limit:g} s; the port process was ended")

    def _process(self):
        if self._child is None or self._child.poll() is not None:
            from .ports import worker_env

            argv = [sys.executable, "-m", "refopt.conformance.multitensor", self.spec]
            if self.optimizers:
                argv.append(",".join(self.optimizers))
            env = dict(worker_env(), PYTHONWARNINGS="ignore")
            self._child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        return self._child

    def close(self) -> None:
        if self._child is not None:
            proc, self._child = self._child, None
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
                proc.wait()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
