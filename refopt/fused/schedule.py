"""The schedule of a traced step (symbolic.py): which sweep over the tensor computes what, and in
which loop over a row; the emitters (c_source.py for the CPU, triton_source.py for CUDA) only
write it down.

Sweeps. A *global* reduction (D3's norm, D12's count, a mean or std over all elements) needs
every element before anything after it can be computed, so each one closes a *sweep* over the
tensor; the last sweep computes the outputs and writes them in place. Every sweep reads only the
inputs (the old parameter, gradient and state), the outputs earlier sweeps wrote and the results
of earlier reductions, so writing in place is safe and no temporary of the tensor's size is
needed: an output is written in the earliest sweep that can compute it, unless a later sweep
still needs the old contents of its array (then in the last sweep); later sweeps read it back.

Loops. Within a sweep, rows (the leading axis; A1/A2 reduce each row) are processed one at a
time: a *row* reduction (the trailing-axes means and stds of A1/A2, D10's mean) is one loop over
the row, the row being in cache, before the loops that use it (a *pass*); the last loop computes
the sweep's global sums. An output is written in the first loop that can compute it (the C
kernel's choice) or in the last (``early_writes=False``, the Triton kernels', whose loops do not
read what another loop wrote), and in the last whenever a later loop reads its old contents. A
value computed in one loop of a row and needed in a later one comes back from its array when it
is an output already written, else is computed again, or (``row_buffers=True``, the C kernel's
choice for values that are not cheap) is kept in a per-thread row buffer. Row results are kept
for later sweeps, in a rows x slots table.
"""
from __future__ import annotations

from dataclasses import dataclass

from .symbolic import ELEM, ROW, SCALAR, Node, TraceError


def deps(node):
    return [a for a in node.args if isinstance(a, Node)]


def walk(roots, stop=lambda n: False):
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
                stack.extend((a, False) for a in reversed(deps(n)))
    return order


def is_reduction(n: Node, kind: str = "") -> bool:
    return n.op.startswith((f"{kind}_",) if kind else ("row_", "global_"))


@dataclass
class Loop:
    """One loop over a row (or a tile of rows). ``reductions``: (row reduction, operand) it sums;
    ``stores``: (output name, value) it writes; ``globals``: (global reduction, operand) it adds
    to; ``compute``: the element nodes it evaluates, in order; ``reuse``: (node, ("array", name) |
    ("buffer", index)) taken back from an earlier loop; ``row_scalars``: the row-scope nodes it
    needs that no earlier loop of the sweep declared (row results and functions of them)."""

    reductions: list
    stores: list
    globals: list
    roots: list
    compute: list
    reuse: list
    buffered: dict
    buffer_types: list
    row_scalars: list


@dataclass
class Sweep:
    """One sweep: ``scalars`` (tensor-scope nodes to evaluate first, in order), ``globals`` (global
    reduction, operand) it closes, ``outs`` (name, value) it writes, ``passes`` of row reductions,
    its ``loops`` (one per pass, then the last)."""

    index: int
    scalars: list
    globals: list
    outs: list
    passes: list
    loops: list


class Schedule:
    """The schedule of ``traced`` (a symbolic.Traced). ``row_buffers``: whether values reused
    across the loops of a row may be kept in row buffers (else they are computed again);
    ``early_writes``: whether an output may be written in the first loop of its sweep that can
    compute it and read back by the later ones (else every output is written in the last loop,
    and later loops compute again from the old contents: no loop reads what another wrote)."""

    def __init__(self, traced, *, row_buffers: bool = True, early_writes: bool = True, ctype=None):
        self.traced, self.row_buffers, self.early_writes = traced, row_buffers, early_writes
        self._ctype = ctype or (lambda dtype: dtype)  # a buffer's element type, for the emitter
        self.inputs = list(traced.trace.inputs)           # arrays, in argument order
        self.params = list(traced.trace.params)           # run-time values, in argument order
        self.outputs = traced.outputs
        self.level = self._levels(self.outputs.values())
        self.n_sweeps = max(self.level.values(), default=0) + 1
        self.n_buffers = 0
        self.store = self._store_sweeps()
        plans = self._plans()
        row_reductions = {id(n): n for g, o in plans for n in walk([x for _, x in g] + [x for _, x in o])
                          if is_reduction(n, "row")}
        self.row_slots = {k: i for i, k in enumerate(row_reductions)}  # id(row reduction) -> slot
        self.n_slots = max(len(self.row_slots), 1)
        declared, available_rows = set(), set()
        self.sweeps = [self._sweep(i, g, o, declared, available_rows) for i, (g, o) in enumerate(plans)]

    # ---- sweeps -----------------------------------------------------------------------------------
    def _levels(self, roots) -> dict:
        """id -> the number of nested global reductions a node waits for (its earliest sweep)."""
        level = {}
        for n in walk(roots):
            before = max((level[id(a)] for a in deps(n)), default=0)
            level[id(n)] = before + (1 if is_reduction(n, "global") else 0)
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
                for n in walk(roots, stop=lambda x: is_reduction(x) and self.level[id(x)] <= sweep
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

    def _closed_by(self, sweep: int) -> list:
        """The global reductions sweep ``sweep`` computes (those the next sweep waits for)."""
        return [n for n in walk(self.outputs.values()) if is_reduction(n, "global") and self.level[id(n)] == sweep + 1]

    def _roots(self, sweep: int, store: dict) -> list:
        """What sweep ``sweep`` computes: its global reductions' operands and its outputs."""
        subst, memo = self._substitutions(sweep, store), {}
        outs = [n for name, n in self.outputs.items() if store[name] == sweep]
        return [self._rewrite(n.args[0], subst, memo) for n in self._closed_by(sweep)] + \
            [self._rewrite(n, subst, memo) for n in outs]

    def _plans(self) -> list:
        """Per sweep: ([(global reduction, operand)], [(output name, value)]), rewritten."""
        plans, kept = [], set()
        for sweep in range(self.n_sweeps):
            subst, memo = self._substitutions(sweep, self.store), {}
            globals_ = [(n, self._rewrite(n.args[0], subst, memo, kept)) for n in self._closed_by(sweep)]
            outs = [(name, self._rewrite(n, subst, memo, kept)) for name, n in self.outputs.items()
                    if self.store[name] == sweep]
            plans.append((globals_, outs))
            kept |= {id(n) for n, _ in globals_}
            kept |= {id(n) for n in walk([x for _, x in globals_] + [x for _, x in outs]) if is_reduction(n, "row")}
        return plans

    def _sweep(self, index: int, globals_: list, outs: list, declared: set, available_rows: set) -> Sweep:
        roots = [x for _, x in globals_] + [x for _, x in outs]
        scalar_roots = [n for n in walk(roots, stop=lambda n: n.scope == SCALAR) if n.scope == SCALAR]
        scalars = []
        for n in walk(scalar_roots, stop=lambda n: n.scope != SCALAR or is_reduction(n, "global")):
            if n.scope != SCALAR or n.op in ("const", "param") or is_reduction(n, "global") or id(n) in declared:
                continue
            declared.add(id(n))
            scalars.append(n)
        needed = [n for n in walk(roots, stop=lambda n: id(n) in available_rows)
                  if is_reduction(n, "row") and id(n) not in available_rows]
        passes, done = [], set(available_rows)
        while needed:
            ready = [n for n in needed if all(id(r) in done for r in _row_dependencies(n))]
            if not ready:
                raise TraceError("row reductions depend on each other in a cycle")
            passes.append(ready)
            done |= {id(n) for n in ready}
            needed = [n for n in needed if id(n) not in done]
        loops = self._loops(passes, globals_, outs, available_rows)
        row_declared = set()
        for loop in loops:
            loop.row_scalars = self._row_scalars(loop.roots, row_declared)
        declared |= {id(n) for n, _ in globals_}
        available_rows |= {id(n) for p in passes for n in p}
        return Sweep(index, scalars, globals_, outs, passes, loops)

    # ---- loops over a row -------------------------------------------------------------------------
    def _loops(self, passes, globals_, outs, available_rows) -> list:
        """The loops over a row: one per pass of row reductions, then the last one (see the
        module docstring for what each computes and takes back)."""
        done, ready_at = set(available_rows), []
        for p in passes:
            ready_at.append(set(done))
            done |= {id(n) for n in p}
        ready_at.append(done)
        last = len(passes)
        first = {}
        for name, value in outs:
            needs = {id(r) for r in walk([value], stop=lambda x: is_reduction(x, "row")) if is_reduction(r, "row")}
            first[name] = next(i for i, avail in enumerate(ready_at) if needs <= avail) if self.early_writes else last
        value_of = {id(value): name for name, value in outs}
        while True:
            loops, conflict = self._assign(passes, globals_, outs, first, value_of, last), None
            for i, loop in enumerate(loops):
                for n in loop.compute:
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
                if not self.row_buffers:
                    return None
                if _cheap(n) and not any(x.op == "load" and x.args[0] in written for x in walk([n])):
                    return None
                return ("buffer", buffered.setdefault(id(n), len(buffered)))

            for n in walk(roots, stop=lambda n: n.scope != ELEM or taken(n) is not None):
                if n.scope != ELEM:
                    continue
                how = taken(n)
                if how is not None:
                    reuse.append((n, how))
                    continue
                computed.setdefault(id(n), i)
                compute.append(n)
            loops.append(Loop(reductions, stores, totals, roots, compute, reuse, {}, [], []))
        types = {}
        for loop in loops:
            for n, how in loop.reuse:
                if how[0] == "buffer":
                    types[how[1]] = self._ctype(n.dtype)
        for loop in loops:
            loop.buffer_types = [types[k] for k in range(len(buffered))]
            loop.buffered = buffered
        self.n_buffers = max(self.n_buffers, len(buffered))
        return loops

    def _row_scalars(self, roots, declared) -> list:
        """Row-scope nodes (row results, functions of them) a loop needs, not yet declared."""
        out = []
        for n in walk(roots, stop=lambda n: n.scope != ELEM and n.scope != ROW):
            if n.scope != ROW or id(n) in declared:
                continue
            declared.add(id(n))
            out.append(n)
        return out


def _row_dependencies(n: Node) -> list:
    """The row reductions the operand of row reduction ``n`` needs (not ``n`` itself)."""
    return [r for r in walk([n.args[0]], stop=lambda x: is_reduction(x, "row")) if is_reduction(r, "row")]


def _cheap(n: Node, depth: int = 2) -> bool:
    """Recomputed rather than kept in a row buffer: loads and constants, and one or two simple
    operations on them (a buffer costs a store and a load; an add or a multiply costs less)."""
    if n.op in ("load", "const", "param") or n.scope != ELEM:
        return True
    if depth == 0 or n.op not in ("cast", "add", "sub", "mul", "neg"):
        return False
    return all(_cheap(a, depth - 1) for a in deps(n))
