"""The Triton kernels of refopt.fused (triton_source.py) on torch tensors: CUDA tensors, or CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` before triton is imported; the tests
run it so).

A step's module is written to the kernel cache (``$REFOPT_KERNEL_CACHE/triton``, next to the C
kernels) and imported from there (Triton reads a kernel's source from its file); Triton compiles
each kernel on first launch for a tile shape and keeps it in its own cache (``~/.triton``).
A ``TritonKernel`` launches the sweeps in order on the tensors' stream; between two launches the
programs' partial sums are added on the device (``torch.sum``, float64), so nothing waits for
the GPU. Buffers: the rows x slots table of row results and a few per-program sums, small
beside the parameter unless its rows are very short, allocated once per shape and stream and
kept (see ``TritonKernel._plans``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass

from .build import cache_dir
from .schedule import walk
from .symbolic import guards_hold
from .triton_source import HEAD, TritonProgram

_MODULES: dict = {}
_LOCK = threading.Lock()


class TritonUnavailable(RuntimeError):
    """triton cannot be imported here: the CUDA fused path is not available."""


def triton_module():
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - missing, or a broken install: no Triton path
        raise TritonUnavailable(f"triton cannot be imported ({type(exc).__name__}: {exc})") from None
    return triton


def available() -> bool:
    try:
        triton_module()
        return True
    except TritonUnavailable:
        return False


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (on CPU tensors) in this process."""
    triton = triton_module()
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_module(source: str, name: str):
    """The Python module of ``source`` (written to the cache directory once, then imported)."""
    triton_module()
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    with _LOCK:
        module = _MODULES.get(key)
        if module is not None:
            return module
        folder = cache_dir() / "triton"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_{key}.py"
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(source)
            tmp.replace(path)  # atomic: another process may write the same module
        module_name = f"refopt_triton_{name}_{key}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _MODULES[key] = module
        return module


@dataclass(frozen=True)
class Tiling:
    """How a launch cuts the tensor: tiles of about ``elements`` elements, at most ``max_cols``
    columns wide (R rows x C columns, powers of two); a sweep without row reductions splits the
    columns of its rows until there are ``min_programs`` programs (a 1-D tensor spread over the
    GPU). ``num_warps``: Triton's warps per program."""

    elements: int = 1024
    max_cols: int = 1024
    min_programs: int = 1024
    num_warps: int = 4


#: Launch plans a kernel keeps (TritonKernel._plans): shapes x streams x threads.
MAX_PLANS = 256
#: On the GPU: 8 elements a thread. Under the interpreter every program is a Python loop step:
#: large tiles, few programs.
GPU = Tiling()
INTERPRETER = Tiling(elements=1 << 15, max_cols=1 << 12, min_programs=1, num_warps=1)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_shape(rows: int, cols: int, splits: bool, tiling: Tiling) -> tuple:
    """(grid, chunk, R, C) of one sweep's launch."""
    c = min(_pow2(cols), tiling.max_cols)
    r = min(max(1, tiling.elements // c), _pow2(rows))
    row_tiles = -(-rows // r)
    chunk = cols
    if splits and row_tiles < tiling.min_programs and cols > c:
        per_row = min(-(-tiling.min_programs // row_tiles), -(-cols // c))
        chunk = -(-cols // (per_row * c)) * c  # a whole number of column blocks
    return (row_tiles, -(-cols // chunk)), chunk, r, c


class TritonKernel:
    """The Triton kernels of one traced step: ``kernel(tensors, rows, cols, params)`` updates the
    tensors in place (``tensors``: name -> a flat contiguous tensor, bfloat16 ones viewed as
    int16; ``params``: the run-time values in ``self.params`` order, a float64 tensor on their
    device)."""

    def __init__(self, traced, program: TritonProgram, source: str, module):
        self.program, self.program_source, self.module = program, source, module
        self.inputs, self.params = program.inputs, program.params
        self.guards = traced.trace.guards
        #: run-time values the guards read on the host (a device-resident one cannot be among them)
        self.guarded_params = frozenset(n.args[0] for node, _ in self.guards for n in walk([node]) if n.op == "param")
        self.sweeps = program.n_sweeps
        self._kernels = [getattr(module, s["kernel"]) for s in program.sweeps]
        self._compiled: set = set()
        #: (rows, cols, device, tiling, stream, thread) -> the launches of a step of that shape and
        #: the small device buffers they share (row results, sums): built once, reused by every
        #: tensor of that shape and every step. One thread's launches on one stream run in order,
        #: so a tensor's sweeps are done with the buffers before the next tensor's first sweep
        #: writes them.
        self._plans: dict = {}

    def __call__(self, tensors: dict, rows: int, cols: int, params, tiling: Tiling | None = None) -> None:
        """Launch the sweeps in order (asynchronously, on the current stream)."""
        self._launch(tensors, rows, cols, params, tiling, warmup=False)

    def compile(self, tensors: dict, rows: int, cols: int, params, tiling: Tiling | None = None) -> None:
        """Compile every sweep for such a call without launching any (so that a kernel that does
        not compile fails before the first sweep has written anything); cheap once done."""
        key = (rows == 1, cols == 1, cols % 16, str(params.device), tiling, *(t.dtype for t in tensors.values()))
        if key not in self._compiled:
            self._launch(tensors, rows, cols, params, tiling, warmup=True)
            self._compiled.add(key)

    def _launch(self, tensors, rows, cols, params, tiling, warmup: bool) -> None:
        import torch

        tiling = tiling or (INTERPRETER if params.device.type == "cpu" else GPU)
        arrays = [tensors[name] for name in self.inputs]
        if warmup:
            for kernel, grid, chunk, options, partials, _, _, rowvals, totals in self._sweeps(rows, cols, params.device,
                                                                                             tiling):
                kernel.warmup(params, rowvals, totals, partials, rows, cols, chunk, *arrays, grid=grid, **options)
            return
        stream = torch.cuda.current_stream(params.device).cuda_stream if params.device.type == "cuda" else None
        key = (rows, cols, params.device, tiling, stream, threading.get_ident())
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:  # threads or streams that come and go: start afresh
                self._plans.clear()
            plan = self._plans[key] = self._sweeps(rows, cols, params.device, tiling)
        for kernel, grid, chunk, options, partials, first, n, rowvals, totals in plan:
            kernel[grid](params, rowvals, totals, partials, rows, cols, chunk, *arrays, **options)
            if n:
                torch.sum(partials, dim=1, out=totals[first:first + n])

    def _sweeps(self, rows, cols, device, tiling) -> list:
        """Per sweep: (kernel, grid, chunk, launch options, partial sums, first total, number of
        totals, row results, totals), the buffers allocated here on ``device``."""
        import torch

        program = self.program
        rowvals = torch.empty(rows * program.n_slots if program.row_slots else 1, dtype=torch.float64, device=device)
        totals = torch.empty(max(program.n_totals, 1), dtype=torch.float64, device=device)
        out = []
        for sweep, kernel in zip(program.sweeps, self._kernels):
            grid, chunk, r, c = launch_shape(rows, cols, sweep["splits"], tiling)
            first, n = (sweep["totals"][0], len(sweep["totals"])) if sweep["totals"] else (0, 0)
            partials = torch.empty((n, grid[0] * grid[1]), dtype=torch.float64, device=device) if n else totals
            options = dict(R=r, C=c, num_warps=tiling.num_warps, enable_fp_fusion=False)
            out.append((kernel, grid, chunk, options, partials, first, n, rowvals, totals))
        return out

    def valid_for(self, values: dict) -> bool:
        return guards_hold(self.guards, values)


def build(optimizer, traced, dtype: str) -> TritonKernel:
    program = TritonProgram(traced, name=f"refopt_{optimizer.facts.key}")
    source = program.source()
    return TritonKernel(traced, program, source, load_module(source, f"{optimizer.facts.key}_{dtype}"))


def compile_ahead(kernel: TritonKernel, dtype: str, r: int, c: int, capability: int = 90) -> list:
    """The PTX of each sweep of ``kernel`` for a tensor of ``dtype`` and tiles of r x c, compiled
    for an NVIDIA GPU of compute ``capability`` as a launch would (no GPU needed: Triton's
    compiler and the ptxas it ships run on the CPU); the tests read it for approximate or fused
    operations."""
    triton = triton_module()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = {"float16": "*fp16", "bfloat16": "*i16", "float32": "*fp32", "float64": "*fp64"}[dtype]
    # HEAD's float64 pointers, then its ints (rows, cols, chunk), then the tensors
    signature = {**{name: "*fp64" if k < len(HEAD) - 3 else "i32" for k, name in enumerate(HEAD)},
                 **{f"in_{name}": pointer for name in kernel.inputs}, "R": "constexpr", "C": "constexpr"}
    out = []
    for fn in kernel._kernels:
        source = ASTSource(fn=fn, signature=signature, constexprs={"R": r, "C": c})
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"enable_fp_fusion": False, "num_warps": GPU.num_warps})
        out.append(compiled.asm["ptx"])
    return out
