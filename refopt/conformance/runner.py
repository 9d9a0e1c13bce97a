"""Running golden vectors on targets and judging every step (the engine behind `refopt check`).

Each (vector, target) pair becomes one ``CaseResult``. A target failing on one vector (it raised,
returned the wrong shape or dtype, produced NaN where the golden has none) fails that case only;
every other case still runs.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import registry
from ..quirks import Quirks
from . import backends
from .targets import PortFailure, SkipVector, clean_text
from .tolerance import judge

RELEVANT_QUIRKS = {key: facts.quirks for key, facts in registry.OPTIMIZERS.items()}


@dataclass
class CaseResult:
    vector: object
    target: object
    status: str  # "passed" | "failed" | "skipped"
    message: str = ""
    worst_budget_units: float = 0.0
    bitwise: int = 0  # param elements bit-equal to the golden, over all steps
    compared: int = 0  # param elements compared, over all steps
    first_bad: dict | None = None  # {"step", "what", "index", "expected", "actual", "reason"}
    outputs: list = field(default_factory=list, repr=False)
    seconds: float = 0.0
    diagnosis: object = None
    notes: tuple = ()         # remarks that do not fail the vector
    faults: tuple = ()        # why it failed although (or before) the numbers were judged
    unsupported: tuple = ()   # reference hyperparameters the port lacks that this vector needs

    @property
    def bitwise_fraction(self) -> float:
        return self.bitwise / self.compared if self.compared else 1.0


def profile_matches(vector, profile: str) -> bool:
    """True when the vector's quirks, on those its optimizer reads, are exactly ``profile``'s."""
    return config_matches(vector, Quirks.for_profile(profile).as_dict())


def config_matches(vector, config: dict) -> bool:
    """True when the vector's quirks, on those its optimizer reads, are ``config``'s (every quirk
    name -> bool)."""
    return all(bool(vector.quirks.get(q, config[q])) == config[q] for q in RELEVANT_QUIRKS[vector.optimizer])


def judge_outputs(vector, outputs) -> tuple[str, float, int, int, dict | None]:
    """(status, worst budget units, bitwise, compared, first_bad) of a target's outputs."""
    worst, bitwise, compared = 0.0, 0, 0
    for k, out in enumerate(outputs):
        checks = [("param", out.param)] + sorted(out.state.items())
        if out.step is not None:
            checks.append(("step", out.step))
        for what, actual in checks:
            j = judge(vector, k, actual, what=what)
            if what == "param":
                bitwise += j.bitwise_equal
                compared += j.n
            if math.isfinite(j.worst_budget_units):
                worst = max(worst, j.worst_budget_units)
            if not j.passed:
                # a finite failure is beyond k budget units; a NaN/inf mismatch counts as infinite
                units = j.worst_budget_units if j.worst_budget_units > vector.tolerance.get("k", 4.0) else math.inf
                return "failed", max(worst, units), bitwise, compared, _first_bad(vector, k, what, actual, j)
    return "passed", worst, bitwise, compared, None


def _first_bad(vector, k, what, actual, j) -> dict:
    idx = j.first_bad
    return {"step": k + 1, "what": what, "index": list(idx) if idx is not None else None, "reason": j.reason,
            "expected": j.expected, "actual": j.actual}


def run_case(vector, target) -> CaseResult:
    t0 = time.perf_counter()
    reason = target.skip_reason(vector)
    if reason:
        return CaseResult(vector, target, "skipped", reason)
    missing = target.unsupported(vector) if hasattr(target, "unsupported") else []
    if missing:
        names = ", ".join(f"{ref}={_json(vector.hparams[ref])}" + (f" (as {mine!r})" if mine != ref else "")
                          for ref, mine in missing)
        return CaseResult(vector, target, "skipped", f"needs {names}, which the port does not take",
                          unsupported=tuple(ref for ref, _ in missing))
    try:
        outputs = target.run(vector)
    except SkipVector as exc:
        return CaseResult(vector, target, "skipped", clean_text(exc), seconds=time.perf_counter() - t0)
    except PortFailure as exc:
        return CaseResult(vector, target, "failed", clean_text(exc), math.inf, outputs=list(exc.outputs),
                          seconds=time.perf_counter() - t0)
    status, worst, bitwise, compared, fb = judge_outputs(vector, outputs)
    msg = "" if fb is None else f"step {fb['step']}: {fb['reason']}"
    faults = _unique(clean_text(f) for o in outputs for f in o.faults)
    if faults:
        status, msg = "failed", "; ".join(faults) + (f" (and {msg})" if msg else "")
    return CaseResult(vector, target, status, msg, worst, bitwise, compared, fb, outputs,
                      time.perf_counter() - t0, notes=_unique(clean_text(n) for o in outputs for n in o.notes), faults=faults)


def _json(value) -> str:
    import json

    return json.dumps(value)


def _unique(texts) -> tuple:
    """Messages without repeats of the same one at a later step ("step 3: X" after "step 1: X")."""
    seen, out = set(), []
    for text in texts:
        key = re.sub(r"^step \d+: ", "", text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)


def plan(vectors, targets) -> list[tuple]:
    """(vector, target) pairs: the core takes every vector (it is configured with the vector's
    own profile and quirks); a port takes those of the optimizers it implements, in the
    configuration it implements (every configuration when it applies each vector's own)."""
    return [(v, target) for target in targets
            for v in (sample(vectors) if getattr(target, "sample", False) else vectors) if target.selects(v)]


def sample(vectors, per_group: int | None = None) -> list:
    """A deterministic sample covering every optimizer x dtype: a vector starting from a given
    state and a multi-axis one first, as they exercise the most of a step. Scale vectors are left
    to the full runs (a compiled backend named with --backend)."""
    n = backends.SAMPLE_PER_GROUP if per_group is None else per_group
    groups: dict = {}
    for v in vectors:
        if "Scale" in v.flags:
            continue
        groups.setdefault((v.optimizer, v.dtype), []).append(v)
    keep = set()
    for vs in groups.values():
        ranked = sorted(vs, key=lambda v: (v.state0 is None, -len(v.shape), v.id))
        keep |= {v.id for v in ranked[:n]}
    return [v for v in vectors if v.id in keep]


def run(pairs, progress: Callable[[int, int, str], None] | None = None) -> list[CaseResult]:
    """Every pair's result. Nothing a target does stops the run: an error of refopt's own while
    running or judging a case fails that case with the error, never passes it."""
    results = []
    for i, (v, target) in enumerate(pairs):
        try:
            r = run_case(v, target)
        except Exception as exc:  # noqa: BLE001
            r = CaseResult(v, target, "failed", f"refopt could not judge this case: {type(exc).__name__}: {exc}",
                           math.inf)
        if r.status != "failed":
            r.outputs = []  # only a diagnosis reads them; a scale vector's are megabytes
        results.append(r)
        if progress:
            progress(i + 1, len(pairs), f"{target.name} {v.id}")
    return results
