"""Timing, memory and bandwidth probes for benchmarks/run.py (printed numbers only, no asserts).

Memory on the host is the peak resident set growth during the timed steps: the kernel's
high-water mark (VmHWM) is reset through /proc/self/clear_refs just before them, so the number
is the transient working set a step adds on top of what is already resident (parameters, grads,
state and any scratch kept between steps). run.py measures it in a worker with a fixed glibc mmap
threshold so freed temporaries go back to the OS instead of hiding in the heap. On CUDA it is
torch's peak allocated bytes over the steps (torch only; CuPy and JAX report '-').
"""
from __future__ import annotations

import time


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> int | None:
    """Reset the RSS high-water mark; returns the current RSS in bytes (None off Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def peak_since_reset(base: int | None) -> int | None:
    hwm = _status_kib("VmHWM")
    return None if base is None or hwm is None else max(hwm * 1024 - base, 0)


def interleaved_rounds(benches: dict, rounds: int, seed: int = 0) -> dict:
    """Seconds of ``step(); sync()`` of each bench (a ``impls.Bench`` by key), in ``rounds``
    interleaved rounds: each round steps every bench once, in a shuffled order, so that a
    machine's load changes hit all of them alike."""
    import random

    times = {key: [] for key in benches}
    order = list(benches)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            bench = benches[key]
            t0 = time.perf_counter()
            bench.step()
            bench.sync()
            times[key].append(time.perf_counter() - t0)
    return times


def median_ratio(times, base_times) -> float:
    """Median over rounds of a time / the base's time in the same round."""
    import statistics

    return statistics.median(a / b for a, b in zip(times, base_times))


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def streaming_bandwidth(device: str = "cpu", nbytes: int = 64 << 20, reps: int = 7) -> float:
    """Bytes/s of in-place streaming on preallocated buffers, the way the kernels use memory: the
    best of ``a.add_(b)`` (two reads, one write) and ``a.copy_(b)`` (one read, one write); no
    fresh allocation (whose page faults would make the roofline look easier than it is)."""
    try:
        import torch

        dev = "cuda" if device == "cuda" else "cpu"
        a = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        b = torch.ones_like(a)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def add():
            a.add_(b)
            sync()

        def copy():
            a.copy_(b)
            sync()
    except ImportError:
        import numpy as np

        a, b = np.ones(nbytes // 4, np.float32), np.ones(nbytes // 4, np.float32)

        def add():
            np.add(a, b, out=a)

        def copy():
            np.copyto(a, b)

    return max(3 * nbytes / _best(add, reps), 2 * nbytes / _best(copy, reps))
