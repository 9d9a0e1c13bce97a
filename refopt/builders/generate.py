"""Generate the golden vectors: ``refopt vectors generate [--out DIR] [--check]``.

Deterministic: every random number comes from a PCG64 seeded by the case name, every value is
written as raw little-endian bytes, hyperparameters as the shortest round-trip decimal, keys in
a fixed order. Running it twice, or on another machine, writes the same bytes.

For each case (catalog.py):
1. inputs: param0, the gradients and (for GivenState cases) a warm state, exact in the dtype;
2. golden: the refopt core in float64 NumPy on those exact inputs (spec/tolerance.md);
3. budgets: the same core on the Monte Carlo arithmetic namespace (mca.py), N samples;
4. checks: goldens and budgets finite unless the case is about non-finite values.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys

import numpy as np

from .. import SPEC_VERSION
from ..conformance import tolerance
from ..conformance.encoding import encode, encode_compressed, np_dtype
from ..conformance.vectors import (CHECKSUMS, FORMAT, STATE_NAMES, VECTORS_SUBDIR, Generated, default_dir,
                                  hparams_from_json, materialize)
from . import catalog, mca

SAMPLES = 32
STATIC_FILES = ("schema.json", "FLAGS.md", "README.md")


def case_seed(name: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}{name}".encode()).digest()[:8], "little")


def _exact(x, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (nearest), returned in that dtype."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np_dtype(dtype))


def _grads(case: catalog.Case, rng, steps: int) -> list:
    shape, s = case.shape, case.scale
    out = []
    for i in range(steps):
        g = rng.standard_normal(shape) * s
        if case.grads == "underflow":  # magnitudes in [1, 3) * scale: none near zero
            n = g / s
            g = np.where(n < 0, -s, s) * (1.0 + np.minimum(np.abs(n), 1.99))
        if case.grads in ("mixed", "underflow") and g.ndim:
            rows = [1e-3, 1.0, 10.0, 0.1] if case.grads == "mixed" else [1.0, 1e12]
            scales = np.array(rows)[np.arange(shape[0]) % len(rows)]
            g = g * scales.reshape(-1, *(1,) * (g.ndim - 1))
        elif case.grads == "zeros":
            # exact zeros: the D12 test (u * g) > 0 sits exactly on its edge there
            flat = g.reshape(-1).copy()
            flat[:: 3] = 0.0
            flat[1 + i % 2:: 5] = 0.0
            g = flat.reshape(shape)
        elif case.grads == "offset":
            # a common offset s with noise of about one ulp of s in the dtype: the std is then
            # comparable to the rounding of the mean, so rounding the mean inside the std to D
            # (instead of keeping it in W, A2) shows in the state
            g = g / s * s * 2.0 ** -tolerance.finfo(case.dtype)["nmant"] + s
        elif case.grads == "overflow-row":
            # row 1 the constant 2**1000: a sum of equal powers of two is exact in any order, so
            # its std is exactly 0 everywhere and g / (0 + 1e-8) overflows (S2/D2 with Q1)
            g = g.copy()
            g[1] = 2.0**1000
        elif case.grads == "nonfinite" and i == 5:
            g = g.copy()
            g.reshape(-1)[g.size // 2] = np.nan
        out.append(_exact(g, case.dtype))
    return out


def _initial_state(opt, param, state0):
    """The optimizer state for ``param`` (float64 numpy): fresh, or from a state dict."""
    state = opt.init(param)
    if state0 is not None:
        state = type(state)(**{k: (np.asarray(v, dtype=np.int64) if k == "step" else
                                   np.asarray(v, dtype=np.float64)) for k, v in state0.items()})
    return state


def _golden(opt, param0, grads, state0) -> list:
    p = np.asarray(param0, dtype=np.float64)
    state = _initial_state(opt, p, state0)
    out = []
    with np.errstate(all="ignore"):
        for g in grads:
            p, state = opt.step(p, np.asarray(g, dtype=np.float64), state)
            out.append((p, {k: (int(state.step) if k == "step" else getattr(state, k))
                            for k in state._fields}))
    return out


def inputs(case: catalog.Case):
    """(param0, grads, state0) of a case, exact in its dtype. For a format-2 (counter) case each
    input is a ``Generated`` (``vectors.materialize`` makes the array), as its file names it."""
    if case.counter:
        return _counter_inputs(case)
    rng = np.random.Generator(np.random.PCG64(case_seed(case.name)))
    param0 = _exact(rng.standard_normal(case.shape) * case.pscale, case.dtype)
    state0 = None
    if case.warm:
        opt = _optimizer(case)
        warm = _golden(opt, param0, _grads(case, rng, case.warm), None)
        p, st = warm[-1]
        param0 = _exact(p, case.dtype)
        state0 = {k: (v if k == "step" else _exact(v, case.dtype)) for k, v in st.items()}
        if case.start_step:  # a long horizon: the buffers of a short run, the count of a long one
            state0["step"] = case.start_step
    return param0, _grads(case, rng, case.steps), state0


def _counter_inputs(case):
    """Streams: 0 the parameter, 1..steps the gradients, 16 + i the i-th state buffer."""
    seed = case_seed(case.name)

    def make(stream, exponent=0, centred=True):
        return Generated(seed, stream, exponent, centred, case.dtype, tuple(case.shape))

    grads = [make(1 + i) for i in range(case.steps)]
    buffers = catalog.COUNTER_STATE[case.optimizer]
    state0 = {"step": case.start_step,
              **{k: make(16 + i, *buffers[k]) for i, k in enumerate(STATE_NAMES[case.optimizer])}}
    return make(0), grads, state0


def judged_indices(shape, stride: int = 64, edge: int = 64) -> np.ndarray:
    """The elements a scale vector judges (flat C-order indices): every ``stride``-th, the first and
    last ``edge`` of the tensor, and the first and last ``edge`` of every row when rows (the last
    axis) are at least ``2 * edge`` long: where block-wise reductions and vectorised tails go wrong.
    Judging a subset keeps the files small and the chance that an honest port exceeds its budget
    somewhere by bad luck as small as for a small vector (spec/tolerance.md)."""
    n = int(np.prod(shape, dtype=np.int64))
    i = np.arange(n)
    keep = (i % stride == 0) | (i < edge) | (i >= n - edge)
    row = shape[-1] if len(shape) else 1
    if row >= 2 * edge:
        j = i % row
        keep |= (j < edge) | (j >= row - edge)
    return i[keep]


def _optimizer(case):
    import refopt

    cls = refopt.SAVEUS if case.optimizer == "saveus" else refopt.DOPE
    return cls(**hparams_from_json(case.optimizer, case.full_hparams()), profile=case.profile,
               quirks=case.quirks or None)


def _input_json(x, dtype):
    return x.as_json() if isinstance(x, Generated) else encode(x, dtype)


def vector_id(case, param0, grads, state0) -> str:
    canon = {
        "optimizer": case.optimizer, "profile": case.profile, "quirks": case.full_quirks(),
        "hparams": case.full_hparams(), "dtype": case.dtype, "shape": list(case.shape),
        "param0": _input_json(param0, case.dtype), "grads": [_input_json(g, case.dtype) for g in grads],
        "state0": None if state0 is None else {k: (v if k == "step" else _input_json(v, case.dtype))
                                              for k, v in state0.items()},
    }
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return f"{case.optimizer}-{hashlib.sha256(blob).hexdigest()[:12]}"


def build(case: catalog.Case) -> tuple:
    """(id, document) of one case."""
    param0, grads, state0 = inputs(case)
    doc = document(case, param0, grads, state0, judged=judged_indices(case.shape) if case.counter else None)
    return doc["id"], doc


class NothingToJudge(Exception):
    """Every element of a case is unstable (``document(..., exclude_unstable=True)``)."""


def unstable(golden, drawn) -> np.ndarray:
    """Where the samples ``drawn`` [N, ...] disagree with ``golden`` on being NaN, infinite or finite:
    a rounding can decide it, so no result there is right or wrong."""
    g = np.asarray(golden, dtype=np.float64)[None]
    with np.errstate(invalid="ignore"):
        nan = np.isnan(g) & ~np.isnan(drawn)
        inf = np.isinf(g) & (drawn != g)
        finite = np.isfinite(g) & ~np.isfinite(drawn)
    return np.any(nan | inf | finite, axis=0)


def document(case: catalog.Case, param0, grads, state0, judged=None, samples: int = SAMPLES,
             exclude_unstable: bool = False) -> dict:
    """The vector file of ``case`` run from these inputs (arrays, or Generated for format 2): the
    golden, the Monte Carlo budgets (``samples`` runs), and the checks of ``_check``. The elements
    listed in ``judged`` (flat indices) are stored, compressed, in format 2. ``exclude_unstable``
    (the fuzzer's cases) judges only the elements ``unstable`` leaves, instead of refusing a case
    with any (``NothingToJudge`` when none is left)."""
    opt = _optimizer(case)
    arrays = [materialize(param0), [materialize(g) for g in grads],
              None if state0 is None else {k: (v if k == "step" else materialize(v)) for k, v in state0.items()}]
    gold = _golden(opt, *arrays)
    seed = case_seed(case.name, "mca")
    runs = mca.run(opt, arrays[0], arrays[1], dtype=case.dtype, state0=arrays[2], samples=samples, seed=seed)
    names = STATE_NAMES[case.optimizer]
    if exclude_unstable:
        bad = np.zeros(case.shape, dtype=bool)
        for (gp, gs), (sp, ss) in zip(gold, runs):
            bad |= unstable(gp, sp)
            for k in names:
                bad |= unstable(gs[k], ss[k])
        if bad.any():
            stable = np.flatnonzero(~bad.reshape(-1))
            judged = stable if judged is None else np.intersect1d(judged, stable)
            if judged.size == 0:
                raise NothingToJudge(f"{case.name}: every element is unstable")
    version = 2 if case.counter or judged is not None else 1

    def part(x):
        return x if judged is None else np.asarray(x).reshape(-1)[judged]

    def expected(x):
        return encode_compressed(part(x), "float64") if version >= 2 else encode(x, "float64")

    steps = []
    for i, ((gp, gs), (sp, ss)) in enumerate(zip(gold, runs)):
        budget = mca.budget(sp, gp)
        sbudget = {k: mca.budget(ss[k], gs[k]) for k in names}
        if not exclude_unstable:
            _check(case, i, gp, budget, gs, sbudget, sp, ss)
        steps.append({
            "grad": _input_json(grads[i], case.dtype),
            "param": expected(gp),
            "budget": expected(budget),
            "state": {"step": gs["step"], **{k: expected(gs[k]) for k in names}},
            "state_budget": {k: expected(sbudget[k]) for k in names},
        })
    numel = int(np.prod(case.shape, dtype=np.int64))
    doc = {
        "format": FORMAT,
        "format_version": version,
        "spec_version": SPEC_VERSION,
        "id": vector_id(case, param0, grads, state0),
        "name": case.name,
        "description": case.describe(),
        "optimizer": case.optimizer,
        "profile": case.profile,
        "quirks": case.full_quirks(),
        "hparams": case.full_hparams(),
        "dtype": case.dtype,
        "shape": list(case.shape),
        "clauses": list(catalog.clauses(case)),
        "flags": list(case.all_flags()),
        "tolerance": {"model": "mca-v2" if numel > mca.LONG_REDUCTION else "mca-v1", "k": tolerance.K,
                      "floor_ulps": tolerance.FLOOR_ULPS, "samples": samples, "estimator": "max-abs-deviation",
                      "seed": seed},
    }
    if version >= 2:
        doc["judged"] = None if judged is None else encode_compressed(np.asarray(judged, dtype=np.int64), "int64")
    doc["param0"] = _input_json(param0, case.dtype)
    doc["state0"] = None if state0 is None else {
        "step": state0["step"], **{k: _input_json(state0[k], case.dtype) for k in names}}
    doc["steps"] = steps
    return doc


def _check(case, i, gp, budget, gs, sbudget, sp, ss):
    """A golden must be usable: finite (unless the case is about NaN), with finite budgets."""
    expect_nan = {"NaNChannel", "NonFiniteGrad", "QuotientOverflow"} & set(case.flags)
    where = f"{case.name} step {i + 1}"
    # A NaN must be stable too: samples finite where the golden is NaN mean the NaN hangs on one
    # evaluation order. QuotientOverflow is the exception: its NaN comes from a sum of equal
    # powers of two, exact in every order, which the Monte Carlo model jitters all the same.
    if "QuotientOverflow" not in case.flags:
        for what, golden, drawn in (("param", gp, sp), *((k, gs[k], ss[k]) for k in sbudget)):
            if np.any(np.isnan(golden)[None] & ~np.isnan(drawn)):
                raise RuntimeError(f"{where}: {what} is NaN in the golden but not in every sample")
    if not expect_nan and not np.all(np.isfinite(gp)):
        raise RuntimeError(f"{where}: non-finite golden")
    with np.errstate(over="ignore"):
        if not expect_nan and not np.all(np.isfinite(gp.astype(np_dtype(case.dtype)))):
            raise RuntimeError(f"{where}: golden overflows {case.dtype}")
    for what, b in (("param", budget), *sbudget.items()):
        if not np.all(np.isfinite(b)):
            raise RuntimeError(f"{where}: {what} budget not finite (samples non-finite where the golden is not)")


def render(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def generate(cases=None) -> dict:
    """{relative path: bytes} of every vector file plus SHA256SUMS."""
    files = {}
    for case in cases if cases is not None else catalog.all_cases():
        vid, doc = build(case)
        path = f"{VECTORS_SUBDIR}/{vid}.json"
        if path in files:
            raise RuntimeError(f"{case.name}: id {vid} already used by another case (same inputs)")
        files[path] = render(doc)
    return files


def checksums(files: dict) -> bytes:
    return "".join(f"{hashlib.sha256(files[p]).hexdigest()}  {p}\n" for p in sorted(files)).encode("ascii")


def write(out: pathlib.Path, files: dict) -> None:
    vdir = out / VECTORS_SUBDIR
    vdir.mkdir(parents=True, exist_ok=True)
    for stale in vdir.glob("*.json"):
        if f"{VECTORS_SUBDIR}/{stale.name}" not in files:
            stale.unlink()
    for path, data in files.items():
        target = out / path
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
    src = default_dir()
    for name in STATIC_FILES:
        if (src / name).resolve() != (out / name).resolve() and (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    (out / CHECKSUMS).write_bytes(checksums(files))


def compare(out: pathlib.Path, files: dict) -> list:
    """Differences between ``files`` and what is in ``out`` (empty when identical)."""
    problems = []
    vdir = out / VECTORS_SUBDIR
    have = {f"{VECTORS_SUBDIR}/{f.name}" for f in vdir.glob("*.json")} if vdir.is_dir() else set()
    for p in sorted(set(files) - have):
        problems.append(f"missing {p}")
    for p in sorted(have - set(files)):
        problems.append(f"unexpected {p}")
    for p in sorted(set(files) & have):
        if (out / p).read_bytes() != files[p]:
            problems.append(f"differs {p}")
    sums = out / CHECKSUMS
    if not sums.is_file() or sums.read_bytes() != checksums(files):
        problems.append(f"differs {CHECKSUMS}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="refopt vectors generate",
                                 description="Generate the refopt golden vectors (deterministic).")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="output directory (default: the repository's conformance/v1)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the directory differs from a fresh generation")
    args = ap.parse_args(argv)
    out = args.out or default_dir()
    files = generate()
    if args.check:
        problems = compare(out, files)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{out}: {'OK' if not problems else f'{len(problems)} difference(s)'} "
              f"({len(files)} vectors)")
        return 1 if problems else 0
    write(out, files)
    total = sum(len(b) for b in files.values())
    print(f"wrote {len(files)} vectors ({total / 1e6:.2f} MB) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
