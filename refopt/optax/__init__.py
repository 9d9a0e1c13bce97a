"""optax adapter: SAVEUS and DOPE as optax gradient transformations over arbitrary pytrees.

    tx = refopt.optax.dope(1e-4, weight_decay=0.1)     # or learning_rate=..., or lr=...
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)   # params are required
    params = optax.apply_updates(params, updates)

Each leaf is stepped by the core (refopt.SAVEUS / refopt.DOPE), so per-tensor clauses (S1/S2,
D1-D3, D10, D12) act per leaf, as the reference acts per parameter tensor. Under ``jax.jit`` with
sharded inputs the core's reductions are global over each (sharded) leaf. On the CPU backend of one
device (``fused=None``, the default) each floating leaf is stepped by refopt.fused's compiled kernel
instead: the core's step traced and compiled to C, called as an XLA FFI custom call that updates the
donated parameter and state in place; it equals the core up to the summation order of its
reductions (within the vectors' budgets), and takes the hyperparameters as float64 with or without
``jax_enable_x64``. Without a C compiler, large DOPE leaves (float32/float64, at least
``_rowblock.MIN_NUMEL`` elements, ndim >= 2) take a row-blocked program built from the same clause
functions (see ``_rowblock.py``), the rest the core.

Learning rate. ``learning_rate`` (optax's name, first positional) and ``lr`` (the reference's
name) are aliases; give at most one. It is a number or a schedule ``count -> lr`` where ``count``
is ``state.step`` before the update, i.e. the number of updates already applied (0 on the first),
exactly as ``optax.scale_by_schedule`` counts. Update number t = count + 1 (the reference's 1-based
step) uses ``lr_t = schedule(t - 1)`` everywhere the reference reads ``group['lr']`` during that
step: S3/S8/S10 (step_size = lr_t / bc1) and D13/D14 (-lr_t * weight_decay, -lr_t). That is what a
PyTorch LR scheduler stepped after every ``optimizer.step()`` produces. The value is used as the
reference uses its Python float: computed in the scalar dtype (A4) and rounded to the work dtype
where applied. Schedule values are not validated (that would need a host sync); negative or
non-finite values propagate (A5).

Updates and exactness. The core returns the new parameter; optax wants ``updates`` with
``params + updates == new_params``. ``updates = new - param`` is exact whenever new and param are
within a factor of two of each other (Sterbenz), so ``apply_updates`` reproduces the core bit for
bit on those elements; elsewhere (a sign change, or |update| >= |param|) the re-added result may
differ from the core's by at most one rounding at the larger of |param|, |new|, i.e. within the
tolerance model (one unit in the last place of the parameter's scale). ``refopt.optax.step(tx,
grads, state, params)`` returns the core's new parameters exactly. The fused kernel computes that
difference itself and writes it over the gradient's buffer, reading the parameter only: inside a
jitted training step (gradients computed in it, parameters and state donated) nothing is copied
and ``apply_updates`` is one pass; a gradient that is an argument of the jitted function and not
donated is copied first (the caller's array is never modified).

State. ``SAVEUSState(step, ema, ema_squared)`` / ``DOPEState(step, exp_avg, fim, fim_diff,
prev_grad)``: one 0-d integer ``step`` (updates done; all leaves step together; int64 with x64, so
it counts past 2**31 - 1 exactly as S0/D0 require, else JAX's int32) and one pytree per
core buffer, shaped like ``params`` (and sharded like it). They are the core's NamedTuples
(``refopt.SAVEUSState``/``refopt.DOPEState``, fields readable as attributes or keys) holding
pytrees where the core holds arrays.

Injected hyperparameters. ``optax.inject_hyperparams(refopt.optax.dope)(learning_rate=1e-3)`` works:
the numbers it hands over as 0-d arrays are taken as the Python numbers they hold, and the
learning rate may be traced. Inside ``jax.jit`` only the learning rate can be: the other
hyperparameters decide which clauses act and are read as Python numbers, as the reference reads
them, so keep them static with ``static_args=refopt.optax.STATIC_ARGS["dope"]`` (always needed for
SAVEUS, whose ``clip_lambda`` inject_hyperparams would otherwise call as a schedule). Note that
inject_hyperparams rounds the numbers it holds to the parameters' dtype unless given
``hyperparam_dtype=jnp.float64``.

Compilation. The update is jitted inside (eager calls too), once per tree structure, shapes and
dtypes; a schedule must therefore be traceable, as optax schedules are. The compiled program holds
one copy of the step per leaf: XLA compile time grows with the number of leaves (about 0.3-0.7 s
per leaf on a small CPU). ``check_finite=True`` reads values on the host, so that configuration
runs eagerly and cannot be used under ``jax.jit``.
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _docs, _validate
from .._arrays import is_real_floating
from .._optimizer import Optimizer
from .._state import DOPEState, SAVEUSState  # the core's containers; here each field is a pytree
from ..dope import DOPE
from ..saveus import SAVEUS
from . import _rowblock

Schedule = Callable[[Any], Any]
ScalarOrSchedule = Union[float, Schedule]


_STATES = {SAVEUS: SAVEUSState, DOPE: DOPEState}


def saveus(learning_rate: ScalarOrSchedule | None = None, *, lr: ScalarOrSchedule | None = None,
           **hparams) -> optax.GradientTransformationExtraArgs:
    """SAVEUS (spec/saveus.md) as an optax ``GradientTransformation``."""
    return transform(SAVEUS, learning_rate, lr=lr, **hparams)


def dope(learning_rate: ScalarOrSchedule | None = None, *, lr: ScalarOrSchedule | None = None,
         **hparams) -> optax.GradientTransformationExtraArgs:
    """DOPE (spec/dope.md) as an optax ``GradientTransformation``."""
    return transform(DOPE, learning_rate, lr=lr, **hparams)


def _factory_docs(fn, core):
    """Signature and docstring of ``saveus``/``dope`` from the registry (as the core's)."""
    facts = core.facts
    P = inspect.Parameter
    params = [P("learning_rate", P.POSITIONAL_OR_KEYWORD, default=None), P("lr", P.KEYWORD_ONLY, default=None)]
    params += [P(h.name, P.KEYWORD_ONLY, default=h.default) for h in facts.hparams if h.name != "lr"]
    params += [P("profile", P.KEYWORD_ONLY, default="reference"), P("quirks", P.KEYWORD_ONLY, default=None),
               P("check_finite", P.KEYWORD_ONLY, default=False)]
    fn.__signature__ = inspect.Signature(params, return_annotation=optax.GradientTransformationExtraArgs)
    alias = ("    learning_rate: optax's name for ``lr`` (give one of them); a number or a schedule "
             "``count -> lr``, count = updates already applied.")
    fn.__doc__ = "\n\n".join([
        fn.__doc__, _docs.args_section(facts, extra=alias), _docs.update_section(facts, core.UPDATE),
        _docs.state_section(facts).replace(f"State: {facts.name}State(",
                                           f"State: refopt.{facts.name}State(") + "\n    (each buffer a pytree "
        "shaped like params; one integer step for all leaves: int64 with x64, else int32)",
        f"Example:\n    >>> tx = refopt.optax.{fn.__name__}(1e-3)\n    >>> state = tx.init(params)\n"
        "    >>> updates, state = tx.update(grads, state, params)   # params are required\n"
        "    >>> params = optax.apply_updates(params, updates)"])


_factory_docs(saveus, SAVEUS)
_factory_docs(dope, DOPE)


def transform(cls: type[Optimizer], learning_rate: ScalarOrSchedule | None = None, *,
              fused: bool | None = None, **hparams) -> optax.GradientTransformationExtraArgs:
    """The optax transformation for a core optimizer class (``refopt.SAVEUS`` or ``refopt.DOPE``).

    ``hparams`` go to the core constructor, ``profile`` and ``quirks`` included. The step is
    jitted (also when called eagerly) except with ``check_finite=True``, which syncs with the host
    and so works only outside ``jax.jit``. ``fused`` (default None: where possible): on the CPU
    backend of one device, each leaf is stepped by refopt.fused's compiled
    kernel, an XLA FFI custom call that updates the donated parameter and state in place
    (refopt/fused/jax_ffi.py); True raises where a leaf cannot be, False never uses it."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if cls not in _STATES:
        raise TypeError(f"refopt.optax.transform: expected refopt.SAVEUS or refopt.DOPE, got {cls!r}")
    learning_rate = _pick_lr(learning_rate, hparams.pop("lr", None))
    if _is_array(learning_rate):  # optax.inject_hyperparams: a jax scalar, traced under jax.jit
        learning_rate = _constant_schedule(learning_rate)
    hparams = {k: _python_number(cls, k, v) for k, v in hparams.items()}
    schedule = learning_rate if callable(learning_rate) else None
    if schedule is None and learning_rate is not None:
        hparams["lr"] = learning_rate
    opt = cls(**hparams)  # validates everything, a constant lr included
    State = _STATES[cls]

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        per_leaf = [_leaf_init(opt, path, p) for path, p in zip(_paths(params), leaves)]
        buffers = [treedef.unflatten([b[i] for b in per_leaf]) for i in range(len(State._fields) - 1)]
        return State(_step_zero(leaves), *buffers)

    def step_leaves(grads, state, params, as_updates: bool):
        """(new_params or updates, new_state), leaf by leaf. Updates are ``new - param`` rounded
        once in the leaf's dtype; the fused kernel writes them itself, reading the parameter only."""
        if not isinstance(state, State):
            raise TypeError(f"refopt.optax.{opt.name.lower()}: state must be a refopt.optax.{State.__name__} "
                            f"from this transformation's init, got {type(state).__name__}")
        if params is None:
            raise ValueError(f"refopt.optax.{opt.name.lower()}: update needs params (the reference's step "
                             "reads the parameter: weight decay, and the new value is computed from it)")
        step_opt = opt if schedule is None else _with_lr(opt, schedule(state.step))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        g_leaves = treedef.flatten_up_to(grads)
        bufs = [treedef.flatten_up_to(b) for b in state[1:]]
        leaves = [jnp.asarray(p) for p in leaves]  # NumPy leaves are accepted, as optax does
        g_leaves = [jnp.asarray(g) for g in g_leaves]
        outs, new_bufs = [], [[] for _ in bufs]
        steps = [_leaf_step(opt, p, fused) for p in leaves]
        # XLA runs the kernels of independent leaves concurrently on its own threads: a kernel
        # then takes one thread, and all of them only when it is the step's only one
        kernels = [getattr(leaf_step, "func", None) is _fused_step for leaf_step in steps]
        threads = None if sum(kernels) == 1 else 1
        for i, (p, g, leaf_step) in enumerate(zip(leaves, g_leaves, steps)):
            leaf_state = opt.State(state.step, *(b[i] for b in bufs))
            if kernels[i]:
                out, s = leaf_step(step_opt, p, g, leaf_state, updates=as_updates, threads=threads)
                if not as_updates:
                    out = out.astype(p.dtype)
            else:
                n, s = leaf_step(step_opt, p, g, leaf_state)
                out = n.astype(p.dtype)  # a no-op unless _weak had to fall back
                out = jnp.subtract(out, p) if as_updates else out
            outs.append(out)
            for acc, x in zip(new_bufs, s[1:]):
                acc.append(x)
        new_state = State(state.step + 1, *(treedef.unflatten(b) for b in new_bufs))
        return treedef.unflatten(outs), new_state

    exact_step = functools.partial(step_leaves, as_updates=False)  # (new_params, new_state)
    updates_step = functools.partial(step_leaves, as_updates=True)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return updates_step(updates, state, params)

    # Traced even when called eagerly: one compiled program per tree structure (no per-leaf
    # dispatch), and the core's device checks see tracers, so eagerly passed multi-device (sharded)
    # leaves work too. check_finite reads values on the host, so it stays eager.
    if not opt.check_finite:
        exact_step, updates_step = jax.jit(exact_step), jax.jit(updates_step)
    update_fn.refopt_step = exact_step
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_array(value) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic)) and not isinstance(value, (bool, np.bool_))


def _constant_schedule(value):
    """A learning rate given as an array (``optax.inject_hyperparams`` passes one, traced inside
    ``jax.jit``): used as a schedule's value would be, never read on the host."""
    if np.ndim(value) != 0:
        raise TypeError(f"learning_rate must be a number or a 0-d array, got shape {np.shape(value)}")

    def schedule(count):
        return value

    return schedule


def _python_number(cls, name, value):
    """A hyperparameter given as a 0-d array (``optax.inject_hyperparams`` turns every number it is
    given, and every default, into one) as the Python number the core validates. Only the
    learning rate may be traced: the others decide which clauses act (S1, D1, D13, ...) and are
    read as Python numbers, as the reference reads them."""
    if not _is_array(value):
        return value
    if name == "clip_lambda":  # inject_hyperparams calls every callable it is given as a schedule
        raise TypeError(
            f"refopt.optax.saveus: clip_lambda arrived as a number, not a function (optax.inject_hyperparams "
            f"takes callables for schedules); keep it static: optax.inject_hyperparams(refopt.optax.saveus, "
            f"static_args=refopt.optax.STATIC_ARGS['saveus'])")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"refopt.optax.{cls.__name__.lower()}: {name} is a traced value (optax.inject_hyperparams "
            f"inside jax.jit?); only the learning rate can change inside a compiled step. Keep the others "
            f"static: optax.inject_hyperparams(refopt.optax.{cls.__name__.lower()}, "
            f"static_args=refopt.optax.STATIC_ARGS[{cls.__name__.lower()!r}])")
    if np.ndim(value) != 0:
        raise TypeError(f"{name} must be a real number, got an array of shape {np.shape(value)}")
    number = np.asarray(value).item()  # exact: float32/float64 values are Python floats exactly
    return number


#: For ``optax.inject_hyperparams(refopt.optax.dope, static_args=STATIC_ARGS["dope"])``: every
#: hyperparameter but the learning rate stays a Python number, so the update can be jitted with
#: the learning rate injected.
STATIC_ARGS = {key: tuple(h.name for h in facts.hparams if h.name != "lr") + ("profile", "quirks", "check_finite")
               for key, facts in ((c.facts.key, c.facts) for c in (SAVEUS, DOPE))}


def step(tx: optax.GradientTransformation, grads, state, params):
    """``(new_params, new_state)`` with the core's new parameters bit for bit (no re-addition)."""
    fn = getattr(tx.update, "refopt_step", None)
    if fn is None:
        raise TypeError("refopt.optax.step: tx must come from refopt.optax.saveus, dope or transform")
    return fn(grads, state, params)


def _pick_lr(learning_rate, lr):
    if learning_rate is not None and lr is not None:
        raise TypeError("give learning_rate or lr (aliases), not both")
    return lr if learning_rate is None else learning_rate


def _paths(tree):
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _leaf_init(opt, path, p):
    """S0/D0 zero buffers for one leaf. zeros_like keeps a sharded leaf's sharding (the core's init
    also makes a per-leaf step on the leaf's device, which JAX refuses for a multi-device sharding)."""
    if not hasattr(p, "dtype") or not hasattr(p, "shape"):
        raise TypeError(f"refopt.optax.{opt.name.lower()}: leaf {path or '<root>'} is not an array "
                        f"({type(p).__name__})")
    if not is_real_floating(jnp, p.dtype):
        raise TypeError(f"refopt.optax.{opt.name.lower()}: leaf {path or '<root>'}: param dtype must be "
                        f"real floating, got {p.dtype}")
    return [jnp.zeros_like(p) for _ in opt.State._fields[1:]]


def _step_zero(leaves):
    """The 0-d count, replicated over the mesh of the first mesh-sharded leaf if any, so an eager
    first update sees the placement later ones do (one compilation, not two). int64 where JAX has
    it (x64): an int32 count wraps past 2**31 - 1 (S0/D0; the StepCountInt64 vectors)."""
    zero = jnp.zeros([], jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32)
    for p in leaves:
        sharding = getattr(p, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.device_put(zero, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return zero


def _with_lr(opt, value):
    """A copy of ``opt`` whose lr is a (possibly traced) scalar behaving like the reference's Python
    float: scalar dtype, weakly typed so it rounds to the work dtype where applied (A4)."""
    sdtype = np.dtype("float64" if jax.config.read("jax_enable_x64") else "float32")
    new = copy.copy(opt)
    object.__setattr__(new, "_hparams", dict(opt._hparams, lr=_weak(jnp.asarray(value, dtype=sdtype))))
    return new


def _weak(x):
    # JAX has no public way to mark an array weakly typed, as Python floats are. Should the private
    # helper go, a strong float64 lr promotes float32 leaves in D13/D14; the cast back to the
    # leaf dtype in exact_step then bounds the difference to one rounding.
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - future JAX
        return x
    return _convert_element_type(x, x.dtype, weak_type=True)


def _core_step(opt, p, g, state):
    return opt.step(p, g, state)


def _leaf_step(opt, p, fused):
    """How a leaf is stepped: the fused kernel (CPU, one device) unless
    ``fused`` is False or the configuration cannot be fused; else the row-blocked walk for large
    DOPE leaves; else the core."""
    if fused is not False and p.size and not opt.check_finite and _fused_leaf(opt, p):
        return functools.partial(_fused_step, opt)
    if fused and p.size:  # an empty leaf only counts the step (A6): no kernel needed
        raise RuntimeError(f"refopt.optax: fused=True, but leaf {p.shape} {p.dtype} cannot take the fused kernel "
                           "(it needs the CPU backend on one device and a C compiler)")
    return _rowblock.step if _rowblock.applies(opt, p) else _core_step


def _fused_leaf(opt, p) -> bool:
    from .. import fused as fused_kernels
    from ..fused import jax_ffi

    if str(p.dtype) not in ("float16", "bfloat16", "float32", "float64") or not jax_ffi.usable():
        return False
    if not fused_kernels.available():
        return False
    rows = p.shape[0] if p.ndim >= 2 else 1
    try:
        jax_ffi.target_for(opt, p.ndim, str(p.dtype), rows, p.size // rows if rows else 0)
    except (fused_kernels.TraceError, fused_kernels.CompilerUnavailable):
        return False
    return True


def _fused_step(static_opt, opt, p, g, state, updates=False, threads=None):
    """``opt`` (whose lr may be a traced schedule value) through the kernel of ``static_opt``;
    ``updates``: return ``new - p`` (the parameter is only read); ``threads``: the kernel's
    (None: every CPU this process may use)."""
    from ..fused import jax_ffi

    _validate.step_inputs(opt.facts.name, opt.State, p, g, state)
    return jax_ffi.step(static_opt, p, g, state, runtime=opt.hparams, updates=updates, threads=threads)


__all__ = ["saveus", "dope", "transform", "step", "SAVEUSState", "DOPEState", "STATIC_ARGS"]
