"""Where the fused CPU kernels' time goes, sweep by sweep (printed numbers only).

    python benchmarks/sweeps.py [--rows 4096] [--cols 4096] [--rounds 15] [--threads N]

Each optimizer's C kernel (refopt.fused, at its defaults, float32) is built a second time with a
clock read between its sweeps (``Program(stamps=True)``) and stepped in interleaved rounds with
``torch.optim.AdamW(fused=True)`` on a tensor of the same size, so its total is a ratio from the
same rounds. Per sweep it prints the passes over memory the sweep makes (arrays read + arrays
written), its operations on the divide/square-root unit per element (which, unlike adds and
multiplies, a core does a few at a time), its time, the bandwidth that time implies, and its time
per element twice: on the workload, and on a tensor of 16 rows that stays in cache. A sweep that
is about as slow per element in cache as out of it is bound by computation, not by memory.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys

if __package__ in (None, ""):  # `python benchmarks/sweeps.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import impls, measure  # noqa: E402
from benchmarks.run import machine, versions  # noqa: E402

CACHE_ROWS = 16  # x cols float32 per array: all arrays of the step fit in a core's L2


class StampedKernel:
    """A fused kernel built with a clock read between sweeps, on torch tensors it owns."""

    def __init__(self, optimizer, rows: int, cols: int, threads: int, seed: int = 0):
        import torch

        from refopt import fused
        from refopt.fused.build import load
        from refopt.fused.c_source import Program

        kernel = fused.kernel_for(optimizer, 2, "float32", rows, cols)
        self.program = Program(kernel.program.traced, name=f"{kernel.program.name}_stamped", stamps=True)
        lib = load(self.program.source(), f"{optimizer.facts.key}-stamped")
        self._fn = getattr(lib, self.program.name)
        self._fn.restype = ctypes.c_int
        self._stamps = (ctypes.c_double * (self.program.n_sweeps + 1)).in_dll(lib, f"{self.program.name}_stamps")
        gen = torch.Generator().manual_seed(seed)
        self.tensors = {name: torch.randn(rows, cols, generator=gen) * 0.01 for name in self.program.inputs}
        for name in optimizer.facts.buffers:
            self.tensors[name].zero_()
        values = fused.values_of(optimizer, 0, rows, cols)
        self._values = (ctypes.c_double * len(self.program.params))(*[float(values[p]) for p in self.program.params])
        self._step_index = self.program.params.index("step")
        self.rows, self.cols, self.threads, self.count = rows, cols, threads, 0

    def step(self) -> list:
        """One step; returns each sweep's seconds."""
        self._values[self._step_index] = float(self.count)
        self.count += 1
        pointers = [ctypes.c_void_p(self.tensors[name].data_ptr()) for name in self.program.inputs]
        if self._fn(self._values, self.rows, self.cols, self.threads, *pointers):
            raise MemoryError("the kernel could not allocate its per-row results")
        return [self._stamps[i + 1] - self._stamps[i] for i in range(self.program.n_sweeps)]


def _adamw(rows, cols):
    import torch

    p = torch.nn.Parameter(torch.randn(rows, cols) * 0.01)
    p.grad = torch.randn(rows, cols) * 0.01
    opt = torch.optim.AdamW([p], fused=True)
    opt.step()
    return opt.step


def profile(name: str, rows: int, cols: int, rounds: int, threads: int) -> None:
    import refopt

    optimizer = getattr(refopt, name)()
    big = StampedKernel(optimizer, rows, cols, threads)
    small = StampedKernel(optimizer, CACHE_ROWS, cols, threads)
    for _ in range(3):  # warm up: state away from zero, pages touched
        big.step()
    per_sweep = []
    benches = {"kernel": impls.Bench(lambda: per_sweep.append(big.step()), impls._noop),
               "adamw": impls.Bench(_adamw(rows, cols), impls._noop)}
    times = measure.interleaved_rounds(benches, rounds)
    totals = [sum(sweeps) for sweeps in per_sweep]
    in_cache = [small.step() for _ in range(max(rounds, 30) * 20)][20:]
    ratio = measure.median_ratio(times["kernel"], times["adamw"])
    ms = statistics.median(totals) * 1e3
    print(f"\n== {name}: one {rows}x{cols} float32 tensor, {threads} thread(s): kernel {ms:.1f} ms a step "
          f"(sum of its sweeps), {ratio:.2f}x torch.optim.AdamW(fused=True) "
          f"({statistics.median(times['adamw']) * 1e3:.1f} ms) in the same rounds")
    print(f"{'sweep':>5} {'passes (read+written)':>24} {'div+sqrt':>9} {'ms':>8} {'GB/s':>7} "
          f"{'ns/elem':>8} {'in cache':>9}  bound")
    numel, small_numel = rows * cols, CACHE_ROWS * cols
    for i, cost in enumerate(big.program.sweep_costs()):
        seconds = statistics.median(s[i] for s in per_sweep)
        cached = statistics.median(s[i] for s in in_cache)
        passes = len(cost["reads"]) + len(cost["writes"])
        per_elem, per_elem_cached = seconds / numel * 1e9, cached / small_numel * 1e9
        bound = "computation" if per_elem_cached > 0.8 * per_elem else "memory"
        print(f"{cost['sweep']:>5} {passes:>10} ({len(cost['reads'])}+{len(cost['writes'])}) {'':>8} "
              f"{cost['divider']:>9} {seconds * 1e3:>8.2f} {passes * 4 * numel / seconds / 1e9:>7.1f} "
              f"{per_elem:>8.3f} {per_elem_cached:>9.3f}  {bound}")


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="kernel threads (default: torch's, as refopt.torch uses)")
    ap.add_argument("--optimizers", default="DOPE,SAVEUS")
    args = ap.parse_args(argv)
    print(f"refopt sweep profile on cpu: {machine()}")
    print(versions())
    for name in args.optimizers.split(","):
        profile(name, args.rows, args.cols, args.rounds, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
