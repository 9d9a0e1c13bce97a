"""From a traced step (symbolic.py) to one C function that updates a tensor in place.

Schedule. A *global* reduction (D3's norm, D12's count, a mean or std over all elements) needs
every element before anything after it can be computed, so each one closes a *sweep* over the
tensor; the last sweep computes the outputs and writes them in place. Every sweep reads only the
inputs (the old parameter, gradient and state) and the results of earlier reductions, so writing
in place in the last sweep is safe, and no temporary of the tensor's size is needed. Within a
sweep, rows (the leading axis; A1/A2 reduce each row) are processed one at a time and in
parallel: a *row* reduction (the trailing-axes means and stds of A1/A2, D10's mean) is one loop
over the row, the row being in cache, before the loops that use it. A value computed in one loop
of a row and used in a later one is kept in a per-thread row buffer rather than computed again.
Row results are kept for later sweeps.

Arithmetic. Each node is one C operation in its dtype: float32 values are ``float``, float64
``double``, Python numbers ``double`` (weak: converted where they meet an array's dtype, as in
the core), 16-bit values ``float`` holding a value exactly representable in the 16-bit dtype.
The library is compiled with ``-ffp-contract=off`` (no fused multiply-add) and without
``-ffast-math``: every operation rounds as IEEE 754 says, so per element the kernel computes
exactly what the core computes. Reductions accumulate in double and may sum in any order
(spec/numerics.md, freedom 1); D3's sum still overflows to infinity where W's would.
"""
from __future__ import annotations

import math

from .symbolic import ELEM, FLOATS, ROW, SCALAR, Node, TraceError

CTYPE = {"float16": "float", "bfloat16": "float", "float32": "float", "float64": "double", "weak": "double",
         "weak_int": "int64_t", "int32": "int32_t", "int64": "int64_t", "bool": "int"}
#: how a 16-bit dtype is stored in memory
STORAGE = {"float16": "uint16_t", "bfloat16": "uint16_t", "float32": "float", "float64": "double"}
BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "gt": ">", "ge": ">=", "lt": "<", "le": "<=",
          "eq": "==", "ne": "!="}
REDUCTIONS = ("row_sum", "row_mean", "global_sum", "global_mean")
#: Elements per block of a sum: a partial sum in the operand's type, then added in double.
BLOCK = 512

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
"""


def _deps(node):
    return [a for a in node.args if isinstance(a, Node)]


def _walk(roots, stop=lambda n: False):
    """Nodes reachable from ``roots`` in dependency order (post-order), not entering ``stop`` nodes."""
    order, seen = [], set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.append((n, True))
            if not stop(n):
                stack.extend((a, False) for a in reversed(_deps(n)))
    return order


class Program:
    """The schedule and the C source of one traced step."""

    def __init__(self, traced, name: str = "refopt_step"):
        self.traced, self.name = traced, name
        self.inputs = list(traced.trace.inputs)           # pointer arguments, in order
        self.params = list(traced.trace.params)           # double/int64 arguments, in order
        self.outputs = traced.outputs
        self.level = self._levels(self.outputs.values())
        self.n_sweeps = max(self.level.values(), default=0) + 1
        self.row_slots = {}  # id(row reduction) -> index in the per-row results
        self._names = {}
        self.n_buffers = 0

    # ---- naming -----------------------------------------------------------------------------
    def var(self, n: Node) -> str:
        return self._names.setdefault(id(n), f"v{len(self._names)}")

    # ---- expressions --------------------------------------------------------------------------
    def expr(self, n: Node) -> str:
        a = [self.ref(x) for x in _deps(n)]
        if n.op == "load":
            load = {"bfloat16": "bf16_load", "float16": "f16_load"}.get(n.dtype, "")
            return f"{load}(row_{n.args[0]}[j])"
        if n.op == "param":
            return f"p_{n.args[0]}"
        if n.op == "const":
            return _literal(n.args[0], n.dtype)
        if n.op == "cast":
            return self.cast(a[0], n.args[0].dtype, n.dtype)
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

    # ---- the schedule ---------------------------------------------------------------------------
    def _levels(self, roots) -> dict:
        """id -> the number of nested global reductions a node waits for (its earliest sweep)."""
        level = {}
        for n in _walk(roots):
            deps = max((level[id(a)] for a in _deps(n)), default=0)
            level[id(n)] = deps + (1 if n.op.startswith("global_") else 0)
        return level

    def _store_sweeps(self) -> dict:
        """The sweep each output is written in: as early as it can be computed, unless a later
        sweep still needs the old contents of its array (then the last sweep)."""
        last = self.n_sweeps - 1
        store = {name: (last if name == "param" else self.level[id(n)]) for name, n in self.outputs.items()}
        while True:
            moved = False
            for sweep in range(self.n_sweeps):
                roots = self._roots(sweep, store)
                for n in _walk(roots, stop=lambda x: x.op.startswith(("row_", "global_")) and self.level[id(x)] <= sweep
                               if id(x) in self.level else False):
                    if n.op == "load" and not n.attrs.get("new") and store.get(n.args[0], last) < sweep:
                        store[n.args[0]] = last
                        moved = True
            if not moved:
                return store

    def _substitutions(self, sweep: int, store: dict) -> dict:
        """Outputs written before ``sweep`` are read back from their arrays in it."""
        subst = {}
        for name, n in self.outputs.items():
            if store[name] >= sweep:
                continue
            new = Node("load", (name,), self.traced.store_dtype, ELEM, {"new": True})
            subst[id(n)] = new
            if n.op == "cast" and n.dtype in ("bfloat16", "float16"):  # the W value it was rounded from
                subst[id(n.args[0])] = Node("cast", (new,), n.args[0].dtype, ELEM)
        return subst

    def _rewrite(self, node: Node, subst: dict, memo: dict, kept=frozenset()) -> Node:
        """``node`` with the substitutions applied; reductions in ``kept`` (computed in an earlier
        sweep: their values do not change) are left as they are."""
        if id(node) in subst:
            return subst[id(node)]
        if id(node) in memo:
            return memo[id(node)]
        if id(node) in kept:
            return node
        args = tuple(self._rewrite(a, subst, memo, kept) if isinstance(a, Node) else a for a in node.args)
        new = node if all(x is y for x, y in zip(args, node.args)) else Node(node.op, args, node.dtype, node.scope,
                                                                             dict(node.attrs))
        memo[id(node)] = new
        return new

    def _roots(self, sweep: int, store: dict) -> list:
        """What sweep ``sweep`` computes: its global reductions' operands and its outputs."""
        subst, memo = self._substitutions(sweep, store), {}
        globals_ = [n for n in _walk(self.outputs.values())
                    if n.op.startswith("global_") and self.level[id(n)] == sweep + 1]
        outs = [n for name, n in self.outputs.items() if store[name] == sweep]
        return [self._rewrite(n.args[0], subst, memo) for n in globals_] + [self._rewrite(n, subst, memo) for n in outs]

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
        self.store = self._store_sweeps()
        plans, kept = [], set()
        for sweep in range(self.n_sweeps):
            subst, memo = self._substitutions(sweep, self.store), {}
            globals_ = [n for n in _walk(self.outputs.values())
                        if n.op.startswith("global_") and self.level[id(n)] == sweep + 1]
            globals_ = [(n, self._rewrite(n.args[0], subst, memo, kept)) for n in globals_]
            outs = [(name, self._rewrite(n, subst, memo, kept)) for name, n in self.outputs.items()
                    if self.store[name] == sweep]
            plans.append((globals_, outs))
            kept |= {id(n) for n, _ in globals_}
            kept |= {id(n) for n in _walk([x for _, x in globals_] + [x for _, x in outs]) if n.op.startswith("row_")}
        row_reductions = {id(n): n for g, o in plans for n in _walk([x for _, x in g] + [x for _, x in o])
                          if n.op.startswith("row_")}
        self.row_slots = {k: i for i, k in enumerate(row_reductions)}
        self.n_slots = max(len(self.row_slots), 1)
        lines.append(f"    double* restrict rowvals = (double*)calloc((size_t)(p_rows > 0 ? p_rows : 1) * "
                     f"{self.n_slots}, sizeof(double));")
        lines.append("    if (!rowvals) return 1;")
        declared, available_rows = set(), set()
        for sweep, (globals_, outs) in enumerate(plans):
            lines += self._sweep(sweep, globals_, outs, declared, available_rows)
        lines += ["    free(rowvals);", "    return 0;", "}"]
        return "\n".join(lines) + "\n"

    def _scalars(self, roots, declared, indent="    "):
        """Declarations of the scalar nodes ``roots`` need, not yet declared."""
        out = []
        for n in _walk(roots, stop=lambda n: n.scope != SCALAR or n.op.startswith("global_")):
            if n.scope != SCALAR or n.op in ("const", "param") or n.op.startswith("global_") or id(n) in declared:
                continue
            declared.add(id(n))
            out.append(f"{indent}const {CTYPE[n.dtype]} {self.var(n)} = {self.expr(n)};")
        return out

    def _sweep(self, sweep: int, globals_: list, outs: list, declared: set, available_rows: set) -> list:
        roots = [x for _, x in globals_] + [x for _, x in outs]
        out = []
        scalar_roots = [n for n in _walk(roots, stop=lambda n: n.scope == SCALAR) if n.scope == SCALAR]
        out += self._scalars(scalar_roots, declared)
        needed = [n for n in _walk(roots, stop=lambda n: id(n) in available_rows)
                  if n.op.startswith("row_") and id(n) not in available_rows]
        passes, done = [], set(available_rows)
        while needed:
            ready = [n for n in needed if all(id(r) in done for r in _row_dependencies(n))]
            if not ready:
                raise TraceError("row reductions depend on each other in a cycle")
            passes.append(ready)
            done |= {id(n) for n in ready}
            needed = [n for n in needed if id(n) not in done]
        loops = self._loops(passes, globals_, outs, available_rows)
        accs = [f"acc{sweep}_{i}" for i in range(len(globals_))]
        written = ", ".join(name for name, _ in outs) or "nothing"
        out.append(f"    /* sweep {sweep + 1} of {self.n_sweeps}: {len(passes)} row pass(es), "
                   f"{len(globals_)} global reduction(s), writes {written} */")
        for acc, (n, _) in zip(accs, globals_):
            out.append(f"    {_acc_type(n)} {acc} = 0;")
        red = f" reduction(+:{', '.join(accs)})" if accs else ""
        out.append("    #pragma omp parallel num_threads(nthreads)")
        out.append("    {")
        for b, ctype in enumerate(loops[0]["buffer_types"]):
            out.append(f"        {ctype}* restrict buf{b} = ({ctype}*)malloc((size_t)(p_cols > 0 ? p_cols : 1) * "
                       f"sizeof({ctype}));")
        out.append(f"        #pragma omp for schedule(static){red}")
        out.append("        for (int64_t r = 0; r < p_rows; r++) {")
        for name in self.inputs:
            out.append(f"            {STORAGE[self.traced.store_dtype]}* restrict row_{name} = in_{name} + r * p_cols;")
        row_declared = set()
        for i, loop in enumerate(loops):
            out += self._row_scalars(loop["roots"], row_declared)
            out += self._loop(i, loop, dict(zip([id(n) for n, _ in globals_], accs)))
            for n, _ in loop["reductions"]:
                slot = self.row_slots[id(n)]
                out.append(f"            rowvals[r * {self.n_slots} + {slot}] = racc{slot};")
        out.append("        }")
        for b in range(len(loops[0]["buffer_types"])):
            out.append(f"        free(buf{b});")
        out.append("    }")
        for acc, (n, _) in zip(accs, globals_):
            out.append(f"    const {CTYPE[n.dtype]} {self.var(n)} = {self._finish_global(n, acc)};")
            declared.add(id(n))
        available_rows |= {id(n) for p in passes for n in p}
        return out

    def _loops(self, passes, globals_, outs, available_rows) -> list:
        """The loops over a row: one per pass of row reductions, then the last one. Each loop
        lists the element values it computes; a value an earlier loop computed is taken back:
        an output from its array (written in the first loop that can compute it: the row is in
        cache), a cheap value recomputed, anything else from a per-thread row buffer."""
        done, ready_at = set(available_rows), []
        for p in passes:
            ready_at.append(set(done))
            done |= {id(n) for n in p}
        ready_at.append(done)
        last = len(passes)
        first = {}
        for name, value in outs:
            needs = {id(r) for r in _walk([value], stop=lambda x: x.op.startswith("row_")) if r.op.startswith("row_")}
            first[name] = next(i for i, avail in enumerate(ready_at) if needs <= avail)
        value_of = {id(value): name for name, value in outs}
        while True:
            loops, conflict = self._assign(passes, globals_, outs, first, value_of, last), None
            for i, loop in enumerate(loops):
                for n in loop["compute"]:
                    if n.op == "load" and first.get(n.args[0], last) < i:
                        conflict = n.args[0]  # needs the old contents after the write: write later
            if conflict is None:
                return loops
            first[conflict] = last

    def _assign(self, passes, globals_, outs, first, value_of, last) -> list:
        computed, buffered, loops = {}, {}, []
        for i in range(last + 1):
            reductions = [(n, n.args[0]) for n in (passes[i] if i < last else ())]
            stores = [(name, value) for name, value in outs if first[name] == i]
            totals = list(globals_) if i == last else []
            roots = [x for _, x in reductions] + [x for _, x in stores] + [x for _, x in totals]
            written = {name for name, f in first.items() if f < i}
            compute, reuse = [], []

            def taken(n, i=i, written=written):
                """A value computed by an earlier loop of this row, and how it comes back."""
                if n.scope != ELEM or id(n) not in computed or computed[id(n)] >= i:
                    return None
                if value_of.get(id(n)) in written:
                    return ("array", value_of[id(n)])
                if _cheap(n) and not any(x.op == "load" and x.args[0] in written for x in _walk([n])):
                    return None
                return ("buffer", buffered.setdefault(id(n), len(buffered)))

            for n in _walk(roots, stop=lambda n: n.scope != ELEM or taken(n) is not None):
                if n.scope != ELEM:
                    continue
                how = taken(n)
                if how is not None:
                    reuse.append((n, how))
                    continue
                computed.setdefault(id(n), i)
                compute.append(n)
            loops.append({"reductions": reductions, "stores": stores, "globals": totals, "roots": roots,
                          "compute": compute, "reuse": reuse})
        types = {}
        for loop in loops:
            for n, how in loop["reuse"]:
                if how[0] == "buffer":
                    types[how[1]] = CTYPE[n.dtype]
        for loop in loops:
            loop["buffer_types"] = [types[k] for k in range(len(buffered))]
            loop["buffered"] = buffered
        self.n_buffers = max(self.n_buffers, len(buffered))
        return loops

    def _finish_global(self, n: Node, acc: str) -> str:
        if n.dtype not in FLOATS:
            return f"({CTYPE[n.dtype]}){acc}"
        value = f"({acc} / (double)(p_rows * p_cols))" if n.op == "global_mean" else acc
        if CTYPE[n.dtype] == "float":  # a W sum that exceeds float's range is infinite (D3)
            return f"(fabs({value}) > FLT_MAX ? (float)copysign(INFINITY, {value}) : (float){value})"
        return value

    def _row_scalars(self, roots, declared) -> list:
        """Row-scope nodes (functions of row reductions) the loop needs, before it."""
        out = []
        for n in _walk(roots, stop=lambda n: n.scope != ELEM and n.scope != ROW):
            if n.scope != ROW or id(n) in declared:
                continue
            declared.add(id(n))
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
        terms meet in one rounding chain, so the error stays small however long the row is."""
        out, body = [], []
        sums = []  # (outer variable, outer type, inner type, operand)
        for n, operand in loop["reductions"]:
            slot = self.row_slots[id(n)]
            sums.append((f"racc{slot}", "double", _block_type(operand), operand))
        for n, operand in loop["globals"]:
            sums.append((f"l{accs[id(n)]}", _acc_type(n), _block_type(operand), operand))
        for var, outer, _, _ in sums:
            out.append(f"            {outer} {var} = 0;")
        for n, (kind, where) in loop["reuse"]:
            if kind == "buffer":
                body.append(f"                const {CTYPE[n.dtype]} {self.var(n)} = buf{where}[j];")
            else:
                load = {"bfloat16": "bf16_load", "float16": "f16_load"}.get(self.traced.store_dtype, "")
                body.append(f"                const {CTYPE[n.dtype]} {self.var(n)} = {load}(row_{where}[j]);")
        keep = loop["buffered"]
        for n in loop["compute"]:
            body.append(f"                const {CTYPE[n.dtype]} {self.var(n)} = {self.expr(n)};")
            if id(n) in keep:
                body.append(f"                buf{keep[id(n)]}[j] = {self.var(n)};")
        for var, _, inner, operand in sums:
            body.append(f"                b{var} += ({inner}){self.ref(operand)};")
        for name, value in loop["stores"]:
            v = self.ref(value)
            store = {"bfloat16": f"bf16_bits({v})", "float16": f"f16_bits({v})"}.get(
                self.traced.store_dtype, f"({STORAGE[self.traced.store_dtype]}){v}")
            body.append(f"                row_{name}[j] = {store};")
        if not sums:
            out.append("            #pragma omp simd")
            out.append("            for (int64_t j = 0; j < p_cols; j++) {")
            out += body
            out.append("            }")
            return out
        out.append(f"            for (int64_t j0 = 0; j0 < p_cols; j0 += {BLOCK}) {{")
        out.append(f"                const int64_t j1 = j0 + {BLOCK} < p_cols ? j0 + {BLOCK} : p_cols;")
        for var, _, inner, _ in sums:
            out.append(f"                {inner} b{var} = 0;")
        out.append(f"                #pragma omp simd reduction(+:{', '.join('b' + v for v, _, _, _ in sums)})")
        out.append("                for (int64_t j = j0; j < j1; j++) {")
        out += ["    " + ln for ln in body]
        out.append("                }")
        for var, outer, _, _ in sums:
            out.append(f"                {var} += ({outer})b{var};")
        out.append("            }")
        out += [f"            {accs[id(n)]} += l{accs[id(n)]};" for n, _ in loop["globals"]]
        return out


def _row_dependencies(n: Node) -> list:
    """The row reductions the operand of row reduction ``n`` needs (not ``n`` itself)."""
    return [r for r in _walk([n.args[0]], stop=lambda x: x.op.startswith("row_")) if r.op.startswith("row_")]


def _cheap(n: Node, depth: int = 2) -> bool:
    """Recomputed rather than kept in a row buffer: loads and constants, and one or two simple
    operations on them (a buffer costs a store and a load; an add or a multiply costs less)."""
    if n.op in ("load", "const", "param") or n.scope != ELEM:
        return True
    if depth == 0 or n.op not in ("cast", "add", "sub", "mul", "neg"):
        return False
    return all(_cheap(a, depth - 1) for a in _deps(n))


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
#include "xla/ffi/api/c_api.h"

/* XLA FFI handler (typed FFI, C API): args = (params f64[n], param, grad, state...), rets =
   (param, state...) aliased with the inputs, so the kernel updates them in place. */
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
    const double* params = (const double*)args[0]->data;
    XLA_FFI_Buffer* p = rets[0];
    int64_t numel = 1;
    for (int64_t d = 0; d < p->rank; d++) numel *= p->dims[d];
    int64_t rows = p->rank >= 2 ? p->dims[0] : 1;
    int64_t cols = rows > 0 ? numel / rows : 0;
    int nthreads = (int)params[{threads_index}];
    {name}((const double*)params, rows, cols, nthreads{pointers});
    return NULL;
}}
"""


def ffi_source(program: Program) -> str:
    """The XLA FFI handler that runs ``program``'s kernel from jax (refopt.optax): inputs in the
    order (params, param, grad, buffers...), outputs param and buffers aliased with them."""
    ret_index = {name: i for i, name in enumerate(["param", *[n for n in program.inputs if n not in ("param", "grad")]])}
    pointers = "".join(f", args[2]->data" if name == "grad" else f", rets[{ret_index[name]}]->data"
                       for name in program.inputs)
    return FFI_HANDLER.format(name=program.name, threads_index=len(program.params), pointers=pointers)
