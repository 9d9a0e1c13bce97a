"""What test_fsdp.py checks, run on every rank of a gloo group by harness.py.

``cases(rank, world)`` runs every scenario on every rank, in the same order (they hold
collectives), and returns measurements: rank 0's dict is the report. Each scenario compares a
sharded run with the unsharded run of the same optimizer on the same data, by the relative
difference max|sharded - unsharded| / max|unsharded| of the whole (gathered) parameters and state.
"""
import contextlib
import math
import os
import shutil
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import refopt
import refopt.torch as rt

STEPS = 3
#: (name, class, hyperparameters): defaults and variants that reach every reduction (A2 over the
#: whole tensor, decay, clipping, eps floor, the cautious mask)
OPTIMIZERS = [
    ("SAVEUS", rt.SAVEUS, dict(lr=1e-2)),
    ("SAVEUS-wholestd-decay-clip", rt.SAVEUS, dict(lr=1e-2, normalize_channels=False, weight_decay=0.1,
                                                  decouple_weight_decay=True, clip_gradients=True)),
    ("DOPE", rt.DOPE, dict(lr=1e-2)),
    ("DOPE-wholestd-floor", rt.DOPE, dict(lr=1e-2, normalize_channels=False, eps_floor=1e-7, clip=0.5)),
]
#: (shape, placements on a 1-D mesh): even, uneven, an empty local shard (one row over 2+ ranks),
#: a channel axis split, replicated, empty (A6), 0-d
PLACEMENTS = [
    ((13, 7), "S0"), ((13, 7), "S1"), ((13, 7), "R"), ((3, 5, 2), "S2"), ((3, 5, 2), "S0"), ((13,), "S0"),
    ((3,), "S0"), ((1,), "S0"), ((1, 4), "S0"), ((0, 4), "S0"), ((), "R"),
]


def placement(code):
    return Replicate() if code == "R" else Shard(int(code[1:]))


def full(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


def rel(a, b) -> float:
    a, b = full(a).double(), full(b).double()
    if a.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def summed(count: int) -> int:
    total = torch.tensor([count])
    dist.all_reduce(total)
    return int(total)


def series(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return p0, [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(STEPS)]


def guarded(report, key, fn):
    """One scenario; an exception is recorded (every rank raises alike: no rank is left waiting)."""
    t0 = time.perf_counter()
    try:
        report[key] = fn()
    except Exception:  # noqa: BLE001
        report[key] = {"error": traceback.format_exc()[-3000:]}
    report.setdefault("seconds", {})[key] = round(time.perf_counter() - t0, 3)


# ---- hand-made DTensors: every placement ----------------------------------------------------------

def placement_case(mesh, cls, hp, shape, code, dtype=torch.float64):
    p0, grads = series(shape, dtype)
    ref = torch.nn.Parameter(p0.clone())
    opt = cls([ref], **hp)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
    p = torch.nn.Parameter(distribute_tensor(p0.clone(), mesh, [placement(code)]))
    sopt = cls([p], **hp)
    for g in grads:
        p.grad = distribute_tensor(g.clone(), mesh, [placement(code)])
        sopt.step()
    st, ref_st = sopt.state[p], opt.state[ref]
    buffers = [k for k in st if k != "step"]
    return {
        "rel": rel(p, ref),
        "state_rel": max(rel(st[k], ref_st[k]) for k in buffers),
        "layout_kept": all(isinstance(st[k], DTensor) and st[k].placements == p.placements for k in buffers),
        "step": int(st["step"]),
        "step_kind": f"{st['step'].dtype}/{st['step'].device.type}/{st['step'].dim()}",
    }


# ---- FSDP2's fully_shard on a small network ---------------------------------------------------------

class Net(torch.nn.Module):
    """A conv (3 output channels: uneven, and empty trailing shards on 4 ranks) and three linears."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 3, 3, dtype=dtype)
        self.l1 = torch.nn.Linear(15, 13, dtype=dtype)
        self.l2 = torch.nn.Linear(13, 10, dtype=dtype)
        self.l3 = torch.nn.Linear(10, 3, dtype=dtype)

    def forward(self, x):
        x = torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_net(mesh=None, dtype=torch.float64):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net(dtype)
    if mesh is not None:
        for layer in (net.conv, net.l1, net.l2, net.l3):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
    return net


def batches(n=STEPS, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 7, generator=g, dtype=torch.float64).to(dtype),
             torch.randn(16, 3, generator=g, dtype=torch.float64).to(dtype)) for _ in range(n)]


def train(net, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def fsdp_case(mesh, cls, hp, dtype=torch.float64):
    """Training under fully_shard; beside it an unsharded copy stepped by the unsharded optimizer
    with the same (gathered) gradients, so that only the optimizers are compared. ``training_rel``:
    the unsharded training on its own gradients, which FSDP2's forward and backward change in
    the last bits (informative)."""
    data = batches(dtype=dtype)
    alone = make_net(dtype=dtype)
    train(alone, cls(alone.parameters(), **hp), data)
    net, twin = make_net(mesh, dtype), make_net(dtype=dtype)
    opt, twin_opt = cls(net.parameters(), **hp), cls(twin.parameters(), **hp)
    pairs = list(zip(net.parameters(), twin.parameters()))
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        for p, q in pairs:
            q.grad = p.grad.full_tensor()
        opt.step()
        twin_opt.step()
    return {
        "rel": max(rel(p, q) for p, q in pairs),
        "state_rel": max(rel(opt.state[p][k], twin_opt.state[q][k]) for p, q in pairs for k in opt.state[p]
                         if k != "step"),
        "training_rel": max(rel(p, q) for p, q in zip(net.parameters(), alone.parameters())),
        "finite": all(bool(torch.isfinite(full(p)).all()) for p, _ in pairs),
        "sharded": all(isinstance(p, DTensor) for p, _ in pairs),
        "empty_local_shards": summed(sum(p.to_local().numel() == 0 for p, _ in pairs)),  # on all ranks
        "state_dtensors": all(isinstance(opt.state[p][k], DTensor) for p, _ in pairs for k in opt.state[p] if k != "step"),
    }


# ---- the core's pure step on DTensors -----------------------------------------------------------------

def core_case(mesh):
    out = {}
    for opt in (refopt.SAVEUS(lr=1e-2), refopt.DOPE(lr=1e-2, normalize_channels=False)):
        for shape, code in (((13, 7), "S1"), ((13,), "S0"), ((1,), "S0")):
            p0, grads = series(shape)
            p, st = p0.numpy(), opt.init(p0.numpy())
            for g in grads:  # the NumPy core
                p, st = opt.step(p, g.numpy(), st)
            q = distribute_tensor(p0, mesh, [placement(code)])
            sq = opt.init(q)
            for g in grads:
                q, sq = opt.step(q, distribute_tensor(g, mesh, [placement(code)]), sq)
            out[f"{opt.name}/{shape}/{code}"] = {
                "rel": rel(q, torch.from_numpy(p)),
                "dtensors": isinstance(q, DTensor) and all(isinstance(b, DTensor) and b.placements == q.placements
                                                           for b in sq[1:]),
                "step": int(sq.step),
            }
    return out


def errors_case(mesh):
    """The messages for what the DTensor path refuses."""
    out = {}
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Shard(0)]))
    p.grad = torch.ones(4, 3, dtype=torch.float64)
    try:
        rt.DOPE([p]).step()
        out["plain_grad"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["plain_grad"] = f"{type(exc).__name__}: {exc}"
    opt = refopt.SAVEUS()
    q = distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Shard(0)])
    try:
        opt.step(q, torch.ones(4, 3, dtype=torch.float64), opt.init(q))
        out["core_plain_grad"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["core_plain_grad"] = f"{type(exc).__name__}: {exc}"
    checked = refopt.SAVEUS(check_finite=True)
    bad = torch.ones(4, 3, dtype=torch.float64)
    bad[3, 2] = math.nan  # on the last rank only
    try:
        checked.step(q, distribute_tensor(bad, mesh, [Shard(0)]), checked.init(q))
        out["check_finite"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["check_finite"] = f"{type(exc).__name__}: {exc}"
    partial = DTensor.from_local(torch.ones(4, 3, dtype=torch.float64), mesh, [Partial()])
    try:
        opt.step(partial, partial, opt.init(partial))
        out["partial_param"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["partial_param"] = f"{type(exc).__name__}: {exc}"
    return out


def partial_grad_case(mesh, world):
    """A replicated parameter with a pending-sum (Partial) gradient, as tensor parallelism leaves
    it: the gradient is reduced to the parameter's layout before the step."""
    p0, grads = series((5, 4))
    ref = torch.nn.Parameter(p0.clone())
    opt = rt.DOPE([ref], lr=1e-2)
    p = torch.nn.Parameter(distribute_tensor(p0.clone(), mesh, [Replicate()]))
    sopt = rt.DOPE([p], lr=1e-2)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        p.grad = DTensor.from_local(g / world, mesh, [Partial()])  # sums to g over the ranks
        sopt.step()
    return {"rel": rel(p, ref)}


# ---- torch.distributed.checkpoint -------------------------------------------------------------------

def local_snapshot(net, opt):
    params = {n: p.to_local().clone() for n, p in net.named_parameters()}
    state = {}
    for n, p in net.named_parameters():
        for k, v in opt.state[p].items():
            state[(n, k)] = v.to_local().clone() if isinstance(v, DTensor) else v.clone()
    return params, state


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                                        for x, y in ((a[k], b[k]) for k in a))


@contextlib.contextmanager
def shared_dir(rank):
    """A folder every rank writes its part of a checkpoint into, removed afterwards."""
    box = [tempfile.mkdtemp(prefix="refopt-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    try:
        yield box[0]
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(box[0], ignore_errors=True)


def save(net, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load(net, opt, path):
    """Into a fresh (net, opt), as backends/README.md shows it: init_state() first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opt.init_state()  # so get_state_dict does not step it (see refopt.torch's init_state)
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def interrupted(rank, cls, hp, mesh, later_mesh, snapshot):
    """Two steps on ``mesh``, a checkpoint, a third step; a fresh network and optimizer on
    ``later_mesh`` load the checkpoint and take the third step too. Returns both (network,
    optimizer) pairs and ``snapshot`` of the state saved and of the state loaded."""
    data = batches(STEPS)
    net = make_net(mesh)
    opt = cls(net.parameters(), **hp)
    train(net, opt, data[:2])
    other = make_net(later_mesh)
    other_opt = cls(other.parameters(), **hp)
    with shared_dir(rank) as folder:
        save(net, opt, folder)
        saved = snapshot(net, opt)
        train(net, opt, data[2:])  # the uninterrupted run
        load(other, other_opt, folder)
    loaded = snapshot(other, other_opt)
    train(other, other_opt, data[2:])  # resumed
    return (net, opt), (other, other_opt), saved, loaded


def whole_state(net, opt):
    return {(n, k): full(v).clone() for n, p in net.named_parameters() for k, v in opt.state[p].items()}


def dcp_case(mesh, rank, cls, hp):
    (net, _), (fresh, fresh_opt), saved, loaded = interrupted(rank, cls, hp, mesh, mesh, local_snapshot)
    resumed = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(net.parameters(), fresh.parameters()))
    layouts = all(isinstance(v, DTensor) and v.placements == p.placements
                  for p in fresh.parameters() for k, v in fresh_opt.state[p].items() if k != "step")
    ok = torch.tensor([int(same_bits(saved[0], loaded[0]) and same_bits(saved[1], loaded[1])), int(resumed),
                       int(layouts)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank's shards
    return {"round_trip_bitwise": bool(ok[0]), "resume_bitwise": bool(ok[1]), "layout_restored": bool(ok[2]),
            "step_after_load": sorted({int(s["step"]) for s in fresh_opt.state.values()})}


def reshard_case(mesh, mesh2, rank, cls, hp):
    """A checkpoint saved 4-way sharded, loaded into HSDP (2 replicas of 2-way shards): the state
    arrives whole and bit-identical, and the next step is the uninterrupted one's."""
    (net, _), (other, _), saved, loaded = interrupted(rank, cls, hp, mesh, mesh2, whole_state)
    return {"state_bitwise": same_bits(saved, loaded),
            "next_step_rel": max(rel(p, q) for p, q in zip(other.parameters(), net.parameters()))}


def dcp_init_case(mesh, cls):
    """torch's checkpoint helpers initialise a never-stepped optimizer by a zero-gradient step with
    lr=0; with eps=0 that step is 0/0 (the reference's arithmetic). init_state() avoids it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out = {}
    for label, prepare in (("init_state", lambda o: o.init_state()), ("torch_init_step", lambda o: None)):
        net = make_net(mesh)
        opt = cls(net.parameters(), lr=1e-2, eps=0.0)
        prepare(opt)
        get_optimizer_state_dict(net, opt)
        nan = torch.tensor([sum(int(torch.isnan(p.to_local()).any()) for p in net.parameters())])
        dist.all_reduce(nan)
        out[label] = {"params_with_nan": int(nan), "steps": sorted({int(s["step"]) for s in opt.state.values()})}
    return out


# ---- DDP and ZeroRedundancyOptimizer (plain tensors) --------------------------------------------------

def ddp_case(rank, world, cls, hp):
    import copy

    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    data = batches(4)
    ref = make_net()
    train(ref, cls(ref.parameters(), **hp), data)

    def run(split, zero):
        net = DistributedDataParallel(make_net())
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=cls, **hp) if zero else \
            cls(net.parameters(), **hp)
        mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in data] if split else data
        train(net, opt, mine)
        return max(rel(p, q) for p, q in zip(net.parameters(), ref.parameters())), net, opt

    out = {f"{'zero' if zero else 'ddp'}{'_split' if split else ''}": run(split, zero)[0]
           for zero in (False, True) for split in (False, True)}
    # ZeRO's consolidated state dict: saved on rank 0, loaded by every rank, resumed identically
    _, net, opt = run(False, True)
    opt.consolidate_state_dict(to=0)
    box = [opt.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    twin = DistributedDataParallel(make_net())
    twin.load_state_dict(net.state_dict())
    twin_opt = ZeroRedundancyOptimizer(twin.parameters(), optimizer_class=cls, **hp)
    twin_opt.load_state_dict(copy.deepcopy(box[0]))
    more = batches(2, seed=7)
    train(net, opt, more)
    train(twin, twin_opt, more)
    out["zero_resume_rel"] = max(rel(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    return out


# ---- the per-shard control and the float32/bfloat16 runs ---------------------------------------------

def control_case(mesh):
    """A port whose 1-D mean is per shard differs: the comparisons above can see a wrong reduction."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("per_shard_port", os.path.join(os.path.dirname(__file__),
                                                                                 "per_shard_port.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"rel": placement_case(mesh, module.DOPE, dict(lr=1e-2), (13,), "S0")["rel"]}


def check_case(rank, world, per_group=1):
    """``refopt check --shard``'s adapter on refopt.torch, in this group: golden vectors of each
    optimizer and dtype (1-D, 2-D, 4-D, empty, from a given state, in turn), judged as the
    runner judges them. (test_check_shard.py runs the command itself on every vector.)"""
    from refopt.conformance import ports, runner, vectors
    from refopt.conformance.sharded import ShardedTorchAdapter

    groups = {}
    for v in vectors.load(None, profile=["reference"]):
        if v.shape:  # a 0-d parameter cannot be sharded
            groups.setdefault((v.optimizer, v.dtype), []).append(v)
    out = {}
    for i, ((optimizer, _), vs) in enumerate(sorted(groups.items())):
        kinds = {}
        for v in vs:  # one vector per kind: ndim, a given starting state
            kinds.setdefault((len(v.shape), v.state0 is None, 0 in v.shape), v)
        picked = sorted(kinds.values(), key=lambda v: v.id)
        cls = rt.SAVEUS if optimizer == "saveus" else rt.DOPE
        name = f"torch:refopt.torch:{cls.__name__}"
        target = ports.PortTarget(name, ports.InProcess(ShardedTorchAdapter(name, cls, rank, world)))
        for j in range(per_group):
            v = picked[(i + j) % len(picked)]
            out[f"{v.id} {v.dtype} {tuple(v.shape)}"] = runner.judge_outputs(v, target.run(v))[0]
    return out


def collectives_case(mesh):
    """What one step sends, per parameter (the docs' table): all-reduces of partial sums only,
    none for a reduction over axes no rank splits, never a gather (CommDebugMode sees DTensor's
    collectives, the patch the c10d calls of the sharded namespace)."""
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    cases = [(o, shape, code) for o in (OPTIMIZERS[0], OPTIMIZERS[2])
             for shape, code in (((13, 7), "S0"), ((13, 7), "S1"), ((13,), "S0"), ((13, 7), "R"))]
    cases += [(o, (13, 7), "S0") for o in (OPTIMIZERS[1], OPTIMIZERS[3])]  # A2 over the whole tensor
    for (name, cls, hp), shape, code in cases:
        p0, grads = series(shape)
        p = torch.nn.Parameter(distribute_tensor(p0, mesh, [placement(code)]))
        opt = cls([p], **hp)
        p.grad = distribute_tensor(grads[0], mesh, [placement(code)])
        calls = []
        real = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counted
        try:
            with CommDebugMode() as comm:
                opt.step()
        finally:
            dist.all_reduce = real
        others = {str(k): v for k, v in comm.get_comm_counts().items() if "all_reduce" not in str(k)
                  and "allreduce" not in str(k)}
        out[f"{name}/{shape}/{code}"] = {"all_reduces": len(calls), "values_sent": sum(calls), "other": others}
    return out


def cases(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    report = {"world": world}
    for name, cls, hp in OPTIMIZERS:
        for shape, code in PLACEMENTS:
            guarded(report, f"placement/{name}/{shape}/{code}", lambda: placement_case(mesh, cls, hp, shape, code))
        guarded(report, f"fsdp/{name}/float64", lambda: fsdp_case(mesh, cls, hp))
    for name, cls, hp in (OPTIMIZERS[0], OPTIMIZERS[2]):
        for dtype in (torch.float32, torch.bfloat16):
            guarded(report, f"fsdp/{name}/{str(dtype)[6:]}", lambda: fsdp_case(mesh, cls, hp, dtype))
        guarded(report, f"dcp/{name}", lambda: dcp_case(mesh, rank, cls, hp))
        guarded(report, f"ddp/{name}", lambda: ddp_case(rank, world, cls, hp))
        guarded(report, f"dcp_init/{name}", lambda: dcp_init_case(mesh, cls))
    guarded(report, "core", lambda: core_case(mesh))
    guarded(report, "errors", lambda: errors_case(mesh))
    guarded(report, "partial_grad", lambda: partial_grad_case(mesh, world))
    guarded(report, "control", lambda: control_case(mesh))
    guarded(report, "check", lambda: check_case(rank, world, 1 if world == 2 else 3))
    guarded(report, "collectives", lambda: collectives_case(mesh))
    if world == 4:  # a 2-D mesh: HSDP (replicas of 2-way shards) and a matrix split both ways
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for name, cls, hp in (OPTIMIZERS[0], OPTIMIZERS[2]):
            guarded(report, f"reshard/{name}", lambda: reshard_case(mesh, mesh2, rank, cls, hp))
        for name, cls, hp in OPTIMIZERS:
            guarded(report, f"hsdp/{name}", lambda: hsdp_case(mesh2, cls, hp))
            guarded(report, f"2d/{name}", lambda: mesh2d_case(mesh2, cls, hp))
    return report


def hsdp_case(mesh2, cls, hp):
    return fsdp_case(mesh2, cls, hp)


def mesh2d_case(mesh2, cls, hp):
    out = {}
    for shape in ((7, 5), (3, 5, 2)):
        p0, grads = series(shape)
        ref = torch.nn.Parameter(p0.clone())
        opt = cls([ref], **hp)
        p = torch.nn.Parameter(distribute_tensor(p0.clone(), mesh2, [Shard(0), Shard(1)]))
        sopt = cls([p], **hp)
        for g in grads:
            ref.grad = g.clone()
            opt.step()
            p.grad = distribute_tensor(g.clone(), mesh2, [Shard(0), Shard(1)])
            sopt.step()
        out[str(shape)] = rel(p, ref)
    return {"rel": max(out.values()), "by_shape": out}

