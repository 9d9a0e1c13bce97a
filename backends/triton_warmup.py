"""Compile refopt.torch's Triton kernels for every golden vector's configuration, in parallel.

    python backends/triton_warmup.py [--device cuda] [--jobs N]

Triton compiles one kernel at a time (about 1-3 s each on one core) and the vectors need a few
hundred (each configuration of switches and dtype is its own kernel set, one kernel per sweep);
`refopt check --device cuda` would spend minutes compiling them one after the other. This script
compiles them in N processes first, into Triton's on-disk cache (``~/.triton/cache`` or
``$TRITON_CACHE_DIR``), which the check then reads: same kernels, same arguments, same cache
keys. backends/gpu_check.sh runs it before the check. With ``--device cpu`` (the script's dry
run) it only builds the kernels' sources (Triton's interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time

if __package__ in (None, ""):  # `python backends/triton_warmup.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _group_key(v) -> tuple:
    """Vectors that share a kernel set share this key (more keys than kernel sets is harmless)."""
    import json

    return (v.optimizer, v.profile, json.dumps(v.quirks, sort_keys=True), json.dumps(v.hparams, sort_keys=True),
            v.dtype, min(len(v.shape), 2))


def _compile(job) -> tuple:
    """Compile the kernels of one group of vectors; (kernels built, seconds, error or None)."""
    device, ids = job
    import torch

    from refopt import fused
    from refopt.conformance import load
    from refopt.torch import _fused, _triton

    torch_dtype = {name: dtype for dtype, name in _fused.DTYPES.items()}
    t0, done = time.perf_counter(), 0
    for v in load(ids=ids):
        numel = math.prod(v.shape)
        if numel == 0:
            continue
        rows = v.shape[0] if len(v.shape) >= 2 else 1
        cols = numel // rows
        core = v.make_reference()
        try:
            kernel = fused.kernel_for(core, len(v.shape), v.dtype, rows, cols, target="triton")
        except fused.TraceError:
            continue  # not fusable: the check's fused=True port reports it
        try:
            tensors = {name: _triton._flat(torch.zeros(numel, dtype=torch_dtype[v.dtype], device=device))
                       for name in kernel.inputs}
            values = fused.values_of(core, 0, rows, cols)
            kernel.compile(tensors, rows, cols, _triton._values(kernel.params, values, float(values["lr"]),
                                                                torch.device(device)))
        except Exception as exc:  # noqa: BLE001 - reported; the check shows the failure too
            return done, time.perf_counter() - t0, f"{v.id}: {type(exc).__name__}: {exc}"
        done += 1
    return done, time.perf_counter() - t0, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    from refopt.conformance import load

    groups: dict = {}
    for v in load():
        groups.setdefault(_group_key(v), []).append(v.id)
    jobs = [(args.device, ids) for ids in groups.values()]
    t0 = time.perf_counter()
    errors, built = [], 0
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for done, _, error in pool.imap_unordered(_compile, jobs):
            built += done
            if error:
                errors.append(error)
    print(f"{built} kernel sets for {len(jobs)} vector configurations in {time.perf_counter() - t0:.0f} s "
          f"({args.jobs} processes, device {args.device})")
    for e in errors:
        print(f"!! {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
