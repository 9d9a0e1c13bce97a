"""Why a vector failed: where it first diverged, and which clause or quirk the port most likely
gets wrong.

The verdict comes from re-running the vector on refopt's core (NumPy) in variants: every quirk the
optimizer reads flipped one at a time, the other profile, and each known porting mistake in
``mutants.CATALOGUE``. The variant whose trajectory the port's output matches (within the vector's
own tolerance) names the likely fault: "this port matches the documented profile on aliased_lerp
(Q1, clause S2)".
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass

from ..builders import mutants
from ..quirks import Quirks
from ..registry import PROFILES, QUIRKS
from . import backends
from .narrow import narrow
from .runner import RELEVANT_QUIRKS, judge_outputs



@dataclass
class Variant:
    label: str  # what a matching port does, as a sentence fragment
    make: object  # () -> optimizer


@dataclass
class Diagnosis:
    vector_id: str
    target: str
    first_bad: dict | None
    clauses: tuple
    flags: tuple
    reproduce: str
    verdict: str
    matches: list  # labels of the variants the port's output matches
    faults: tuple = ()  # what failed it besides the numbers (an input modified, a missing entry)
    narrowed: str = ""  # the earliest differing clause, when no variant matches
    notes: tuple = ()

    def text(self) -> str:
        lines = [f"{self.vector_id} on {self.target}"]
        lines += [f"  fault: {f}" for f in self.faults]
        fb = self.first_bad
        if fb:
            where = "step count" if fb["what"] == "step" else \
                f"{fb['what']}{fb['index']}" if fb["index"] is not None else fb["what"]
            lines.append(f"  first divergence: step {fb['step']}, {where}: expected {fb['expected']!r}, "
                         f"got {fb['actual']!r}")
            lines.append(f"  {fb['reason']}")
        lines.append(f"  clauses: {', '.join(self.clauses) or '-'}; flags: {', '.join(self.flags) or '-'}")
        lines.append(f"  verdict: {self.verdict}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  reproduce: {self.reproduce}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def variants(vector) -> list[Variant]:
    """The core in every one-change variant of the vector's own configuration."""
    h = vector.optimizer_hparams()
    base = vector.make_reference()
    cls = type(base)
    q = Quirks(**{k: bool(v) for k, v in vector.quirks.items() if k in Quirks.names()}).as_dict()
    out = []
    for name in RELEVANT_QUIRKS[vector.optimizer]:
        qid, clauses = QUIRKS[name].id, ", ".join(QUIRKS[name].clauses)
        flipped = dict(q, **{name: not q[name]})
        state = "documented" if flipped[name] == Quirks.for_profile("documented").as_dict()[name] else "reference"
        out.append(Variant(f"the {state} profile on {name} ({qid}, clause {clauses})",
                           lambda f=flipped: cls(**h, quirks=f)))
    for profile in PROFILES:
        if Quirks.for_profile(profile).as_dict() != q:
            out.append(Variant(f"profile {profile!r} throughout", lambda p=profile: cls(**h, profile=p)))
    for m in mutants.CATALOGUE:
        if m.optimizer == vector.optimizer and not m.quirks:
            out.append(Variant(f"the known mistake {m.name!r} (clause {m.clause}): {m.mistake}",
                               lambda n=m.name: mutants.make_optimizer(n, h, q)))
    return out


def _score(vector, variant_outputs, port_outputs) -> tuple[bool, float]:
    """Does the port's output match the variant's trajectory, judged with the vector's tolerance?"""
    steps = []
    for k, (var, _) in enumerate(zip(variant_outputs, port_outputs)):
        st = vector.steps[k]
        state = dict(st.state, **{n: vector.judged_part(var.state[n]).astype("float64") for n in var.state})
        steps.append(dataclasses.replace(st, param=vector.judged_part(var.param).astype("float64"), state=state))
    fake = dataclasses.replace(vector, steps=tuple(steps))
    status, worst, _, _, _ = judge_outputs(fake, port_outputs[: len(steps)])
    return status == "passed", worst


def verdict_for(vector, port_outputs, first_bad=None) -> tuple[str, list, str]:
    """(verdict, labels of the matching variants, the earliest differing clause when none matches)."""
    if not port_outputs:
        return "the port produced no output to compare (see the message above)", [], ""
    core = backends.CoreTarget(backends.numpy_backend())
    scored = []
    for var in variants(vector):
        try:
            outs = core.run(vector, make=var.make)
        except Exception:  # noqa: BLE001 - a variant that cannot run tells us nothing
            continue
        ok, worst = _score(vector, outs, port_outputs)
        scored.append((not ok, worst if math.isfinite(worst) else math.inf, var.label))
    matches = [label for bad, _, label in sorted(scored) if not bad]
    if matches:
        extra = f" (also consistent with: {'; '.join(matches[1:3])})" if len(matches) > 1 else ""
        return f"this port matches {matches[0]}{extra}", matches, ""
    try:
        narrowed = narrow(vector, port_outputs, first_bad)
    except Exception:  # noqa: BLE001 - a port's outputs the core cannot start from tell nothing more
        narrowed = ""
    if narrowed:
        return f"no single known deviation explains it; {narrowed}", [], narrowed
    clauses = ", ".join(vector.clauses) or "the clauses listed above"
    return f"no single known deviation explains it; check clauses {clauses} at the first divergence", [], ""


def reproduce(vector, target, argv_extra: tuple = ()) -> str:
    if target.kind == "core":
        args = ["refopt", "check", "--backend", target.backend.name]
    else:
        args = ["refopt", "check", "--port", target.spec]
    return shlex.join([*args, *argv_extra, "--ids", vector.id, "-v"])


def diagnose(result, argv_extra: tuple = (), search: bool = True) -> Diagnosis:
    v, t = result.vector, result.target
    narrowed = ""
    faults = tuple(getattr(result, "faults", ()))
    if faults and result.first_bad is None:
        verdict, matches = "its numbers are within tolerance; it fails for the fault above", []
    elif result.first_bad is None and result.message:
        steps = len(result.outputs)
        verdict, matches = (f"the port failed after {steps} correct step(s): {result.message}" if steps else
                            f"the port failed before producing output: {result.message}"), []
    elif search:
        # a port checked sharded (--shard) that passes unsharded: sharding is the cause
        sharded = t.sharding_verdict(v, result) if hasattr(t, "sharding_verdict") else None
        if sharded:
            verdict, matches = sharded, []
        else:
            verdict, matches, narrowed = verdict_for(v, result.outputs, result.first_bad)
    else:
        verdict, matches = "not searched", []
    return Diagnosis(v.id, t.name, result.first_bad, tuple(v.clauses), tuple(v.flags),
                     reproduce(v, t, argv_extra), verdict, matches, faults, narrowed,
                     tuple(getattr(result, "notes", ())))
