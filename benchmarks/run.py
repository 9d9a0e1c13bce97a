"""Benchmark suite: step time and peak extra memory of SAVEUS and DOPE (printed numbers only).

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--workloads big,transformer,tiny]
                             [--compare torch:MODULE:CLASS] [--compare optax:MODULE:FACTORY] ...

Ratios are measured, never divided across runs. For each workload and array library one worker
process builds every implementation of that library, then times them in interleaved rounds (each
round steps every implementation once, in a shuffled order); a ratio is the median over rounds of
(implementation's time / baseline's time in the same round). The baseline is what a user would
pick instead: ``torch.optim.AdamW(fused=True)`` for torch, ``optax.adamw`` under ``jax.jit`` for
JAX. ``--compare`` adds a port of your own to the same rounds (the public PyTorch code, say:
``--compare torch:orig_dope:DOPE`` with ``orig_dope.py`` on your ``PYTHONPATH``), and prints the
refopt rows' ratio to it as well.

Implementations: refopt.torch at its defaults (on CPU: the fused kernels of refopt.fused) and with
``fused=False`` (the eager kernels), the core applied tensor by tensor on torch / NumPy / JAX
(under one ``jax.jit``), refopt.optax under jit; on --device cuda also the core on CuPy. JAX
rows time one jitted ``update`` + ``optax.apply_updates`` with parameters and state donated and
the gradients passed in, at JAX's defaults (no x64). refopt.optax's kernel writes the updates over
the gradient's buffer, so XLA copies a gradient passed in like this first, into a freshly
allocated buffer: one read, one write and the page faults of new memory, which a training step
computing its gradients inside the same jit does not pay; the row "jax grads copy (fresh
buffers)" times that copy alone in the same rounds.
Workloads (float32): big = one 4096x4096 tensor (16.7M elements), transformer = 121 tensors of a
12-layer d=256 transformer (9.7M), tiny = 1000 tensors of 1-40 elements.

Roofline. A step must at least read p, grad and every state buffer and write p and every buffer:
AdamW and SAVEUS 7 passes, DOPE 11 (of 4 bytes per element). The roofline is those bytes over the
in-place streaming bandwidth measured in the same worker, the way the kernels use memory: the
best of ``a.add_(b)`` (two reads, one write) and ``a.copy_(b)`` on preallocated 64 MB tensors,
no fresh allocation. It is a lower bound: DOPE's whole-tensor reductions (D3's norm, D12's count)
make any exact implementation read its inputs more than once.

Memory: the peak resident-set growth during one step (VmHWM reset through /proc/self/clear_refs),
in a second worker whose glibc returns freed temporaries to the OS (MALLOC_MMAP_THRESHOLD_), so
that temporaries show; for jitted JAX, XLA's planned temporaries. --quick shrinks the workloads
(2048x2048; 11 transformer tensors; 200 tiny) and the rounds, to finish in a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import impls, measure  # noqa: E402

QUICK = {"big": [(2048, 2048)], "transformer": impls.WORKLOADS["transformer"][:11],
         "tiny": impls.WORKLOADS["tiny"][:200]}


def machine() -> str:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
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
def _compare_builders(lib: str, specs: list) -> list:
    """(label, builder, optimizers) for each --compare port of this library."""
    out = []
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if (kind == "torch") != (lib == "torch") or (kind == "optax") != (lib == "jax"):
            continue
        from refopt.conformance.adapters import load_object

        obj = load_object(rest, kind)
        opt = "DOPE" if "dope" in rest.lower() else "SAVEUS" if "saveus" in rest.lower() else "AdamW"
        build = impls.torch_port(obj) if kind == "torch" else impls.optax_port(obj)
        out.append((spec, build, (opt,)))
    return out


def child(lib: str, workload: str, quick: bool, device: str, rounds: int, memory: bool, compare: list) -> None:
    shapes = (QUICK if quick else impls.WORKLOADS)[workload]
    params, grads = impls.data(shapes)
    benches, rows = {}, {}
    for impl, build, opts in impls.IMPLS[lib] + _compare_builders(lib, compare):
        for opt in opts:
            key = (impl, opt)
            rows[key] = {"impl": impl, "opt": opt}
            try:
                t0 = time.perf_counter()
                bench = build(opt, params, grads, device)
                bench.step()
                bench.sync()
                rows[key]["first_s"] = time.perf_counter() - t0  # includes compilation
                benches[key] = bench
            except Exception as exc:  # noqa: BLE001 - a library or configuration not available here
                rows[key]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    if memory:
        for key, bench in benches.items():
            gc.collect()
            base = measure.reset_peak()
            bench.step()
            bench.sync()
            rows[key]["peak"] = bench.temp if bench.temp is not None else measure.peak_since_reset(base)
        for row in rows.values():
            print(json.dumps(row), flush=True)
        return
    times = measure.interleaved_rounds(benches, rounds)
    bandwidth = measure.streaming_bandwidth(device)
    for key, row in rows.items():
        if key in times:
            row["ms"] = statistics.median(times[key]) * 1e3
            row["rounds"] = [t * 1e3 for t in times[key]]
            row["scratch"] = benches[key].scratch
        row["bandwidth"] = bandwidth
        print(json.dumps(row), flush=True)


def run_child(lib, workload, args, memory: bool) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--workloads", workload,
           "--device", args.device, "--rounds", str(args.rounds)] + (["--quick"] if args.quick else []) + \
          (["--memory"] if memory else []) + [x for spec in args.compare for x in ("--compare", spec)]
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
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
def _ratio(row, base) -> float | None:
    """Median over rounds of row's time / base's time in the same round."""
    if base is None or "rounds" not in row or "rounds" not in base:
        return None
    return measure.median_ratio(row["rounds"], base["rounds"])


def print_table(lib, workload, shapes, rows, compare):
    numel = sum(math.prod(s) for s in shapes)
    ok = [r for r in rows if "ms" in r]
    base = next((r for r in ok if r["opt"] == "AdamW" and not r["impl"].startswith(tuple(compare))), None)
    bw = next((r["bandwidth"] for r in rows if r.get("bandwidth")), None)
    print(f"\n== {workload} on {lib}: {len(shapes)} tensors, {numel / 1e6:.2f}M float32 elements; "
          f"baseline {base['impl'] if base else '-'}; streaming bandwidth "
          f"{bw / 1e9:.1f} GB/s" if bw else "")
    head = (f"{'implementation':34s} {'opt':6s} {'ms/step':>8s} {'x base':>7s} {'roof ms':>8s} {'x roof':>7s} "
            f"{'peak+ MB':>9s} {'1st s':>6s}")
    print(head)
    for r in sorted(rows, key=lambda r: ({"SAVEUS": 0, "DOPE": 1, "AdamW": 2}.get(r["opt"], 3), r["impl"])):
        if "error" in r:
            print(f"{r['impl']:34s} {r['opt']:6s}  skipped: {r['error']}")
            continue
        if "ms" not in r:
            continue
        roof = impls.PASSES.get(r["opt"], 7) * numel * 4 / bw * 1e3 if bw else float("nan")
        ratio = _ratio(r, base)
        peak = f"{r['peak'] / 2**20:9.1f}" if r.get("peak") is not None else f"{'-':>9s}"
        print(f"{r['impl']:34s} {r['opt']:6s} {r['ms']:8.2f} {ratio if ratio is not None else float('nan'):7.2f} "
              f"{roof:8.2f} {r['ms'] / roof:7.2f} {peak} {r.get('first_s', float('nan')):6.2f}", flush=True)
    for spec in compare:
        for r in ok:
            ref = next((c for c in ok if c["impl"] == spec and c["opt"] == r["opt"]), None)
            if ref is not None and r["impl"] != spec and r["impl"].startswith("refopt"):
                print(f"   {r['impl']} {r['opt']}: {_ratio(r, ref):.2f} x {spec} (same rounds)")


def check_times(args) -> None:
    try:
        from refopt.conformance.backends import available_backends
    except ImportError as exc:
        print(f"\nrefopt check: unavailable ({exc})")
        return
    gpu = {"torch-cuda", "cupy"}
    names = [n for n in available_backends() if (n in gpu) == (args.device == "cuda")]
    if args.quick:
        names = names[:1]
    print("\n== refopt check, every installed backend of this device")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "refopt.cli", "check", "-q"] + [x for n in names for x in ("--backend", n)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                         env=dict(os.environ, PYTHONPATH=_pythonpath()))
    last = ((out.stdout + out.stderr).strip().splitlines() or [""])[-1][:110]
    print(f"{','.join(names):40s} {time.perf_counter() - t0:7.1f} s   exit {out.returncode}: {last}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small workloads and few rounds")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workloads", default="big,transformer,tiny")
    ap.add_argument("--libraries", help="comma list (default: torch,jax,numpy on cpu; torch,cupy,jax on cuda)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 9; 4 with --quick)")
    ap.add_argument("--compare", action="append", default=[], metavar="torch:MODULE:CLASS|optax:MODULE:FACTORY",
                    help="a port of your own to time in the same rounds (repeatable)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    ap.add_argument("--no-check", action="store_true", help="skip timing refopt check")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 9)
    if args.child:
        child(args.child, args.workloads, args.quick, args.device, args.rounds, args.memory, args.compare)
        return 0
    t_start = time.perf_counter()
    print(f"refopt benchmarks{' (quick)' if args.quick else ''} on {args.device}: {machine()}")
    print(versions())
    libs = args.libraries.split(",") if args.libraries else impls.LIBRARIES[args.device]
    for workload in args.workloads.split(","):
        shapes = (QUICK if args.quick else impls.WORKLOADS)[workload]
        for lib in libs:
            rows = run_child(lib, workload, args, memory=False)
            if args.device == "cpu":
                peaks = {(r["impl"], r["opt"]): r.get("peak") for r in run_child(lib, workload, args, memory=True)}
                for r in rows:
                    r["peak"] = peaks.get((r["impl"], r["opt"]), r.get("peak"))
            print_table(lib, workload, shapes, rows, args.compare)
    if not args.no_check:
        check_times(args)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
