"""``refopt check --port torch:MODULE:CLASS --shard N``: a torch port run with its parameter sharded
as FSDP2 shards it, in N CPU processes, and judged on the gathered result.

    python -m refopt.conformance.sharded --shard 2 torch:my_package.optim:DOPE

is the worker the runner starts for such a port (conformance/PROTOCOL.md: it answers the runner
exactly as ``refopt.conformance.worker`` does). It is rank 0 of a gloo process group on 127.0.0.1;
it starts ranks 1..N-1 itself (this module with ``--rank``), once for all the vectors. For each
case every rank wraps the vector's parameter in a one-parameter module and applies
``torch.distributed.fsdp.fully_shard`` to it (a ``Shard(0)`` DTensor: uneven rows, empty trailing
shards, the local rows a view into FSDP2's padded storage), gives each step's gradient laid out the
same way (a view into a padded buffer, as FSDP2's reduce-scatter leaves it), steps the port's
optimizer on every rank, and gathers the parameter and the state buffers for the runner to judge
against the same golden values as an unsharded run. A 0-d parameter cannot be sharded: those
vectors are skipped. Nothing here changes how a port is judged; the runner's diagnosis compares a
failing sharded run with the port's own unsharded run (``ShardedTarget``).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from .adapters import TorchAdapter, _same_bits, _torch_to_numpy, make_adapter
from .ports import PortTarget
from .protocol import Case, StepResult, hparams_from_json
from .targets import STATE_NAMES, ConfigError, PortFailure, SkipVector, call_port, step_count

#: Seconds a collective may wait for the other ranks (a rank that hangs ends the group).
GROUP_TIMEOUT = 300
MAX_SHARDS = 64
HOW = "as FSDP2's fully_shard shards it (Shard(0))"


# ---- a process group on this machine -------------------------------------------------------------

def loopback_env(env=None) -> dict:
    """``env`` with gloo bound to the loopback interface (127.0.0.1 only), where there is one."""
    env = dict(os.environ if env is None else env)
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def rendezvous() -> str:
    """A fresh file through which the ranks of one group find each other (no port to race for)."""
    return os.path.join(tempfile.mkdtemp(prefix="refopt-group-"), "store")


def start_ranks(world: int, argv_for) -> list:
    """Start ranks 1..world-1 as ``argv_for(rank)``, before this process imports torch, so that
    they start in parallel. Their standard output goes to our standard error (never into the
    protocol channel), their input is empty; they stay in our process group, so whoever ends us
    ends them."""
    return [subprocess.Popen(argv_for(rank), stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                             env=loopback_env()) for rank in range(1, world)]


def join_group(rank: int, world: int, store: str) -> None:
    """Join the gloo group of ``world`` processes meeting at the file ``store``; its connections
    are on the loopback interface."""
    import torch.distributed as dist

    os.environ.update(loopback_env())
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))


def leave_group(group: bool = True, store: str | None = None) -> None:
    """Leave the group (``group``) and remove the rendezvous file ``store`` (rank 0; once every rank
    has joined, it is not read again)."""
    import torch.distributed as dist

    if group and dist.is_initialized():
        dist.destroy_process_group()
    if store:
        shutil.rmtree(os.path.dirname(store), ignore_errors=True)


def end_ranks(children, wait: bool = True) -> None:
    """Wait for the other ranks to finish (``wait``), else end them."""
    for child in children:
        try:
            child.wait(timeout=10 if wait else 0.01)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ---- the port on every rank ----------------------------------------------------------------------

class ShardedTorchAdapter(TorchAdapter):
    """A torch port stepped with its parameter sharded by FSDP2 (see the module docstring)."""

    def __init__(self, name: str, cls, rank: int, world: int):
        super().__init__(name, cls)
        self.rank, self.world = rank, world
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh("cpu", (world,))

    def skip(self, case: Case) -> str | None:
        if len(case.shape) == 0:
            return "a 0-d parameter cannot be sharded (FSDP2 shards axis 0); it is checked without --shard"
        return None

    def run(self, case: Case):
        """Every rank: the case's steps in lockstep. Rank 0's results are the gathered ones."""
        import torch
        from torch.distributed.fsdp import fully_shard

        to, names = self.backend.to, STATE_NAMES[case.optimizer]
        holder = _holder(torch)(to(case.param))
        fully_shard(holder, mesh=self.mesh)
        p = holder.weight
        opt = self._agreed(lambda: call_port(self.name, self.cls, [p], **hparams_from_json(case.hparams),
                                             **self.config(case)))
        if case.state is not None:
            self._agreed(lambda: self._restore(opt, p, case))
        for k, grad in enumerate(case.grads):
            local = self._local_rows(to(grad), p)
            p.grad = _padded_like(torch, local, p)
            error = _error_of(lambda: call_port(self.name, opt.step))
            mine = None if error else self._local_results(opt, p, local, names)
            gathered = self._all((error, mine))  # one collective per step for everything
            self._raise_first([e for e, _ in gathered])
            results = [r for _, r in gathered]
            notes = []
            if any(r["wrote"] for r in results):
                notes.append(f"step {k + 1}: the port wrote into p.grad (the public code does; the "
                             f"processed gradient is not an output of the spec)")
            whole = {n: _joined([r["arrays"][n] for r in results]) for n in results[0]["arrays"]}
            count = results[0]["step"]
            count = None if count is None else step_count(count, k, self.name)
            yield StepResult(whole.pop("param"), whole, count, tuple(notes))

    def _local_results(self, opt, p, grad_rows, names) -> dict:
        """This rank's part of a step's outputs: its rows of the parameter and of each buffer laid
        out like it (another DTensor layout is gathered here), whether it wrote into p.grad."""
        import torch

        st = opt.state.get(p, {})
        arrays = {"param": ("rows", _torch_to_numpy(p.to_local()))}
        for n in names:
            x = st.get(n)
            if not torch.is_tensor(x):
                continue
            if hasattr(x, "full_tensor"):
                same = x.device_mesh == p.device_mesh and tuple(x.placements) == tuple(p.placements)
                arrays[n] = ("rows", _torch_to_numpy(x.to_local())) if same else ("whole", _torch_to_numpy(x.full_tensor()))
            elif tuple(x.shape) == tuple(p.to_local().shape) and tuple(x.shape) != tuple(p.shape):
                arrays[n] = ("rows", _torch_to_numpy(x))  # a port keeping its buffers as plain local tensors
            else:
                arrays[n] = ("whole", _torch_to_numpy(x))
        count = st.get("step")
        if hasattr(count, "full_tensor"):
            count = count.full_tensor()
        if torch.is_tensor(count):
            count = _torch_to_numpy(count)
        wrote = not _same_bits(_torch_to_numpy(p.grad.to_local()), _torch_to_numpy(grad_rows))
        return {"arrays": arrays, "step": count, "wrote": wrote}

    # -- helpers: every rank calls each of them in the same order ----------------------------------
    def _all(self, value) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def _agreed(self, fn):
        """Run ``fn`` on every rank; if it fails on any, every rank raises that PortFailure (so no
        rank waits in a collective for one that gave up)."""
        result = None

        def call():
            nonlocal result
            result = fn()

        self._raise_first(self._all(_error_of(call)))
        return result

    def _raise_first(self, errors) -> None:
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if failed:
            rank, text = failed[0]
            same = len(failed) == self.world and len(set(errors)) == 1
            raise PortFailure(text if same else f"rank {rank}: {text}")

    def _local_rows(self, full, p):
        """This rank's rows of ``full``, split as ``p`` is (torch.chunk along axis 0)."""
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full, self.mesh, p.placements, src_data_rank=None).to_local()
        assert tuple(local.shape) == tuple(p.to_local().shape), (local.shape, p.to_local().shape)
        return local

    def _set_param(self, p, value) -> None:  # a given starting state: this rank's rows
        p.to_local().copy_(self._local_rows(value, p))

    def _buffer(self, value, p):
        import torch

        return _padded_like(torch, self._local_rows(value, p).clone(), p)


def _error_of(fn) -> str | None:
    """The PortFailure text of ``fn()``, or None."""
    try:
        fn()
    except PortFailure as exc:
        return str(exc)
    return None


def _joined(parts) -> np.ndarray:
    """A whole array from every rank's part: rows joined in rank order, or rank 0's whole one."""
    kind, first = parts[0]
    return np.concatenate([a for _, a in parts], axis=0) if kind == "rows" else first


@functools.lru_cache(maxsize=None)
def _holder(torch):
    class Holder(torch.nn.Module):
        """The module fully_shard is applied to: one parameter, the vector's."""

        def __init__(self, value):
            super().__init__()
            self.weight = torch.nn.Parameter(value)

    return Holder


def _padded_like(torch, local, p):
    """A DTensor laid out like ``p`` whose local rows are a view into a buffer padded to the
    largest shard, as FSDP2 leaves its gradients (and its parameters)."""
    from torch.distributed.tensor import DTensor

    rows = p.shape[0]
    padded = torch.zeros((math.ceil(rows / p.device_mesh.size()),) + tuple(local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    view = padded[: local.shape[0]]
    return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


# ---- rank 0: the worker the runner talks to; ranks 1..N-1: followers ------------------------------

def answer(adapter, case) -> list:
    """Rank 0: the messages answering ``case``, which every rank runs (worker.serve sends them)."""
    import torch.distributed as dist

    from .worker import run_case

    reason = adapter.skip(case)
    if reason:
        return [{"type": "skip", "reason": reason}]
    dist.broadcast_object_list([case], src=0)
    return list(run_case(_Eager(adapter), case))


class _Eager:
    """Rank 0 runs a whole case before answering: every rank must finish its collectives even when
    the runner stops reading at the first error."""

    def __init__(self, adapter):
        self.adapter, self.name = adapter, adapter.name

    def run(self, case):
        results, error = [], None
        try:
            for result in self.adapter.run(case):
                results.append(result)
        except (PortFailure, SkipVector) as exc:
            error = exc
        yield from results
        if error is not None:
            raise error


def follow(adapter) -> None:
    """Ranks 1..N-1: run every case rank 0 broadcasts, until it broadcasts None."""
    import torch.distributed as dist

    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        try:
            for _ in adapter.run(box[0]):
                pass
        except (PortFailure, SkipVector):
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refopt.conformance.sharded")
    parser.add_argument("port", help="torch:MODULE:CLASS or torch:path/to/file.py:CLASS")
    parser.add_argument("--shard", type=int, required=True, help="number of processes (ranks)")
    parser.add_argument("--optimizer", help="saveus, dope (comma list): what the port implements")
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    faulthandler.enable()
    children, store, finished = [], args.store, False
    if args.rank == 0:
        from .worker import claim_stdio

        out, lines = claim_stdio()
        store = rendezvous()
        argv = [sys.executable, "-m", "refopt.conformance.sharded", args.port, "--shard", str(args.shard)]
        argv += ["--optimizer", args.optimizer] if args.optimizer else []
        children = start_ranks(args.shard, lambda r: argv + ["--rank", str(r), "--store", store])
    try:
        try:
            adapter = make_adapter(args.port, optimizers=args.optimizer.split(",") if args.optimizer else None)
            if not isinstance(adapter, TorchAdapter):
                raise ConfigError(f"--port {args.port}: --shard checks torch ports (torch:MODULE:CLASS)")
        except ConfigError as exc:
            print(exc, file=sys.stderr, flush=True)
            return 2
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share this machine's cores
        join_group(args.rank, args.shard, store)
        sharded = ShardedTorchAdapter(adapter.name, adapter.cls, args.rank, args.shard)
        sharded.optimizers = adapter.optimizers
        dist.barrier()  # every rank has joined and made its mesh
        leave_group(False, store if args.rank == 0 else None)
        if args.rank == 0:
            from .worker import serve

            try:
                serve(sharded, out, lines, lambda case: answer(sharded, case))
            except BrokenPipeError:  # the runner has gone
                pass
            dist.broadcast_object_list([None], src=0)  # the others stop too
        else:
            follow(sharded)
        finished = True
    finally:
        leave_group(True, store if args.rank == 0 else None)  # (the file is gone unless joining failed)
        end_ranks(children, wait=finished)
    return 0


# ---- the runner's side -----------------------------------------------------------------------------

class ShardedTarget(PortTarget):
    """A torch port checked with ``--shard N``; ``unsharded()`` makes the same port unsharded, to
    tell a failure caused by sharding from one that is not (``sharding_verdict``)."""

    def __init__(self, spec, transport, *, shard: int, unsharded, **options):
        super().__init__(spec, transport, **options)
        self.shard = shard
        self.name = f"{spec} --shard {shard}"
        self._make_unsharded, self._unsharded = unsharded, None

    def sharding_verdict(self, vector, result) -> str | None:
        """When the port passes ``vector`` unsharded: the verdict that sharding changed its result."""
        from .runner import run_case

        if self._unsharded is None:
            self._unsharded = self._make_unsharded()
        plain = run_case(vector, self._unsharded)
        if plain.status != "passed":
            return None
        where = ""
        fb = result.first_bad
        if fb is not None and plain.outputs and fb["index"] is not None and fb["step"] <= len(plain.outputs):
            out = plain.outputs[fb["step"] - 1]
            unsharded = out.param if fb["what"] == "param" else out.state.get(fb["what"])
            if unsharded is not None:
                value = float(np.asarray(unsharded, dtype=np.float64)[tuple(fb["index"])])
                where = f" (step {fb['step']}, {fb['what']}{fb['index']}: {fb['actual']!r} sharded, {value!r} unsharded)"
        hint = ""
        if len(vector.shape) == 1:
            hint = ("; this parameter is 1-D, so A1's mean (quirk Q2: over all elements, clauses S1/D1/D10) "
                    "must be global: torch's DTensor computes mean(dim=()) per shard (backends/README.md)")
        return (f"the sharded result differs from the unsharded one{where}: unsharded, this port passes this "
                f"vector; sharded over {self.shard} processes {HOW} it does not, so a per-tensor reduction "
                f"(A1 mean, A2 std, D3 norm, D12 count) is not global over the shards{hint}")

    def close(self) -> None:
        super().close()
        if self._unsharded is not None:
            self._unsharded.close()


def sharded_port(spec: str, process, shard: int, unsharded, **options) -> ShardedTarget:
    """The runner's target for ``--port spec --shard N`` (``process``: this module's worker)."""
    if not 1 <= shard <= MAX_SHARDS:
        process.close()
        raise ConfigError(f"--shard {shard}: expected 1 to {MAX_SHARDS} processes")
    return ShardedTarget(spec, process, shard=shard, unsharded=unsharded, **options)


if __name__ == "__main__":  # pragma: no cover
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the group is gone and every file closed: skip torch's slow interpreter teardown
