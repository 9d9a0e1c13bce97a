"""Where refopt.torch's time goes on a GPU: one parameter's step split into host and device time.

    python backends/triton_profile.py [--device cuda] [--rows 4096] [--cols 4096] [--steps 20]

For DOPE and SAVEUS (refopt.torch, fused=True) and torch.optim.AdamW(fused=True), on one
rows x cols float32 parameter, it prints the median over steps of: the step's wall time (the
device synchronized before and after), the host time until ``step()`` returns (Python and
kernel launches, which do not wait for the device), and the device's busy time (the kernels'
durations from torch.profiler, by kernel). A step whose host time is about its wall time, with
the device busy for much less, is bound by launches and Python, not by the GPU.
backends/gpu_check.sh runs it; ``--device cpu`` (its dry run) runs Triton's interpreter on a
small tensor and reports CPU times only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # `python backends/triton_profile.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _optimizer(name: str, param):
    import torch

    import refopt.torch

    if name == "AdamW":
        return torch.optim.AdamW([param], fused=True)
    return getattr(refopt.torch, name)([param], fused=True)


def profile(name: str, device: str, rows: int, cols: int, steps: int) -> str:
    import torch

    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter((torch.randn(rows, cols, generator=gen) * 0.01).to(device))
    param.grad = (torch.randn(rows, cols, generator=gen) * 0.01).to(device)
    opt = _optimizer(name, param)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        opt.step()
    sync()
    wall, host = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        sync()
        wall.append(time.perf_counter() - t0)
        host.append(t1 - t0)
    line = f"{name:7s} step {statistics.median(wall) * 1e3:8.3f} ms   host until step() returns " \
           f"{statistics.median(host) * 1e3:8.3f} ms"
    if device != "cuda":
        return line
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        sync()
    kernels = {}
    for event in prof.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time / steps
    busy = sum(kernels.values()) / 1e3
    top = ", ".join(f"{k[:40]} {v:.0f} us" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:6])
    return f"{line}   device busy {busy:8.3f} ms ({top})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=None, help="default 4096 (cuda), 64 (cpu)")
    ap.add_argument("--cols", type=int, default=None, help="default 4096 (cuda), 256 (cpu)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.device == "cpu":  # the dry run: Triton's interpreter on CPU tensors
        from refopt.torch import _triton

        _triton.ON_CPU = True
    rows = args.rows or (4096 if args.device == "cuda" else 64)
    cols = args.cols or (4096 if args.device == "cuda" else 256)
    print(f"one {rows}x{cols} float32 parameter on {args.device}, median of {args.steps} steps")
    for name in ("DOPE", "SAVEUS", "AdamW"):
        print(profile(name, args.device, rows, cols, args.steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
