"""Step time of refopt.torch against torch.optim.AdamW and the memory roofline (printed numbers).

    python benchmarks/bench_torch.py [--threads N] [--reps R] [--workloads big,transformer,tiny]

For each workload it prints ms/step (best of R after a warm-up) for refopt.torch DOPE and SAVEUS
with foreach=False and foreach=True, torch.optim.AdamW(foreach=True), and, when the original
PyTorch code is present at /work/orig (outside the repo), the original optimizers. The roofline
is the bytes a step must move at least (read p, grad and the state, write p and the state)
divided by the measured copy bandwidth (``dst.copy_(src)`` on the largest tensor, counted as
read + write, on a DRAM-sized tensor). Memory: ``scratch MB`` is what the optimizer keeps for reuse across steps
(``scratch_bytes()``); ``extra MB`` is the peak RSS growth of a fresh process over three steps
(VmHWM from /proc/self/status) minus the optimizer state, i.e. scratch plus the peak of
transient temporaries, for any optimizer.

Other benchmark scripts may import ``WORKLOADS``, ``make_params``, ``time_steps`` and ``roofline``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ORIG = "/work/orig"


def _transformer(d=256, layers=12):
    shapes = [(1000, d)]  # embedding
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    return shapes


WORKLOADS = {
    "big": [(4096, 4096)],
    "transformer": _transformer(),  # 121 tensors, ~9.7M elements
    "tiny": [((i % 7) + 1, (i % 5) + 2) if i % 3 else ((i % 11) + 1,) for i in range(1000)],
}
#: Tensor-sized passes a step must make at least: (reads + writes) of p, grad and state.
PASSES = {"DOPE": 11, "SAVEUS": 7, "AdamW": 7}


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
    return ps


def optimizers():
    """name -> (family, factory(params))."""
    import refopt.torch as rt

    out = {
        "refopt DOPE foreach=False": ("DOPE", lambda ps: rt.DOPE(ps, foreach=False)),
        "refopt DOPE foreach=True": ("DOPE", lambda ps: rt.DOPE(ps, foreach=True)),
        "refopt SAVEUS foreach=False": ("SAVEUS", lambda ps: rt.SAVEUS(ps, foreach=False)),
        "refopt SAVEUS foreach=True": ("SAVEUS", lambda ps: rt.SAVEUS(ps, foreach=True)),
        "torch AdamW foreach=True": ("AdamW", lambda ps: torch.optim.AdamW(ps, foreach=True)),
    }
    if os.path.isdir(ORIG):  # the third-party original, for comparison on machines that have it
        sys.path.insert(0, ORIG)
        from orig_dope import DOPE as OD  # noqa: E402
        from orig_saveus import SAVEUS as OS  # noqa: E402

        out["original DOPE"] = ("DOPE", lambda ps: OD(ps))
        out["original SAVEUS"] = ("SAVEUS", lambda ps: OS(ps))
    return out


def time_steps(opt, reps: int, warmup: int = 2) -> float:
    """Best wall time of ``opt.step()`` in ms (the original mutates grads; that is part of it)."""
    for _ in range(warmup):
        opt.step()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def copy_bandwidth(numel: int, dtype=torch.float32, reps: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)``, counting the read and the write."""
    src, dst = torch.randn(numel, dtype=dtype), torch.empty(numel, dtype=dtype)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def roofline(family: str, nbytes: int, bandwidth: float) -> float:
    """ms a step needs at least to move its tensors once at copy bandwidth."""
    return PASSES[family] * nbytes / bandwidth * 1e3


def _rss_kib() -> int:
    """Peak resident set of this process, KiB: VmHWM (Linux), which starts afresh at exec,
    unlike ru_maxrss, which a child inherits from the process that spawned it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_child(name: str, workload: str) -> None:
    """In a fresh process: peak RSS growth over params + grads + state, in bytes (JSON)."""
    family, factory = optimizers()[name]
    ps = make_params(WORKLOADS[workload])
    opt = factory(ps)
    base = _rss_kib()
    for _ in range(3):
        opt.step()  # the first allocates the state (and any scratch)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    scratch = opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0
    print(json.dumps({"extra": (_rss_kib() - base) * 1024 - state, "state": state, "scratch": scratch}))


def memory(name: str, workload: str) -> dict | None:
    cmd = [sys.executable, __file__, "--memory-child", name, workload]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workloads", default="big,transformer,tiny")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return _memory_child(*args.memory_child)
    bw = copy_bandwidth(4096 * 4096)  # DRAM-sized (64 MiB): the bandwidth a large step sees
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write, 64 MiB)")
    for workload in args.workloads.split(","):
        shapes = WORKLOADS[workload]
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n== {workload}: {len(shapes)} tensors, {numel / 1e6:.2f}M elements"
              + ("" if numel * 4 > 2**25 else " (fits in cache: the DRAM roofline is only a floor)"))
        print(f"{'optimizer':30s} {'ms/step':>9s} {'roofline':>9s} {'x roof':>7s} {'scratch MB':>10s} {'extra MB':>9s}")
        for name, (family, factory) in optimizers().items():
            ms = time_steps(factory(make_params(shapes)), args.reps)
            roof = roofline(family, numel * 4, bw)
            mem = None if args.no_memory else memory(name, workload)
            scratch = f"{mem['scratch'] / 2**20:10.1f}" if mem else f"{'-':>10s}"
            peak = f"{mem['extra'] / 2**20:9.1f}" if mem else f"{'-':>9s}"
            print(f"{name:30s} {ms:9.2f} {roof:9.2f} {ms / roof:7.2f} {scratch} {peak}", flush=True)


if __name__ == "__main__":
    main()
