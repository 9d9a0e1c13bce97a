"""Benchmark suite: step time and peak extra memory of SAVEUS and DOPE (printed numbers only).

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--workloads big,transformer,tiny]
    python benchmarks/run.py --quick

Implementations: the core (refopt.SAVEUS/DOPE applied tensor by tensor) on NumPy, torch and JAX
(one jitted function over all tensors), refopt.torch with foreach=False (one tensor at a time)
and foreach=True (multi-tensor), refopt.optax under jax.jit, and as baselines
torch.optim.AdamW(foreach=True) and optax.adamw under jit; on --device cuda also the core on CuPy.
Workloads (float32): big = one 4096x4096 tensor (16.7M elements), transformer = 121 tensors of a
12-layer d=256 transformer (9.7M), tiny = 1000 tensors of 1-40 elements.

Roofline. A step must at least read param, grad and every state buffer once and write param and
every state buffer once, 4 bytes per element per pass:
    AdamW  read p,g,m,v + write p,m,v                                        =  7 passes
    SAVEUS read p,g,ema,ema_squared + write p,ema,ema_squared                =  7 passes
    DOPE   read p,g,exp_avg,fim,fim_diff,prev_grad + write p and those four  = 11 passes
The roofline time is those bytes over the copy bandwidth measured in the same run (a large copy,
read + write counted). It is a lower bound: DOPE's per-tensor reductions (D1-D3 statistics of g,
D10's mean of the new exp_avg, D12's mask count) make a streaming implementation re-read data.

Each library runs in its own worker process, so memory numbers do not bleed between libraries;
NumPy and torch memory is measured in a second worker with a fixed glibc mmap threshold (see
measure_library); see benchmarks/measure.py for what "peak extra" means.
For the jitted JAX rows it is XLA's planned temporary memory of the compiled step
(``memory_analysis().temp_size_in_bytes``; params and state are donated), since XLA keeps its
buffers between calls where the resident set cannot see them.
The run ends with the wall time of ``refopt check`` on each backend (all CPU ones; with --device
cuda the GPU ones). --quick shrinks the workloads (2048x2048; embedding + one layer, 11 tensors;
200 tiny), leaves out the core-under-jit rows, takes 2 timed steps and checks only the numpy
backend, to finish in under two minutes on 2 cores. The refopt JAX rows skip workloads of more
than 150 tensors: XLA compiles one copy of the step per tensor, ~0.5 s each on a small CPU
(see benchmarks/impls.py). The refopt check of the jax backend compiles every vector's
configuration (minutes on a small CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import impls, measure  # noqa: E402
from benchmarks.bench_torch import PASSES, WORKLOADS  # noqa: E402

QUICK = {"big": [(2048, 2048)], "transformer": WORKLOADS["transformer"][:11], "tiny": WORKLOADS["tiny"][:200]}
QUICK_SKIP = {"core jax jit"}  # refopt.optax covers JAX; one jit compile fewer per workload
BASELINE = "torch AdamW foreach=True"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def versions() -> str:
    out = []
    for mod in ("numpy", "torch", "jax", "optax", "cupy"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - absent or broken: just not listed
            pass
    return ", ".join(out)


# ---- worker ----------------------------------------------------------------------------------
def child(lib: str, workload: str, quick: bool, device: str, reps: int) -> None:
    import gc

    shapes = (QUICK if quick else WORKLOADS)[workload]
    params, grads = impls.data(shapes)
    warmup = 1 if quick or reps == 1 else 2
    for impl, build, opts in impls.IMPLS[lib]:
        if quick and impl in QUICK_SKIP:
            continue
        for opt in opts:
            row = {"impl": impl, "opt": opt}
            try:
                t0 = time.perf_counter()
                bench = build(opt, params, grads, device)
                bench.step()
                bench.sync()
                row["first_s"] = time.perf_counter() - t0  # includes jit compilation
                for _ in range(warmup - 1):
                    bench.step()
                bench.sync()
                base, cuda_base = measure.reset_peak(), _cuda_reset(lib, device)
                row["ms"] = measure.time_steps(bench.step, bench.sync, reps, warmup=0)
                row["peak"] = (bench.temp if bench.temp is not None else
                               _cuda_peak(cuda_base) if device == "cuda" else measure.peak_since_reset(base))
                row["scratch"] = bench.scratch
                del bench
            except Exception as exc:  # noqa: BLE001 - e.g. refopt.torch not written yet
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            gc.collect()
            if lib == "jax":
                import jax

                jax.clear_caches()
            print(json.dumps(row), flush=True)


def _cuda_reset(lib, device):
    if device != "cuda" or lib != "torch":
        return None
    import torch

    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _cuda_peak(base):
    if base is None:
        return None
    import torch

    return torch.cuda.max_memory_allocated() - base


def measure_library(lib, workload, args) -> list[dict]:
    """Rows of one library: step times from a worker with the default allocator; on the host, the
    NumPy/torch peak memory from a second worker whose glibc returns freed temporaries to the OS
    (MALLOC_MMAP_THRESHOLD_; it would slow the timed steps: torch's core ~5x on small tensors)."""
    rows = run_child(lib, workload, args, args.reps, {})
    if args.device == "cpu" and lib in ("numpy", "torch"):
        peaks = {(r["impl"], r["opt"]): r.get("peak")
                 for r in run_child(lib, workload, args, 1, {"MALLOC_MMAP_THRESHOLD_": "65536"})}
        for r in rows:
            r["peak"] = peaks.get((r["impl"], r["opt"]))
    return rows


def run_child(lib, workload, args, reps, env_extra) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--workloads", workload,
           "--device", args.device, "--reps", str(reps)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONPATH=_pythonpath(), **env_extra)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"impl": f"({lib} worker)", "opt": "-", "error": f"timed out after {args.timeout} s"}]
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 and not rows:
        err = (out.stderr.strip().splitlines() or ["?"])[-1][:100]
        rows = [{"impl": f"({lib} worker)", "opt": "-", "error": f"exit {out.returncode}: {err}"}]
    return rows


def _pythonpath():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH", "")) if x)


# ---- report ----------------------------------------------------------------------------------
def bandwidth(device: str) -> tuple[float, str]:
    if device == "cuda":
        bw = measure.cuda_copy_bandwidth(1 << 30)
        return bw, f"device copy {bw / 1e9:.0f} GB/s"
    bws = measure.host_copy_bandwidth(WORKLOADS["big"][0][0] * WORKLOADS["big"][0][1] * 4)
    return max(bws.values()), ", ".join(f"{k} copy {v / 1e9:.1f} GB/s" for k, v in bws.items())


def print_table(workload, shapes, rows, bw):
    numel = sum(math.prod(s) for s in shapes)
    print(f"\n== {workload}: {len(shapes)} tensors, {numel / 1e6:.2f}M float32 elements")
    base = {r["opt"]: r["ms"] for r in rows if r.get("impl") == BASELINE and "ms" in r}.get("AdamW")
    head = f"{'implementation':28s} {'opt':6s} {'ms/step':>9s} {'x AdamW':>8s} {'roof ms':>8s} {'x roof':>7s} " \
           f"{'peak+ MB':>9s} {'scratch MB':>10s} {'1st step s':>10s}"
    print(head)
    for r in sorted(rows, key=lambda r: ({"SAVEUS": 0, "DOPE": 1, "AdamW": 2}.get(r["opt"], 3))):
        if "error" in r:
            print(f"{r['impl']:28s} {r['opt']:6s}  skipped: {r['error']}")
            continue
        roof = PASSES[r["opt"]] * numel * 4 / bw * 1e3
        ratio = f"{r['ms'] / base:8.2f}" if base else f"{'-':>8s}"
        peak = f"{r['peak'] / 2**20:9.1f}" if r.get("peak") is not None else f"{'-':>9s}"
        print(f"{r['impl']:28s} {r['opt']:6s} {r['ms']:9.2f} {ratio} {roof:8.2f} {r['ms'] / roof:7.1f} "
              f"{peak} {r['scratch'] / 2**20:10.1f} {r['first_s']:10.2f}", flush=True)


def check_times(args) -> None:
    try:
        from refopt.conformance.ports import available_backends
    except ImportError as exc:
        print(f"\nrefopt check: unavailable ({exc})")
        return
    gpu = {"torch-cuda", "cupy"}
    names = [n for n in available_backends() if (n in gpu) == (args.device == "cuda")]
    if args.device == "cuda" and "jax" in available_backends():
        names += ["jax"]  # JAX's default device is the GPU when its CUDA plugin is installed
    if args.quick:
        names = names[:1]
    print("\n== refopt check (all vectors, one backend per run)")
    for name in names:
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-m", "refopt.cli", "check", "-q", "--backend", name],
                                 capture_output=True, text=True, timeout=args.timeout,
                                 env=dict(os.environ, PYTHONPATH=_pythonpath()))
            last = ((out.stdout + out.stderr).strip().splitlines() or [""])[-1][:110]
            status = f"exit {out.returncode}: {last}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout} s"
        print(f"{name:18s} {time.perf_counter() - t0:7.1f} s   {status}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small workloads, 2 timed steps, numpy check only")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workloads", default="big,transformer,tiny")
    ap.add_argument("--libraries", help="comma list (default: numpy,torch,jax on cpu; torch,cupy,jax on cuda)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps, best taken (default 5; 2 with --quick)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    ap.add_argument("--no-check", action="store_true", help="skip timing refopt check")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    if args.child:
        child(args.child, args.workloads, args.quick, args.device, args.reps)
        return 0
    t_start = time.perf_counter()
    bw, bw_text = bandwidth(args.device)
    print(f"refopt benchmarks{' (quick)' if args.quick else ''} on {args.device}: {machine()}")
    print(f"{versions()}\nbandwidth: {bw_text}; roofline uses {bw / 1e9:.1f} GB/s")
    libs = args.libraries.split(",") if args.libraries else impls.LIBRARIES[args.device]
    for workload in args.workloads.split(","):
        shapes = (QUICK if args.quick else WORKLOADS)[workload]
        rows = [r for lib in libs for r in measure_library(lib, workload, args)]
        print_table(workload, shapes, rows, bw)
    if not args.no_check:
        check_times(args)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
