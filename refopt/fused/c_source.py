"""From a traced step (symbolic.py) to one C function that updates a tensor in place.

Schedule (schedule.py): one sweep over the tensor per global reduction, closed by it, the last
one writing the outputs in place; within a sweep, rows processed one at a time and in parallel
(OpenMP), one loop over the row per pass of row reductions (the row being in cache), then the
last loop. A value computed in one loop of a row and used in a later one is kept in a per-thread
row buffer unless it is cheap to compute again. Row results are kept for later sweeps.

Arithmetic. Each node is one C operation in its dtype: float32 values are ``float``, float64
``double``, Python numbers ``double`` (weak: converted where they meet an array's dtype, as in
the core), 16-bit values ``float`` holding a value exactly representable in the 16-bit dtype.
The library is compiled with ``-ffp-contract=off`` (no fused multiply-add) and without
``-ffast-math``: every operation rounds as IEEE 754 says, so per element the kernel computes
exactly what the core computes. Reductions accumulate in double and may sum in any order
(spec/numerics.md, freedom 1); D3's sum still overflows to infinity where W's would.

Division by a step scalar. A float32 ``sqrt(x) / c`` with ``c`` the same for the whole tensor
(D7's ``sqrt(fim) / sqrt(b2)``, SAVEUS's ``sqrt(v) / sqrt(bc2)``) is computed as
``(float)((double)sqrt(x) * (1.0 / (double)c))``: a multiply instead of a division, which bounds
these loops on the CPU. It is the correctly rounded float32 quotient, bit for bit, whenever that
quotient is not subnormal: the double result is within 2**-52 (relative) of x/c, and a quotient
of two float32s is never a float32 rounding midpoint nor within 2**-49 (relative) of one (a
midpoint has 25 significant bits, so ``x = midpoint * c`` would need more than 24), so both
round to the same float32; zeros, infinities and NaN come out as IEEE division gives them. A
positive float32 square root is at least 2**-74.5, so the quotient is subnormal only if |c| >
2**51: each such loop is emitted twice and the one with divisions runs when a divisor is that
large (tests/adapters/test_fused_reciprocal.py checks the identity and both loops).
"""
from __future__ import annotations

import functools
import math

from .schedule import Schedule, deps
from .symbolic import ELEM, FLOATS, SCALAR, Node, TraceError

CTYPE = {"float16": "float", "bfloat16": "float", "float32": "float", "float64": "double", "weak": "double",
         "weak_int": "int64_t", "int32": "int32_t", "int64": "int64_t", "bool": "int"}
#: how a 16-bit dtype is stored in memory
STORAGE = {"float16": "uint16_t", "bfloat16": "uint16_t", "float32": "float", "float64": "double"}
BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "gt": ">", "ge": ">=", "lt": "<", "le": "<=",
          "eq": "==", "ne": "!="}
REDUCTIONS = ("row_sum", "row_mean", "global_sum", "global_mean")
#: Elements per block of a sum: partial sums in the operand's type, then added in double.
BLOCK = 512
#: Partial sums per block (see Program._iterate); a power of two.
LANES = 16

PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>

/* 16-bit values live in floats that hold an exactly representable value. */
static inline float bf16_round(float x) {          /* to nearest, ties to even */
    uint32_t u; memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x; /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); u &= 0xffff0000u;
    float y; memcpy(&y, &u, 4); return y;
}
static inline float bf16_load(uint16_t b) { uint32_t u = (uint32_t)b << 16; float y; memcpy(&y, &u, 4); return y; }
static inline uint16_t bf16_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return (uint16_t)(u >> 16); }
static inline float f16_round(float x) { return (float)(_Float16)x; }
static inline float f16_load(uint16_t b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }
static inline uint16_t f16_bits(float x) { _Float16 h = (_Float16)x; uint16_t b; memcpy(&b, &h, 2); return b; }
/* minimum/maximum as the array API and torch define them: NaN propagates */
static inline float minf_nan(float a, float b) { return (a != a || a < b) ? a : b; }
static inline float maxf_nan(float a, float b) { return (a != a || a > b) ? a : b; }
static inline double min_nan(double a, double b) { return (a != a || a < b) ? a : b; }
static inline double max_nan(double a, double b) { return (a != a || a > b) ? a : b; }
/* 1 / c in double for a float c; not inlined, so that no compiler can skip c's rounding to float */
__attribute__((noinline)) static double reciprocal_of(float c) { return 1.0 / (double)c; }
"""


class Program:
    """The C source of one traced step (its schedule: ``self.schedule``)."""

    def __init__(self, traced, name: str = "refopt_step", *, stamps: bool = False):
        """``stamps``: record ``omp_get_wtime()`` before the first sweep and after each one in the
        global array ``NAME_stamps`` (benchmarks/sweeps.py times the sweeps with it)."""
        self.traced, self.name, self.stamps = traced, name, stamps
        self.schedule = Schedule(traced, row_buffers=True, ctype=CTYPE.get)
        self.inputs = self.schedule.inputs             # pointer arguments, in order
        self.params = self.schedule.params             # double/int64 arguments, in order
        self.outputs = traced.outputs
        self.n_sweeps = self.schedule.n_sweeps
        self.n_buffers = self.schedule.n_buffers
        self.row_slots, self.n_slots = self.schedule.row_slots, self.schedule.n_slots
        self._names = {}
        self._reciprocal = {}      # id(divisor) -> (reciprocal, guard) variable names, once declared
        self._fast_division = False  # while emitting a loop's fast copy

    # ---- naming -----------------------------------------------------------------------------
    def var(self, n: Node) -> str:
        return self._names.setdefault(id(n), f"v{len(self._names)}")

    # ---- expressions --------------------------------------------------------------------------
    def expr(self, n: Node) -> str:
        a = [self.ref(x) for x in deps(n)]
        if n.op == "load":
            load = {"bfloat16": "bf16_load", "float16": "f16_load"}.get(n.dtype, "")
            return f"{load}(row_{n.args[0]}[j])"
        if n.op == "param":
            return f"p_{n.args[0]}"
        if n.op == "const":
            return _literal(n.args[0], n.dtype)
        if n.op == "cast":
            return self.cast(a[0], n.args[0].dtype, n.dtype)
        if n.op == "div" and self._fast_division and _by_step_scalar(n):
            return f"((float)((double){a[0]} * {self._reciprocal[id(n.args[1])][0]}))"
        if n.op in BINARY:
            return f"({a[0]} {BINARY[n.op]} {a[1]})"
        if n.op in ("min", "max"):
            return f"{n.op}{'f' if CTYPE[n.dtype] == 'float' else ''}_nan({a[0]}, {a[1]})"
        if n.op == "pow":
            if CTYPE[n.dtype] != "double":
                raise TraceError("a float32 power: only binary64 powers are fused (D11 evaluates in S)")
            return f"pow({a[0]}, {a[1]})"
        if n.op == "sqrt":
            return f"sqrt{'f' if CTYPE[n.dtype] == 'float' else ''}({a[0]})"
        if n.op == "neg":
            return f"(-{a[0]})"
        if n.op == "isinf":  # branch-free, so the loop vectorizes
            src = n.args[0].dtype
            return f"(fabs{'f' if CTYPE[src] == 'float' else ''}({a[0]}) == INFINITY)"
        if n.op == "isnan":
            return f"({a[0]} != {a[0]})"
        if n.op == "where":
            return f"({a[0]} ? {a[1]} : {a[2]})"
        raise TraceError(f"no C for operation {n.op!r}")

    @staticmethod
    def cast(value: str, src: str, dst: str) -> str:
        if dst == "bfloat16":
            return f"bf16_round((float){value})"
        if dst == "float16":
            return f"f16_round((float){value})"
        if CTYPE[src] == CTYPE[dst] and src not in ("bool",):
            return value
        return f"(({CTYPE[dst]}){value})"

    def ref(self, n: Node) -> str:
        return self.var(n) if n.op not in ("const", "param") else self.expr(n)

    # ---- the function -------------------------------------------------------------------------
    def source(self) -> str:
        lines = [PRELUDE]
        args = ["const double* restrict params", "int64_t p_rows", "int64_t p_cols", "int nthreads"]
        args += [f"{STORAGE[self.traced.store_dtype]}* restrict in_{name}" for name in self.inputs]
        lines.append(f"int {self.name}({', '.join(args)}) {{")
        for i, name in enumerate(self.params):
            if name in ("rows", "cols"):
                continue
            ctype = CTYPE[self.traced.trace.params[name].dtype]
            lines.append(f"    const {ctype} p_{name} = ({ctype})params[{i}];")
        lines.append(f"    double* restrict rowvals = (double*)calloc((size_t)(p_rows > 0 ? p_rows : 1) * "
                     f"{self.n_slots}, sizeof(double));")
        lines.append("    if (!rowvals) return 1;")
        if self.stamps:
            lines[0:0] = ["#include <omp.h>", f"double {self.name}_stamps[{self.n_sweeps + 1}];"]
            lines.append(f"    {self.name}_stamps[0] = omp_get_wtime();")
        for sweep in self.schedule.sweeps:
            lines += self._sweep(sweep)
            if self.stamps:
                lines.append(f"    {self.name}_stamps[{sweep.index + 1}] = omp_get_wtime();")
        lines += ["    free(rowvals);", "    return 0;", "}"]
        lines += self._many()
        return "\n".join(lines) + "\n"

    def sweep_costs(self) -> list:
        """Per sweep, what it costs per element: the arrays it reads and writes (each a pass over
        memory) and its operations on the divide/square-root unit (divisions and square roots of
        elements; a division by a step scalar is a multiply here, see the module docstring)."""
        costs = []
        for sweep in self.schedule.sweeps:
            reads, writes, divider = set(), set(), 0
            for loop in sweep.loops:
                reads |= {n.args[0] for n in loop.compute if n.op == "load"}
                reads |= {where for _, (kind, where) in loop.reuse if kind == "array"}
                writes |= {name for name, _ in loop.stores}
                divider += sum(1 for n in loop.compute if n.op == "sqrt" or (n.op == "div" and not _by_step_scalar(n)))
            costs.append({"sweep": sweep.index + 1, "reads": sorted(reads), "writes": sorted(writes),
                          "divider": divider, "row_loops": len(sweep.loops)})
        return costs

    def _many(self) -> list:
        """``NAME_many``: the step of ``count`` tensors in one call (one ctypes call per step for
        all tensors of a kernel, not one per tensor). ``table`` holds each tensor's pointers in
        ``inputs`` order; returns 0, or 1 + the index of the tensor whose step failed (the ones
        after it are not stepped)."""
        storage = STORAGE[self.traced.store_dtype]
        width = len(self.inputs)
        pointers = "".join(f", ({storage}*)at[{i}]" for i in range(width))
        return [f"int {self.name}_many(const double* restrict params, int64_t count, const int64_t* restrict rows, "
                "const int64_t* restrict cols, const int32_t* restrict threads, void* const* restrict table) {",
                "    for (int64_t i = 0; i < count; i++) {",
                f"        void* const* at = table + i * {width};",
                f"        if ({self.name}(params, rows[i], cols[i], threads[i]{pointers})) return (int)(i + 1);",
                "    }",
                "    return 0;",
                "}"]

    def _sweep(self, sweep) -> list:
        out = [f"    const {CTYPE[n.dtype]} {self.var(n)} = {self.expr(n)};" for n in sweep.scalars]
        for loop in sweep.loops:  # the reciprocals of step-scalar divisors (see the module docstring)
            for n in loop.compute:
                divisor = n.args[1] if n.op == "div" and _by_step_scalar(n) else None
                if divisor is not None and id(divisor) not in self._reciprocal:
                    name = f"rdiv{len(self._reciprocal)}"
                    self._reciprocal[id(divisor)] = (name, f"{name}_exact")
                    value = self.ref(divisor)
                    out.append(f"    const double {name} = reciprocal_of({value});")
                    out.append(f"    const int {name}_exact = !(fabs((double){value}) > 0x1p51);")
        globals_, outs, passes, loops = sweep.globals, sweep.outs, sweep.passes, sweep.loops
        accs = [f"acc{sweep.index}_{i}" for i in range(len(globals_))]
        written = ", ".join(name for name, _ in outs) or "nothing"
        out.append(f"    /* sweep {sweep.index + 1} of {self.n_sweeps}: {len(passes)} row pass(es), "
                   f"{len(globals_)} global reduction(s), writes {written} */")
        for acc, (n, _) in zip(accs, globals_):
            out.append(f"    {_acc_type(n)} {acc} = 0;")
        red = f" reduction(+:{', '.join(accs)})" if accs else ""
        out.append("    #pragma omp parallel num_threads(nthreads)")
        out.append("    {")
        for b, ctype in enumerate(loops[0].buffer_types):
            out.append(f"        {ctype}* restrict buf{b} = ({ctype}*)malloc((size_t)(p_cols > 0 ? p_cols : 1) * "
                       f"sizeof({ctype}));")
        out.append(f"        #pragma omp for schedule(static){red}")
        out.append("        for (int64_t r = 0; r < p_rows; r++) {")
        for name in self.inputs:
            out.append(f"            {STORAGE[self.traced.store_dtype]}* restrict row_{name} = in_{name} + r * p_cols;")
        for i, loop in enumerate(loops):
            out += self._row_scalars(loop.row_scalars)
            out += self._loop(i, loop, dict(zip([id(n) for n, _ in globals_], accs)))
            for n, _ in loop.reductions:
                slot = self.row_slots[id(n)]
                out.append(f"            rowvals[r * {self.n_slots} + {slot}] = racc{slot};")
        out.append("        }")
        for b in range(len(loops[0].buffer_types)):
            out.append(f"        free(buf{b});")
        out.append("    }")
        for acc, (n, _) in zip(accs, globals_):
            out.append(f"    const {CTYPE[n.dtype]} {self.var(n)} = {self._finish_global(n, acc)};")
        return out

    def _finish_global(self, n: Node, acc: str) -> str:
        if n.dtype not in FLOATS:
            return f"({CTYPE[n.dtype]}){acc}"
        value = f"({acc} / (double)(p_rows * p_cols))" if n.op == "global_mean" else acc
        if CTYPE[n.dtype] == "float":  # a W sum that exceeds float's range is infinite (D3)
            return f"(fabs({value}) > FLT_MAX ? (float)copysign(INFINITY, {value}) : (float){value})"
        return value

    def _row_scalars(self, nodes) -> list:
        """Row-scope nodes (functions of row reductions) the loop needs, before it."""
        out = []
        for n in nodes:
            if n.op.startswith("row_"):
                value = f"rowvals[r * {self.n_slots} + {self.row_slots[id(n)]}]"
                if n.op == "row_mean":
                    value = f"({value} / (double)p_cols)"
                out.append(f"            const {CTYPE[n.dtype]} {self.var(n)} = ({CTYPE[n.dtype]}){value};")
            else:
                out.append(f"            const {CTYPE[n.dtype]} {self.var(n)} = {self.expr(n)};")
        return out

    def _loop(self, i, loop, accs) -> list:
        """One loop over the row. Sums are kept per block of BLOCK elements in the operand's own
        type (vectorized), and the block sums added in double (int64 for counts): at most BLOCK
        terms meet in one rounding chain, so the error stays small however long the row is. A
        loop that divides by step scalars is emitted twice (see the module docstring)."""
        out = []
        sums = []  # (outer variable, outer type, inner type, operand)
        for n, operand in loop.reductions:
            slot = self.row_slots[id(n)]
            sums.append((f"racc{slot}", "double", _block_type(operand), operand))
        for n, operand in loop.globals:
            sums.append((f"l{accs[id(n)]}", _acc_type(n), _block_type(operand), operand))
        for var, outer, _, _ in sums:
            out.append(f"            {outer} {var} = 0;")
        guards = sorted({self._reciprocal[id(n.args[1])][1] for n in loop.compute
                         if n.op == "div" and _by_step_scalar(n)})
        if guards:
            self._fast_division = True
            fast = self._iterate(functools.partial(self._body, loop, sums), sums)
            self._fast_division = False
            out.append(f"            if ({' && '.join(guards)}) {{")
            out += ["    " + ln for ln in fast]
            out.append("            } else {")
            out += ["    " + ln for ln in self._iterate(functools.partial(self._body, loop, sums), sums)]
            out.append("            }")
        else:
            out += self._iterate(functools.partial(self._body, loop, sums), sums)
        out += [f"            {accs[id(n)]} += l{accs[id(n)]};" for n, _ in loop.globals]
        return out

    def _body(self, loop, sums, lane) -> list:
        """The statements for element ``j`` of a loop, adding to partial sums ``[lane]``."""
        body = []
        for n, (kind, where) in loop.reuse:
            if kind == "buffer":
                body.append(f"                const {CTYPE[n.dtype]} {self.var(n)} = buf{where}[j];")
            else:
                load = {"bfloat16": "bf16_load", "float16": "f16_load"}.get(self.traced.store_dtype, "")
                body.append(f"                const {CTYPE[n.dtype]} {self.var(n)} = {load}(row_{where}[j]);")
        keep = loop.buffered
        for n in loop.compute:
            body.append(f"                const {CTYPE[n.dtype]} {self.var(n)} = {self.expr(n)};")
            if id(n) in keep:
                body.append(f"                buf{keep[id(n)]}[j] = {self.var(n)};")
        for var, _, inner, operand in sums:
            body.append(f"                b{var}[{lane}] += ({inner}){self.ref(operand)};")
        for name, value in loop.stores:
            v = self.ref(value)
            store = {"bfloat16": f"bf16_bits({v})", "float16": f"f16_bits({v})"}.get(
                self.traced.store_dtype, f"({STORAGE[self.traced.store_dtype]}){v}")
            body.append(f"                row_{name}[j] = {store};")
        return body

    @staticmethod
    def _iterate(body, sums) -> list:
        """The loop over the row around ``body(lane)`` (its statements for element j, summing into
        partial sum ``lane``). A loop that sums goes by blocks of BLOCK
        elements, each summed in LANES partial sums (element j into lane j mod LANES, in order,
        then the lanes added pairwise): the order is written out, so the result does not depend
        on how the compiler vectorizes (the same on every CPU, and in both copies of a loop)."""
        out = []
        if not sums:
            out.append("            #pragma omp simd")
            out.append("            for (int64_t j = 0; j < p_cols; j++) {")
            out += body(None)
            out.append("            }")
            return out
        out.append(f"            for (int64_t j0 = 0; j0 < p_cols; j0 += {BLOCK}) {{")
        out.append(f"                const int64_t j1 = j0 + {BLOCK} < p_cols ? j0 + {BLOCK} : p_cols;")
        for var, _, inner, _ in sums:
            out.append(f"                {inner} b{var}[{LANES}] = {{0}};")
        out.append("                int64_t jl = j0;")
        out.append(f"                for (; jl + {LANES} <= j1; jl += {LANES}) {{")
        out.append("                    #pragma omp simd")
        out.append(f"                    for (int64_t l = 0; l < {LANES}; l++) {{")
        out.append("                        const int64_t j = jl + l;")
        out += ["        " + ln for ln in body("l")]
        out.append("                    }")
        out.append("                }")
        out.append("                for (int64_t j = jl; j < j1; j++) {")
        out += ["    " + ln for ln in body("j - jl")]
        out.append("                }")
        for var, outer, _, _ in sums:
            out.append(f"                for (int w = {LANES // 2}; w >= 1; w /= 2) "
                       f"for (int l = 0; l < w; l++) b{var}[l] += b{var}[l + w];")
            out.append(f"                {var} += ({outer})b{var}[0];")
        out.append("            }")
        return out


def _by_step_scalar(n: Node) -> bool:
    """A float32 ``sqrt(x) / c``, ``c`` a step scalar: computed with c's reciprocal (see the
    module docstring)."""
    x, c = n.args
    return (isinstance(x, Node) and isinstance(c, Node) and n.scope == ELEM and c.scope == SCALAR
            and x.op == "sqrt" and n.dtype == x.dtype == c.dtype == "float32")


def _block_type(operand: Node) -> str:
    """The type a block's partial sum is kept in: the operand's (float, double), int32 for counts."""
    ctype = CTYPE[operand.dtype]
    return ctype if ctype in ("float", "double") else "int32_t"


def _acc_type(n: Node) -> str:
    return "double" if n.dtype in FLOATS else "int64_t"


def _literal(value, dtype: str) -> str:
    if dtype == "bool":
        return "1" if value else "0"
    if dtype in ("weak_int", "int32", "int64"):
        return f"INT64_C({int(value)})"
    value = float(value)
    if math.isnan(value):
        text = "NAN"
    elif math.isinf(value):
        text = "INFINITY" if value > 0 else "(-INFINITY)"
    else:
        text = value.hex()
    ctype = CTYPE[dtype]
    if dtype in ("bfloat16", "float16"):
        return Program.cast(f"(double){text}", "float64", dtype)
    return f"(({ctype}){text})"


FFI_HANDLER = r"""
#include <string.h>
#include "xla/ffi/api/c_api.h"

/* XLA FFI handler (typed FFI, C API). args = (values, step, runtime, slots, param, grad, state...):
   values: the kernel's {count} float64 arguments and the thread count, as the bits of float64s
   (uint32 pairs, so jax needs no x64 to pass them); step: the 0-d step count (int32 or int64);
   runtime: traced values (float32 or float64, e.g. a scheduled lr) put in the argument slots named
   by slots (int32). rets = (param, state...), aliased with the inputs: updated in place. */
XLA_FFI_Error* {name}_ffi(XLA_FFI_CallFrame* frame) {{
    for (XLA_FFI_Extension_Base* ext = frame->extension_start; ext; ext = ext->next) {{
        if (ext->type == XLA_FFI_Extension_Metadata) {{
            XLA_FFI_Metadata* meta = ((XLA_FFI_Metadata_Extension*)ext)->metadata;
            meta->api_version.major_version = XLA_FFI_API_MAJOR;
            meta->api_version.minor_version = XLA_FFI_API_MINOR;
            meta->traits = 0;
            return NULL;
        }}
    }}
    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
    XLA_FFI_Buffer** args = (XLA_FFI_Buffer**)frame->args.args;
    XLA_FFI_Buffer** rets = (XLA_FFI_Buffer**)frame->rets.rets;
    double values[{count} + 1];
    memcpy(values, args[0]->data, sizeof values);
    {step_line}
    const int32_t* slots = (const int32_t*)args[3]->data;
    for (int64_t i = 0; i < args[2]->dims[0]; i++)
        values[slots[i]] = args[2]->dtype == XLA_FFI_DataType_F64 ? ((const double*)args[2]->data)[i]
                                                                 : (double)((const float*)args[2]->data)[i];
    XLA_FFI_Buffer* p = rets[0];
    int64_t numel = 1;
    for (int64_t d = 0; d < p->rank; d++) numel *= p->dims[d];
    int64_t rows = p->rank >= 2 ? p->dims[0] : 1;
    int64_t cols = rows > 0 ? numel / rows : 0;
    int nthreads = (int)values[{count}];
    {name}(values, rows, cols, nthreads{pointers});
    return NULL;
}}
"""

FFI_FIXED_ARGS = 4  # values, step, runtime, slots: then param, grad, state...


def ffi_source(program: Program) -> str:
    """The XLA FFI handler that runs ``program``'s kernel from jax (refopt.optax): inputs in the
    order (values, step, runtime, slots, param, grad, buffers...), outputs (param, or the updates
    written over grad; buffers...), aliased with the inputs they overwrite."""
    written = list(program.outputs)  # "param" or "grad" (the updates) first, then the state buffers
    read_only = {"param": FFI_FIXED_ARGS, "grad": FFI_FIXED_ARGS + 1}
    pointers = "".join(f", rets[{written.index(name)}]->data" if name in written else f", args[{read_only[name]}]->data"
                       for name in program.inputs)
    step_line = ("" if "step" not in program.params else
                 f"values[{program.params.index('step')}] = args[1]->dtype == XLA_FFI_DataType_S64 ? "
                 "(double)*(const int64_t*)args[1]->data : (double)*(const int32_t*)args[1]->data;")
    return FFI_HANDLER.format(name=program.name, count=len(program.params), step_line=step_line, pointers=pointers)
