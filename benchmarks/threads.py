"""How refopt.torch's CPU step scales with ``cpu_threads`` on this machine: the measurement
behind its default (None: torch's own thread count, ``torch.get_num_threads()``).

    python benchmarks/threads.py [--workloads big,transformer] [--rounds 7]

Each workload builds refopt.torch SAVEUS and DOPE at ``cpu_threads`` = 1, 2, 4, ... up to
torch's count and at the default, then times them in interleaved rounds (each round steps every
setting once, in shuffled order) and prints the median ms per step and the ratio to the default
in the same rounds. On another machine, rerun it before choosing a value by hand.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import impls  # noqa: E402
import measure  # noqa: E402


def settings(available: int) -> list:
    counts, n = [], 1
    while n < available:
        counts.append(n)
        n *= 2
    return [None] + counts + [available]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="big,transformer")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    import torch

    available = torch.get_num_threads()
    print(f"refopt.torch cpu_threads on {available} torch threads; torch {torch.__version__}")
    for workload in args.workloads.split(","):
        params, grads = impls.data(impls.WORKLOADS[workload])
        for name in ("SAVEUS", "DOPE"):
            benches = {n: impls.refopt_torch(cpu_threads=n)(name, params, grads, "cpu") for n in settings(available)}
            times = measure.interleaved_rounds(benches, args.rounds)
            for n, ts in times.items():
                ratio = measure.median_ratio(ts, times[None])
                label = "default (None)" if n is None else f"cpu_threads={n}"
                print(f"{workload:12s} {name:7s} {label:16s} {statistics.median(ts) * 1e3:8.2f} ms  {ratio:5.2f} x default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
