"""Tracing the core: an array namespace whose arrays are expressions.

``trace(optimizer, ndim, dtype)`` runs the optimizer's own ``_update`` (refopt.saveus / refopt.dope,
unchanged) on symbolic arrays and returns the expressions of its outputs. A symbolic array stands
for "each element of a tensor viewed as rows x cols" (rows = the leading axis, cols = the rest,
the channels of A1/A2); every operation on it builds a ``Node``. Reductions become nodes too: a
mean or std over the trailing axes is a *row* reduction, one over all axes (or a sum such as D3's
norm and D12's count) a *global* one. The scheduler (schedule.py) turns them into passes.

Hyperparameters are runtime parameters: they enter as symbolic Python floats ("weak" scalars, as
the array API treats Python numbers: converted to the array's dtype where they meet one), so a
learning-rate schedule needs no new kernel. The Python ``if`` s of the core that test a
hyperparameter's value (the switches of S1/D1, ``acts``, ``b == 0``) are recorded as *guards*:
the kernel is valid while every guard evaluates as it did when traced.

Nothing here knows SAVEUS or DOPE: whatever the core computes, the kernel computes, in the same
order, with the same dtypes and roundings (A3); only reductions may sum in another order
(spec/numerics.md, freedom 1).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

#: dtype names of the symbolic namespace; "weak" is a Python float (binary64, converted to the
#: dtype of the array it meets), "weak_int" a Python int.
FLOATS = ("float16", "bfloat16", "float32", "float64")
RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}

#: Node scopes: a value per element, per row, or one value for the tensor.
ELEM, ROW, SCALAR = 2, 1, 0


class TraceError(Exception):
    """The core did something the fused path cannot compile (the caller falls back)."""


@dataclass(frozen=True)
class DType:
    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Node:
    op: str                  # see c_source.Program.expr (triton_source.Kernels.expr) for the elementwise ones
    args: tuple
    dtype: str               # a name of FLOATS, "int32", "int64", "bool", "weak", "weak_int"
    scope: int
    attrs: dict = field(default_factory=dict)

    def __hash__(self):
        return id(self)


class Trace:
    """What one tracing run records: inputs, parameters, guards."""

    def __init__(self):
        self.inputs: dict[str, Node] = {}
        self.params: dict[str, Node] = {}
        self.guards: list = []       # (description, callable(values) -> bool, expected)


class Sym:
    """A symbolic array (or scalar) of the traced namespace."""

    __array_priority__ = 1000

    def __init__(self, ns: "Namespace", node: Node, shape: tuple = ()):
        self._ns, self.node, self.shape = ns, node, tuple(shape)

    # ---- array attributes ------------------------------------------------------------------
    @property
    def dtype(self):
        return self._ns.dtype_of(self.node.dtype)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def device(self):
        return "traced"

    def __array_namespace__(self, api_version=None):
        return self._ns

    # ---- operators -------------------------------------------------------------------------
    def _bin(self, other, op, reverse=False):
        return self._ns._binary(op, other, self) if reverse else self._ns._binary(op, self, other)

    __add__ = lambda s, o: s._bin(o, "add")
    __radd__ = lambda s, o: s._bin(o, "add", True)
    __sub__ = lambda s, o: s._bin(o, "sub")
    __rsub__ = lambda s, o: s._bin(o, "sub", True)
    __mul__ = lambda s, o: s._bin(o, "mul")
    __rmul__ = lambda s, o: s._bin(o, "mul", True)
    __truediv__ = lambda s, o: s._bin(o, "div")
    __rtruediv__ = lambda s, o: s._bin(o, "div", True)
    __pow__ = lambda s, o: s._bin(o, "pow")
    __rpow__ = lambda s, o: s._bin(o, "pow", True)
    __gt__ = lambda s, o: s._ns._compare("gt", s, o)
    __ge__ = lambda s, o: s._ns._compare("ge", s, o)
    __lt__ = lambda s, o: s._ns._compare("lt", s, o)
    __le__ = lambda s, o: s._ns._compare("le", s, o)
    __eq__ = lambda s, o: s._ns._compare("eq", s, o)
    __ne__ = lambda s, o: s._ns._compare("ne", s, o)
    __hash__ = object.__hash__

    def __index__(self):
        raise TraceError("a traced value used as an index")

    def __neg__(self):
        return self._ns._unary("neg", self)

    def __bool__(self):
        return self._ns._guard(self)

    def __float__(self):
        raise TraceError("float() of a traced array: the core must not read array values in a step")

    __int__ = __float__


class Namespace:
    """The array-API subset the core uses, building nodes instead of computing."""

    __name__ = "refopt.fused.symbolic"

    def __init__(self, trace: Trace, values: dict):
        self.trace = trace
        self.values = values  # concrete values of the parameters, for guards
        for name in (*FLOATS, "int32", "int64", "bool"):
            setattr(self, name, DType(name))

    def dtype_of(self, name):
        return getattr(self, name) if name in (*FLOATS, "int32", "int64", "bool") else DType(name)

    def __hash__(self):
        return id(self)

    # ---- leaves ----------------------------------------------------------------------------
    def input(self, name: str, dtype: str, shape: tuple) -> Sym:
        node = Node("load", (name,), dtype, ELEM)
        self.trace.inputs[name] = node
        return Sym(self, node, shape)

    def param(self, name: str, dtype: str = "weak") -> Sym:
        node = Node("param", (name,), dtype, SCALAR)
        self.trace.params[name] = node
        return Sym(self, node)

    def _const(self, value, dtype: str) -> Sym:
        return Sym(self, Node("const", (value,), dtype, SCALAR))

    def _wrap(self, x) -> Sym:
        if isinstance(x, Sym):
            return x
        if isinstance(x, bool):
            return self._const(x, "bool")
        if isinstance(x, numbers.Integral):
            return self._const(int(x), "weak_int")
        if isinstance(x, numbers.Real):
            return self._const(float(x), "weak")
        raise TraceError(f"cannot trace a {type(x).__name__} operand")

    # ---- dtypes ----------------------------------------------------------------------------
    @staticmethod
    def _result_dtype(a: str, b: str) -> str:
        """Array-API promotion, with Python numbers weak (they take the array's dtype)."""
        if a == b:
            return a
        weak = ("weak", "weak_int")
        if a in weak and b in weak:
            return "weak"
        if a in weak:
            a, b = b, a
        if b in weak:  # a is an array dtype
            return a if a in FLOATS or b == "weak_int" else "float64"
        if a in FLOATS and b in FLOATS:
            if RANK[a] == RANK[b]:
                return "float32"
            return a if RANK[a] > RANK[b] else b
        if a in FLOATS or b in FLOATS:
            return a if a in FLOATS else b
        return "int64"

    def _cast(self, x: Sym, dtype: str) -> Sym:
        if x.node.dtype == dtype:
            return x
        return Sym(self, Node("cast", (x.node,), dtype, x.node.scope), x.shape)

    # ---- elementwise -----------------------------------------------------------------------
    def _binary(self, op, a, b) -> Sym:
        a, b = self._wrap(a), self._wrap(b)
        dtype = self._result_dtype(a.node.dtype, b.node.dtype)
        a, b = self._cast(a, dtype), self._cast(b, dtype)
        shape = a.shape if len(a.shape) >= len(b.shape) else b.shape
        return Sym(self, Node(op, (a.node, b.node), dtype, max(a.node.scope, b.node.scope)), shape)

    def _compare(self, op, a, b) -> Sym:
        a, b = self._wrap(a), self._wrap(b)
        dtype = self._result_dtype(a.node.dtype, b.node.dtype)
        a, b = self._cast(a, dtype), self._cast(b, dtype)
        shape = a.shape if len(a.shape) >= len(b.shape) else b.shape
        return Sym(self, Node(op, (a.node, b.node), "bool", max(a.node.scope, b.node.scope)), shape)

    def _unary(self, op, x) -> Sym:
        x = self._wrap(x)
        dtype = "bool" if op in ("isinf", "isnan") else x.node.dtype
        return Sym(self, Node(op, (x.node,), dtype, x.node.scope), x.shape)

    def _guard(self, x: Sym) -> bool:
        """``if`` on a traced value: allowed only for values of parameters alone (a switch)."""
        if x.node.scope != SCALAR or _depends_on_elements(x.node):
            raise TraceError("a Python if on an array value")
        value = bool(evaluate(x.node, self.values))
        self.trace.guards.append((x.node, value))
        return value

    add = lambda self, a, b: self._binary("add", a, b)
    subtract = lambda self, a, b: self._binary("sub", a, b)
    multiply = lambda self, a, b: self._binary("mul", a, b)
    divide = lambda self, a, b: self._binary("div", a, b)
    pow = lambda self, a, b: self._binary("pow", a, b)
    minimum = lambda self, a, b: self._binary("min", a, b)
    maximum = lambda self, a, b: self._binary("max", a, b)
    sqrt = lambda self, x: self._unary("sqrt", x)
    isinf = lambda self, x: self._unary("isinf", x)
    isnan = lambda self, x: self._unary("isnan", x)
    negative = lambda self, x: self._unary("neg", x)
    expm1 = lambda self, x: self._unary("expm1", x)

    def where(self, cond, a, b) -> Sym:
        cond, a, b = self._wrap(cond), self._wrap(a), self._wrap(b)
        dtype = self._result_dtype(a.node.dtype, b.node.dtype)
        a, b = self._cast(a, dtype), self._cast(b, dtype)
        scope = max(cond.node.scope, a.node.scope, b.node.scope)
        shape = max((cond.shape, a.shape, b.shape), key=len)
        return Sym(self, Node("where", (cond.node, a.node, b.node), dtype, scope), shape)

    def astype(self, x, dtype, copy=True, device=None) -> Sym:
        return self._cast(self._wrap(x), dtype.name)

    def asarray(self, x, dtype=None, device=None, copy=None) -> Sym:
        x = self._wrap(x)
        return x if dtype is None else self._cast(x, dtype.name)

    def full(self, shape, fill_value, dtype=None, device=None) -> Sym:
        if tuple(shape) != ():
            raise TraceError("the core asks only for 0-d constants")
        x = self._wrap(fill_value)
        return x if dtype is None else self._cast(x, dtype.name)

    def ones_like(self, x, dtype=None, device=None) -> Sym:
        return Sym(self, Node("const", (1,), dtype.name if dtype else x.node.dtype, SCALAR))

    def zeros_like(self, x, dtype=None, device=None) -> Sym:
        return Sym(self, Node("const", (0,), dtype.name if dtype else x.node.dtype, SCALAR))

    def isdtype(self, dtype, kind) -> bool:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        name = dtype.name
        return any(k == "real floating" and name in FLOATS or k == "integral" and name.startswith("int")
                   or k == "bool" and name == "bool" or isinstance(k, DType) and k.name == name for k in kinds)

    # ---- reductions ------------------------------------------------------------------------
    def _axis_kind(self, x: Sym, axis) -> str:
        if axis is None or (x.ndim <= 1):
            return "global"
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if tuple(a % x.ndim for a in axes) == tuple(range(1, x.ndim)):
            return "row"
        raise TraceError(f"a reduction over axes {axes} (only the trailing axes or all are fused)")

    def _reduce(self, kind: str, what: str, x: Sym, dtype: str) -> Sym:
        if x.node.scope != ELEM:
            raise TraceError("a reduction of a value that is not per element")
        scope = ROW if kind == "row" else SCALAR
        return Sym(self, Node(f"{kind}_{what}", (x.node,), dtype, scope), x.shape if kind == "row" else ())

    def sum(self, x, axis=None, keepdims=False, dtype=None) -> Sym:
        kind = self._axis_kind(x, axis)
        out = x.node.dtype if x.node.dtype in FLOATS else "int64"
        return self._reduce(kind, "sum", x, out if dtype is None else dtype.name)

    def mean(self, x, axis=None, keepdims=False) -> Sym:
        return self._reduce(self._axis_kind(x, axis), "mean", x, x.node.dtype)

    def std(self, x, axis=None, correction=0, keepdims=False) -> Sym:
        """Two passes, as spec A2 describes it: the mean, then the sum of squared deviations."""
        kind = self._axis_kind(x, axis)
        mean = self._reduce(kind, "mean", x, x.node.dtype)
        deviation = x - mean
        squares = self._reduce(kind, "sum", deviation * deviation, x.node.dtype)
        count = Sym(self, self.trace.params["cols"]) if kind == "row" else math.prod(x.shape)
        return self.sqrt(squares / (count - correction))


def _depends_on_elements(node: Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.scope != SCALAR or n.op == "load" or n.op.startswith(("row_", "global_")):
            return True
        stack.extend(a for a in n.args if isinstance(a, Node))
    return False


def evaluate(node: Node, values: dict):
    """The value of a node built from parameters and constants only (Python semantics)."""
    import operator

    if node.op == "param":
        return values[node.args[0]]
    if node.op == "const":
        return node.args[0]
    args = [evaluate(a, values) for a in node.args]
    ops = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
           "pow": operator.pow, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
           "eq": operator.eq, "ne": operator.ne, "neg": operator.neg, "cast": lambda v: v,
           "sqrt": math.sqrt}
    if node.op not in ops:
        raise TraceError(f"cannot evaluate {node.op} on the host")
    return ops[node.op](*args)


def guards_hold(guards, values: dict) -> bool:
    """Whether every recorded guard evaluates as when traced (a kernel is valid for ``values``)."""
    try:
        return all(bool(evaluate(node, values)) == expected for node, expected in guards)
    except KeyError:
        return False


@dataclass
class Traced:
    """The outputs of one traced ``_update``: name -> Node, plus what the trace recorded."""

    outputs: dict
    trace: Trace
    store_dtype: str


def trace(optimizer, ndim: int, dtype: str, sizes: dict, updates: bool = False) -> Traced:
    """Trace ``optimizer._update`` for a parameter of ``ndim`` dimensions and dtype ``dtype``.

    The symbolic parameter has shape (rows, cols) (ndim >= 2; its trailing axes collapsed: A1
    and A2 reduce over all of them) or (cols,) / () for ndim <= 1; ``sizes`` gives a real
    ``rows`` and ``cols`` for the guards on sizes (e.g. A2's "more than 2 elements").
    Hyperparameters become runtime parameters named after them; the step count is ``step``.
    ``updates``: instead of the new parameter, output ``updates = new - param`` (optax's form,
    rounded once in the parameter's dtype, as ``jnp.subtract`` rounds it) in place of the gradient,
    the parameter read-only."""
    from .._state import DOPEState, SAVEUSState  # noqa: F401 - the core's containers

    values = dict(_hyperparameter_values(optimizer), **sizes)
    tr = Trace()
    ns = Namespace(tr, values)
    rows, cols = ns.param("rows", "weak_int"), ns.param("cols", "weak_int")
    shape = {0: (), 1: (cols,)}.get(ndim, (rows, cols) + (1,) * (ndim - 2))
    param = ns.input("param", dtype, shape)
    grad = ns.input("grad", dtype, shape)
    buffers = [ns.input(name, dtype, shape) for name in optimizer.facts.buffers]
    state = optimizer.State(ns.param("step", "int64"), *buffers)
    proxy = _Proxy(optimizer, ns)
    new_param, new_state = type(optimizer)._update(proxy, param, grad, state)
    if updates:  # written over the gradient: XLA reuses its buffer (no fresh, page-faulting allocation)
        work = dtype if dtype in ("float32", "float64") else "float32"  # 16-bit: exact in float32, rounded once
        difference = ns.subtract(ns.astype(new_param, ns.dtype_of(work)), ns.astype(param, ns.dtype_of(work)))
        outputs = {"grad": ns.astype(difference, ns.dtype_of(dtype)).node}
    else:
        outputs = {"param": new_param.node}
    outputs.update({name: getattr(new_state, name).node for name in optimizer.facts.buffers})
    return Traced(outputs, tr, dtype)


def _hyperparameter_values(optimizer) -> dict:
    values = {}
    for name, value in optimizer.hparams.items():
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                values[f"{name}{i}"] = v
        elif isinstance(value, float):
            values[name] = value
    return values


class _Proxy:
    """The optimizer as its ``_update`` sees it, with real hyperparameters as runtime params."""

    def __init__(self, optimizer, ns):
        self._opt, self._ns = optimizer, ns
        self.quirks, self.facts = optimizer.quirks, optimizer.facts

    def __getattr__(self, name):
        value = getattr(self._opt, name)
        if name in self._opt.hparams:
            if isinstance(value, tuple):
                return tuple(self._ns.param(f"{name}{i}") for i in range(len(value)))
            if isinstance(value, float):
                return self._ns.param(name)
        return value
