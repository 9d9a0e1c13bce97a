"""Differential fuzzing: ``refopt check --fuzz N [--seed S] [--fuzz-time SECONDS]``.

Hypothesis draws random cases (optimizer, dtype, shape from tiny to large, every hyperparameter
independently from its valid range and edge values, a gradient family, a fresh or given start at a
small or huge step count, a few steps); each becomes a vector in memory, judged exactly like a
golden file: the golden is refopt's core in float64, the budgets come from the same Monte Carlo
arithmetic run on the fly (spec/tolerance.md), and elements whose samples disagree with the golden
on being finite are not judged (a rounding decides them). The targets run it through the usual
runner. A failing case is shrunk by Hypothesis to a minimal one and written as a standard vector
file (``--fuzz-out DIR``), which ``refopt check --vectors DIR`` replays.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import time
from typing import Callable

import numpy as np

from .. import registry
from ..builders import catalog, generate
from . import runner, vectors
from .encoding import np_dtype
from .targets import ConfigError
from .tolerance import finfo

#: Edge values of each hyperparameter, drawn besides its default (listed first, so a shrunk case
#: keeps the defaults it does not need) and a value from its range.
EDGES = {
    "saveus": {
        "lr": ([0.0, 1e-2, 0.1], (1e-6, 1.0)),
        "eps": ([0.0, 1e-12, 1e-3, 1.0], (1e-10, 1e-2)),
        "weight_decay": ([0.0, -0.1, 1e-4, 0.1], (-1.0, 1.0)),
        "centralization": ([0.0, -0.5, 1.0, 2.0], (-2.0, 2.0)),
        "normalization": ([0.0, -1.0, 1.0, 0.25], (-2.0, 2.0)),
        "amp_fac": ([0.0, -1.0, 0.5, 10.0], (-4.0, 4.0)),
        "clip_lambda": ([None, {"power": 0.5}, {"power": 0.0}, {"power": -0.25}], None),
    },
    "dope": {
        "lr": ([0.0, 1e-2, 0.1], (1e-6, 1.0)),
        "momentum_beta": ([0.0, 0.5, 0.9, 0.999999], (0.0, 0.99999)),
        "eps": ([0.0, 1e-12, 1e-3, 1.0], (1e-10, 1e-2)),
        "eps2": ([0.0, 1e-6, 1.0], (1e-8, 1.0)),
        "eps_floor": ([0.0, 1e-8, 1e-4, 1e-2, 0.5], (1e-8, 1.0)),
        "weight_decay": ([0.0, -0.1, 1e-4, 0.1], (-1.0, 1.0)),
        "centralization": ([0.0, -0.5, 1.0, 2.0], (-2.0, 2.0)),
        "normalization": ([0.0, -1.0, 1.0, 0.25], (-2.0, 2.0)),
        "diff_mult": ([0.0, -1.0, 2.0], (-4.0, 4.0)),
        "momentum_lambda": ([0.0, 1.0, 0.5, -0.5], (-1.0, 2.0)),
        "gamma": ([0.0, 0.01, -0.01, 0.5], (-1.0, 1.0)),
        "clip": ([0.0, -1.0, 1e-3, 100.0], (1e-3, 1e3)),
    },
}
BETAS = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.999999]
FAMILIES = ("normal", "heavy-tailed", "ill-conditioned", "sparse", "nonfinite")
STARTS = (1000, 10**5, 10**7, 2**31 - 2)
#: The largest element count of a drawn shape: mostly small (fast, and where most mistakes already
#: show), sometimes medium, now and then large (the Scale vectors cover 2**17 and more).
CAPS = (64,) * 14 + (4096,) * 5 + (1 << 15,)


@dataclasses.dataclass
class FuzzOutcome:
    examples: int                      # cases run
    results: list                      # CaseResult of the failing case (all targets), or []
    failure: dict | None               # the minimal failing vector document, or None
    path: pathlib.Path | None          # where it was written
    seconds: float
    stopped_by_time: bool


class _OutOfTime(BaseException):
    """Raised inside the Hypothesis test when ``--fuzz-time`` has passed and nothing failed."""


def _strategies(optimizers, dtypes, config):
    from hypothesis import strategies as st

    def hparam(opt, h):
        edges, span = EDGES[opt].get(h.name, ([], None))
        if h.name == "betas":
            return st.tuples(st.sampled_from([h.default[0], *BETAS]), st.sampled_from([h.default[1], *BETAS]))
        if isinstance(h.default, bool):
            return st.sampled_from([h.default, not h.default])
        if h.name == "clip_lambda":
            return st.sampled_from([{"power": 0.25}, *edges])
        options = st.sampled_from([h.default, *edges])
        if span is None:
            return options
        low, high = span
        drawn = st.floats(low, high, allow_nan=False, allow_infinity=False)
        return st.one_of(options, drawn)

    @st.composite
    def shapes(draw):
        cap = draw(st.sampled_from(CAPS))
        dims = []
        for _ in range(draw(st.integers(0, 4))):
            dims.append(draw(st.integers(1, max(1, cap // math.prod(dims)))))
        if dims and draw(st.integers(0, 19)) == 0:
            dims[0] = 0  # now and then an empty tensor (A6)
        return tuple(dims)

    @st.composite
    def cases(draw):
        opt = draw(st.sampled_from(optimizers))
        facts = registry.OPTIMIZERS[opt]
        hp = {h.name: draw(hparam(opt, h)) for h in facts.hparams}
        hp["betas"] = list(hp["betas"])
        warm = draw(st.sampled_from([0, 0, 1, 3]))
        return dict(
            optimizer=opt, dtype=draw(st.sampled_from(dtypes)), shape=draw(shapes()), hparams=hp,
            profile="reference",
            quirks={q: (draw(st.booleans()) if config is None else config[q]) for q in facts.quirks},
            steps=draw(st.integers(1, 4)), warm=warm,
            start_step=draw(st.sampled_from([0, *STARTS])) if warm else 0,
            family=draw(st.sampled_from(FAMILIES)), scale=draw(st.integers(-6, 3)),
            seed=draw(st.integers(0, 2**32 - 1)))

    return cases()


def _values(rng, family: str, shape, dtype: str, scale: int, step: int) -> np.ndarray:
    """One array of a gradient family around ``10**scale``, rounded to ``dtype`` (exact there).
    Magnitudes stay below where a sum of squares could overflow the work dtype (spec/numerics.md
    leaves reductions that close to overflow implementation-defined)."""
    top = 0.5 * math.log10(finfo(dtype)["max"] / max(1, math.prod(shape))) - 2
    exponent = min(scale, top - 2)
    x = rng.standard_normal(shape)
    if family == "heavy-tailed":
        x = rng.standard_t(1.5, size=shape)
    elif family == "ill-conditioned":
        span = 2.0 if dtype == "float16" else 6.0
        x = x * 10.0 ** rng.uniform(-span, span, size=shape)
    elif family == "sparse":
        x = np.where(rng.random(shape) < 0.8, 0.0, x)
    x = np.clip(x * 10.0**exponent, -(10.0**top), 10.0**top)
    if family == "nonfinite" and step == 1 and x.size:
        x.reshape(-1)[rng.integers(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return np.asarray(x, dtype=np.float64).astype(np_dtype(dtype))


def build(draw: dict):
    """(Vector, document) of one drawn case; NothingToJudge when no element is stable."""
    rng = np.random.Generator(np.random.PCG64(draw["seed"]))
    label = "fuzz-" + hashlib.sha256(repr(sorted(draw.items())).encode()).hexdigest()[:8]
    case = catalog.Case(draw["optimizer"], label, draw["dtype"], draw["shape"], hparams=draw["hparams"],
                        profile=draw["profile"], quirks=draw["quirks"], steps=draw["steps"], warm=draw["warm"],
                        grads=draw["family"], scale=10.0 ** draw["scale"], start_step=draw["start_step"],
                        flags=("Fuzz",))
    param0 = _values(rng, "normal", case.shape, case.dtype, 0, 0)
    grads = [_values(rng, draw["family"], case.shape, case.dtype, draw["scale"], i) for i in range(case.steps)]
    state0 = None
    if case.warm:  # the state after a few steps of normal gradients, its count set to start_step
        warm = [_values(rng, "normal", case.shape, case.dtype, draw["scale"], 0) for _ in range(case.warm)]
        with np.errstate(all="ignore"):
            p, st = generate._golden(generate._optimizer(case), param0, warm, None)[-1]
            param0 = p.astype(np_dtype(case.dtype))
            state0 = {k: (v if k == "step" else v.astype(np_dtype(case.dtype))) for k, v in st.items()}
        if case.start_step:
            state0["step"] = case.start_step
    doc = generate.document(case, param0, grads, state0, exclude_unstable=True)
    return vectors.parse(generate.render(doc), f"<{case.name}>"), doc


def run(targets, *, examples: int, seed: int = 0, seconds: float | None = None, optimizers=None, dtypes=None,
        out: pathlib.Path | None = None, progress: Callable[[int, int, str], None] | None = None) -> FuzzOutcome:
    """Fuzz ``targets`` with ``examples`` cases (fewer when ``seconds`` run out first). The quirks
    are drawn too, unless a target implements one configuration (a port's ``config``)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed

    optimizers = tuple(optimizers or registry.OPTIMIZERS)
    for t in targets:
        if getattr(t, "optimizers", None):
            optimizers = tuple(o for o in optimizers if o in t.optimizers)
    dtypes = tuple(dtypes or registry.DTYPES)
    configs = [t.config for t in targets if getattr(t, "config", None) is not None]
    if any(c != configs[0] for c in configs):
        raise ConfigError("ports that implement different configurations cannot be fuzzed together")
    if not optimizers:
        raise ConfigError("the targets implement no common optimizer to fuzz")
    t0 = time.perf_counter()
    state = {"count": 0, "failure": None, "timed_out": False}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False, verbosity=Verbosity.quiet,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
    @given(_strategies(optimizers, dtypes, configs[0] if configs else None))
    def check(draw):
        if state["failure"] is None and seconds is not None and time.perf_counter() - t0 > seconds:
            state["timed_out"] = True
            raise _OutOfTime  # a BaseException: Hypothesis stops at once (a failure found is still shrunk)
        try:
            vector, doc = build(draw)
        except generate.NothingToJudge:
            return
        state["count"] += 1
        results = [runner.run_case(vector, t) for t in targets]
        if progress:
            progress(state["count"], examples, vector.name)
        failed = [r for r in results if r.status == "failed"]
        if failed:
            state["failure"] = (doc, results)  # the last failing case Hypothesis runs is its minimal one
            raise AssertionError(failed[0].message)

    try:
        check()
    except _OutOfTime:
        pass
    except Exception:  # noqa: BLE001 - the failure (or Hypothesis's report of it) is recorded
        if state["failure"] is None:
            raise
    failure, path, results = None, None, []
    if state["failure"] is not None:
        failure, results = state["failure"]
        path = write(failure, out or pathlib.Path("refopt-fuzz"))
    return FuzzOutcome(state["count"], results, failure, path, time.perf_counter() - t0, state["timed_out"])


def write(doc: dict, out: pathlib.Path) -> pathlib.Path:
    """Add the vector ``doc`` to the vector directory ``out`` (created if needed; SHA256SUMS kept)."""
    vdir = out / vectors.VECTORS_SUBDIR
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / f"{doc['id']}.json"
    path.write_bytes(generate.render(doc))
    files = {f"{vectors.VECTORS_SUBDIR}/{f.name}": f.read_bytes() for f in sorted(vdir.glob("*.json"))}
    (out / vectors.CHECKSUMS).write_bytes(generate.checksums(files))
    return path
