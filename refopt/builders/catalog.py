"""The list of vector cases: what each golden vector exercises and why (conformance/v1/FLAGS.md).

A case is a recipe (optimizer, dtype, shape, hyperparameters, quirks, gradient recipe, steps);
generate.py turns each into one vector file. The clause ids a vector exercises are derived from
the case by ``clauses()``, from the same switches the core tests, so they cannot drift from what
the vector actually computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import registry
from ..conformance.vectors import hparams_to_json
from ..quirks import Quirks

#: Vector dtypes, widest first (the order cases are generated in).
DTYPES = tuple(reversed(registry.DTYPES))
LOW = registry.LOW_PRECISION

#: The registry's defaults in the vector files' JSON form.
SAVEUS_DEFAULTS = hparams_to_json("saveus", registry.SAVEUS.defaults)
DOPE_DEFAULTS = hparams_to_json("dope", registry.DOPE.defaults)
#: DOPE at its defaults is non-finite in float16 after one step (FLAGS.md: Float16SafeHparams):
#: (1-b2)*g*g underflows, g/(0+eps) overflows. A larger eps and shorter betas keep it finite.
DOPE_FLOAT16_SAFE = {"eps": 1e-2, "betas": [0.9, 0.99]}
#: float16 cannot hold 1e-7 gradients, and D13's p/(eps*eps2) overflows it: tiny in float16 terms.
F16_TINY = {"scale": 1e-3, "hparams": {"weight_decay": 0.0}}
#: Learning rates large enough that one step moves a 16-bit parameter by several ulps: at the
#: reference lr a bfloat16 parameter (8 bits) cannot show most switches (FLAGS.md: VisibleStep).
BIG_LR_SAVEUS = 3e-2
BIG_LR_DOPE = 1e-2
#: Step counts of the LongHorizon vectors (FLAGS.md): bias corrections still below 1 (10**3),
#: within 1e-4 of 1 (10**5), eps * sqrt(t) and t**lambda large (10**7), and a count that no
#: longer fits an int32 (2**31 - 2, stepped past 2**31 - 1).
HORIZONS = (1000, 10**5, 10**7, 2**31 - 2)
LONG_HORIZON = min(HORIZONS)
#: Scale vectors (FLAGS.md: Scale): 2**17 elements and more, in shapes that defeat per-block
#: reductions and vectorised tails: a prime length, two rows longer than 2**16 (odd length), and
#: 131101 channels of one element.
PRIME = 131101                   # the first prime above 2**17
SCALE_SHAPES = (((PRIME,), "prime", {}), ((2, 65537), "long-rows", {}),
                ((PRIME, 1), "one-element-channels", {"normalize_channels": False}))
SCALE_START = 10                 # the generated state's step count
#: The generated state of a scale vector: (exponent, centred) per buffer (refopt.conformance.
#: counter), sized like what the processed gradient makes (DOPE clips it with clip = 64).
COUNTER_STATE = {"saveus": {"ema": (-1, True), "ema_squared": (0, False)},
                 "dope": {"exp_avg": (-5, True), "fim": (-6, False), "fim_diff": (-5, False),
                          "prev_grad": (-2, True)}}
SCALE_HPARAMS = {"saveus": {"lr": BIG_LR_SAVEUS}, "dope": {"lr": BIG_LR_DOPE, "clip": 64.0}}


@dataclass(frozen=True)
class Case:
    optimizer: str
    label: str                      # what the case is about, e.g. "default", "decoupled-clip"
    dtype: str
    shape: tuple
    hparams: dict = field(default_factory=dict)   # overrides of the defaults (JSON form)
    profile: str = "reference"
    quirks: dict = field(default_factory=dict)    # overrides of the profile
    steps: int = 8
    warm: int = 0                   # >0: start from the state after this many steps (non-fresh)
    grads: str = "normal"           # gradient recipe (generate.py): normal, mixed, tiny, zeros, nonfinite,
                                    # offset (a large common offset), overflow-row (one huge constant row)
    scale: float = 1.0              # gradient scale
    pscale: float = 1.0             # initial parameter scale
    flags: tuple = ()
    start_step: int = 0             # >0: the given state's step count (its buffers from ``warm`` steps)
    counter: bool = False           # format 2: counter-generated inputs and state, judged subset

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape)) if self.shape else "scalar"
        return f"{self.optimizer}/{self.label}/{dims}/{self.dtype}"

    def full_hparams(self) -> dict:
        base = SAVEUS_DEFAULTS if self.optimizer == "saveus" else DOPE_DEFAULTS
        h = dict(base)
        if self.optimizer == "dope" and self.dtype == "float16":
            h.update(DOPE_FLOAT16_SAFE)
        h.update(self.hparams)
        return h

    def describe(self) -> str:
        """One sentence for people: what is run and what differs from the defaults."""
        base = SAVEUS_DEFAULTS if self.optimizer == "saveus" else DOPE_DEFAULTS
        changed = {k: v for k, v in self.full_hparams().items() if base[k] != v}
        start = f"the state after {self.warm} steps" if self.warm else "a fresh state"
        if self.start_step:
            start = f"a state at step {self.start_step} (buffers of {self.warm} steps)"
        if self.counter:
            start = f"a generated state at step {self.start_step}"
        text = (f"{self.optimizer.upper()}, profile {self.profile}, {self.dtype} {list(self.shape)}, "
                f"{self.steps} step(s) from {start}, {self.grads} gradients")
        if self.scale != 1.0:
            text += f" of scale {self.scale!r}"
        if self.pscale != 1.0:
            text += f", parameters of scale {self.pscale!r}"
        if changed:
            text += "; hyperparameters " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
        if self.quirks:
            text += "; quirks " + ", ".join(f"{k}={v!r}" for k, v in self.quirks.items())
        return text + "."

    def full_quirks(self) -> dict:
        return Quirks.for_profile(self.profile, self.quirks or None).as_dict()

    def all_flags(self) -> tuple:
        f = list(self.flags)
        if self.optimizer == "dope" and self.dtype == "float16" and "Fuzz" not in f:  # a fuzzed case
            f.append("Float16SafeHparams")                                              # draws its own
        if self.profile == "documented":
            f.append("DocumentedProfile")
        if self.warm or self.counter:
            f.append("WarmState")
        if self.start_step >= LONG_HORIZON:
            f.append("LongHorizon")
        if self.start_step + self.steps >= 2**31:
            f.append("StepCountInt64")
        if self.counter:
            f.append("Scale")
        if self.steps == 1:
            f.append("SingleStep")
        if self.steps >= 8:
            f.append("Trajectory")
        if self.dtype in LOW:
            f.append("LowPrecision")
        if self.hparams.get("lr") in (BIG_LR_SAVEUS, BIG_LR_DOPE):
            f.append("VisibleStep")
        return tuple(dict.fromkeys(f))


def _normalizer_acts(shape, channels) -> bool:
    return (len(shape) > 1 and channels) or math.prod(shape) > 2


def clauses(case: Case) -> tuple:
    """Clause and quirk ids whose rule changes this vector's result (derived, not hand-listed)."""
    h, q, shape = case.full_hparams(), case.full_quirks(), case.shape
    numel, ndim = math.prod(shape), len(shape)
    out = ["A4"]
    if case.dtype in LOW:
        out.append("A3")
    if numel == 0:
        return tuple(["A6", "S0" if case.optimizer == "saveus" else "D0"])
    saveus = case.optimizer == "saveus"
    cen_on = h["centralization"] != 0 if saveus else h["centralization"] > 0
    norm_on = (h["normalization"] != 0 if saveus else h["normalization"] > 0) and \
        _normalizer_acts(shape, h["normalize_channels"])
    p = "S" if saveus else "D"
    if cen_on:
        out += [f"{p}1", "A1"]
        if ndim <= 1:
            out.append("Q2")
    if case.grads in ("nonfinite", "overflow-row") or (norm_on and ndim > 1 and h["normalize_channels"]
                                     and math.prod(shape[1:]) == 1):
        out.append("A5")  # a NaN gradient, or the NaN std of a one-element channel (A2)
    if norm_on:
        out += [f"{p}2", "A2"]
        if h["normalization"] != 1.0:
            out.append("Q1")
    if saveus:
        out += ["S0", "S3", "S4", "S5", "S6", "S7", "S10"]
        if h["weight_decay"] != 0:
            out.append("S8")
        if h["clip_gradients"] and h["clip_lambda"] is not None:
            out.append("S9")
    else:
        out += ["D0", "D4", "D5", "D6", "D7", "D8", "D10", "D11", "D14", "Q5"]
        if ndim <= 1:
            out += ["A1", "Q2"]
        if h["clip"] > 0:
            out.append("D3")
        if h["gamma"] != 0:
            out += ["D9", "Q3"]
        if h["momentum_lambda"] not in (0.0, 1.0):
            out.append("Q4")
        if h["cautious"]:
            out += ["D12", "Q6"]
        if h["weight_decay"] > 0:
            out.append("D13")
    order = {c: i for i, c in enumerate(registry.CLAUSE_IDS)}
    return tuple(sorted(set(out), key=order.__getitem__))


def _per_dtype(optimizer, label, shape, dtypes=DTYPES, f16=None, **kw):
    """One case per dtype; ``f16`` overrides some fields for float16 (its range is narrow)."""
    out = []
    for d in dtypes:
        args = dict(kw)
        if d == "float16" and f16:
            args.update({k: v for k, v in f16.items() if k != "hparams"})
            args["hparams"] = {**kw.get("hparams", {}), **f16.get("hparams", {})}
        out.append(Case(optimizer, label, d, shape, **args))
    return out


def _common(opt: str) -> list:
    """Shapes and situations both optimizers share, in every dtype."""
    cases = []
    cases += _per_dtype(opt, "default", (3, 5), flags=("Default",))
    cases += _per_dtype(opt, "default", (17,), flags=("Default", "Vector1D", "TorchEmptyAxisMean"))
    cases += _per_dtype(opt, "default", (), flags=("Default", "ZeroDim", "TorchEmptyAxisMean"))
    cases += _per_dtype(opt, "default", (1,), flags=("Default", "Vector1D", "NoNormalizer"))
    cases += _per_dtype(opt, "default", (2,), flags=("Default", "Vector1D", "NoNormalizer"))
    cases += _per_dtype(opt, "default", (2, 2, 3, 3), flags=("Default", "Conv4D"))
    cases += _per_dtype(opt, "nan-channel", (4, 1), flags=("NaNChannel",))
    cases += _per_dtype(opt, "empty", (0, 3), steps=3, flags=("EmptyTensor",))
    cases += _per_dtype(opt, "mixed-scale", (4, 6), grads="mixed", flags=("MixedScale",))
    cases += _per_dtype(opt, "warm-single", (3, 5), steps=1, warm=41)
    cases += _per_dtype(opt, "warm", (17,), steps=8, warm=12, flags=("TorchEmptyAxisMean",))
    cases += _per_dtype(opt, "nonfinite", (3, 5), grads="nonfinite", flags=("NonFiniteGrad",))
    # A2: the mean inside the standard deviation is not rounded to D (only 16-bit can show it)
    cases += _per_dtype(opt, "offset-grad", (4, 6), dtypes=LOW, grads="offset", scale=100.0, steps=3,
                        hparams={"clip": 0.0} if opt == "dope" else {},
                        f16=None if opt == "dope" else {"hparams": {"eps": 1e-4}}, flags=("LargeOffset",))
    # S2/D2 with Q1: a quotient g/s that overflows is NaN (Q1 on), infinite with Q1 off
    for profile in ("reference", "documented"):
        cases += _per_dtype(opt, f"quotient-overflow-{profile}", (3, 5), dtypes=("float64",), grads="overflow-row",
                            profile=profile, hparams={"centralization": 0.0}, steps=3,
                            flags=("QuotientOverflow",))
    # Q1 off with gradients far larger than their normalized value: the interpolation's g/s - g
    # must stay in W (one R); rounded to 16 bits first it loses g/s (FLAGS.md: LargeGradient)
    cases += _per_dtype(opt, "documented-large-grad", (4, 6), dtypes=LOW, profile="documented", scale=100.0,
                        steps=3, hparams={"normalization": 1.0}, flags=("QuirksOff", "LargeGradient"))
    cases += _per_dtype(opt, "documented", (3, 5), profile="documented", flags=("QuirksOff",))
    cases += _per_dtype(opt, "documented", (9,), profile="documented", flags=("QuirksOff",))
    cases += _per_dtype(opt, "array-api-mean", (9,), quirks={"torch_empty_axis_mean": False},
                        flags=("ArrayApiEmptyAxisMean",))
    return cases


def _depth(opt: str) -> list:
    """Scale and long-horizon cases, in every dtype (FLAGS.md: Scale, LongHorizon)."""
    cases = []
    for shape, label, hparams in SCALE_SHAPES:
        cases += _per_dtype(opt, f"scale-{label}", shape, steps=1, counter=True, start_step=SCALE_START,
                            hparams={**SCALE_HPARAMS[opt], **hparams},
                            flags=("GlobalStd",) if hparams.get("normalize_channels") is False else ())
    horizon = {"saveus": {"lr": BIG_LR_SAVEUS},
               # eps_floor: eps * sqrt(t) passes the floor between 10**3 and 10**5
               "dope": {"lr": BIG_LR_DOPE, "momentum_beta": 0.9, "eps_floor": 1e-4, "clip": 0.0}}[opt]
    for start in HORIZONS:
        cases += _per_dtype(opt, f"horizon-{start}", (4, 6), steps=3, warm=12, start_step=start,
                            hparams=horizon, flags=("EpsFloor", "ClipOff") if opt == "dope" else ())
    return cases


def saveus_cases() -> list:
    o = "saveus"
    cases = _common(o) + _depth(o)
    cases += _per_dtype(o, "decoupled-clip", (4, 6),
                        hparams={"lr": BIG_LR_SAVEUS, "weight_decay": 0.1, "decouple_weight_decay": True,
                                 "clip_gradients": True},
                        flags=("DecoupledDecay", "ClipByValue"))
    # decay without clipping: a port that cannot switch clipping off (the other public SAVEUS)
    # is still checked on its decay (S8) by these
    cases += _per_dtype(o, "decoupled", (4, 6),
                        hparams={"lr": BIG_LR_SAVEUS, "weight_decay": 0.1, "decouple_weight_decay": True,
                                 "clip_lambda": None},
                        flags=("DecoupledDecay", "ClipLambdaNone"))
    cases += _per_dtype(o, "coupled", (4, 6),
                        hparams={"lr": BIG_LR_SAVEUS, "weight_decay": 0.05, "clip_lambda": None},
                        flags=("CoupledDecay", "ClipLambdaNone"))
    cases += _per_dtype(o, "coupled-clip-power", (4, 6),
                        hparams={"lr": BIG_LR_SAVEUS, "weight_decay": 0.05, "amp_fac": 0.5, "betas": [0.8, 0.99],
                                 "clip_gradients": True, "clip_lambda": {"power": 0.5}},
                        flags=("CoupledDecay", "ClipByValue", "CustomClipLambda"))
    cases += _per_dtype(o, "negative-centralization-global", (4, 6),
                        hparams={"lr": BIG_LR_SAVEUS, "centralization": -0.5, "normalization": 0.3,
                                 "normalize_channels": False},
                        flags=("NegativeCentralization", "GlobalStd"))
    cases += _per_dtype(o, "plain", (3, 5),
                        hparams={"lr": BIG_LR_SAVEUS, "centralization": 0.0, "normalization": 0.0},
                        flags=("CentralizationOff", "NormalizationOff"))
    cases += _per_dtype(o, "tiny", (3, 5), grads="tiny", scale=1e-9,
                        hparams={"centralization": 0.0, "normalization": 0.0},
                        f16={"scale": 1e-3, "hparams": {"eps": 1e-4}},
                        flags=("IllConditioned", "NormalizationOff"))
    cases += _per_dtype(o, "clip-no-lambda", (3, 5),
                        hparams={"lr": BIG_LR_SAVEUS, "clip_gradients": True, "clip_lambda": None},
                        flags=("ClipLambdaNone",))
    cases += _per_dtype(o, "documented-lerp", (2, 2, 3, 3), profile="documented",
                        hparams={"lr": BIG_LR_SAVEUS, "normalization": 0.25}, flags=("QuirksOff",))
    return cases


def dope_cases() -> list:
    o = "dope"
    cases = _common(o) + _depth(o)
    cases += _per_dtype(o, "floor-nocautious-noclip", (4, 6),
                        hparams={"eps_floor": 1e-3, "cautious": False, "clip": 0.0},
                        flags=("EpsFloor", "CautiousOff", "ClipOff"))
    cases += _per_dtype(o, "diffmult-lambda-negcen", (4, 6),
                        hparams={"diff_mult": 2.0, "momentum_lambda": 0.5, "centralization": -0.5, "gamma": 0.01},
                        flags=("DiffMult", "MomentumLambda", "NegativeCentralization"))
    cases += _per_dtype(o, "short-betas-global", (4, 6),
                        hparams={"betas": [0.9, 0.99], "momentum_beta": 0.9, "clip": 0.5, "weight_decay": 0.0,
                                 "normalization": 0.0, "normalize_channels": False},
                        flags=("ShortBetas", "NormalizationOff", "DecayOff"))
    cases += _per_dtype(o, "global-std", (4, 6), hparams={"normalize_channels": False, "momentum_beta": 0.9},
                        flags=("GlobalStd", "ShortBetas"))
    cases += _per_dtype(o, "eps-floor-tiny", (3, 5), f16=F16_TINY, grads="tiny", scale=1e-4,
                        hparams={"eps_floor": 2e-3, "eps": 1e-3, "normalization": 0.0, "clip": 0.0,
                                 "centralization": 0.0},
                        flags=("EpsFloor", "IllConditioned", "NormalizationOff", "ClipOff"))
    cases += _per_dtype(o, "tiny", (3, 5), f16=F16_TINY, grads="tiny", scale=1e-7,
                        hparams={"normalization": 0.0, "clip": 0.0, "centralization": 0.0},
                        flags=("IllConditioned", "NormalizationOff", "ClipOff"))
    cases += _per_dtype(o, "knife-zero-grad", (4, 6), grads="zeros",
                        hparams={"lr": BIG_LR_DOPE, "normalization": 0.0, "centralization": 0.0, "clip": 0.0},
                        flags=("KnifeEdge", "NormalizationOff", "ClipOff"))
    # Under the reference profile Q6 (and D12's sign test) can only be seen where u*g underflows
    # while u*c_t does not (FLAGS.md: SubnormalProducts). float64 only; the magnitudes keep every
    # value either normal or an underflow to 0, so platforms that flush subnormals agree.
    cases += _per_dtype(o, "knife-underflow", (4, 6), dtypes=("float64",), grads="underflow", scale=1e-173,
                        pscale=1e-155, hparams={"lr": BIG_LR_DOPE, "eps": 1e-10, "eps2": 1e-10, "weight_decay": 0.0,
                                                "normalization": 0.0, "centralization": 0.0, "clip": 0.0},
                        flags=("KnifeEdge", "SubnormalProducts", "NormalizationOff", "ClipOff", "DecayOff"))
    # D12 with k = 0 (A5): diff_mult < 0 and eps2 = 0 make every u oppose g; sigma = n / 1e-8
    # overflows float16, the mask R(P * sigma) is 0 all the same (FLAGS.md: ZeroCount)
    cases += _per_dtype(o, "zero-count", (3, 5), steps=3,
                        hparams={"lr": BIG_LR_DOPE, "diff_mult": -1.0, "eps2": 0.0, "gamma": 0.0},
                        flags=("ZeroCount", "DiffMult"))
    cases += _per_dtype(o, "clip-tiny-norm", (3, 5), f16=F16_TINY, grads="tiny", scale=1e-7,
                        hparams={"normalization": 0.0, "centralization": 0.0, "clip": 1.0, "momentum_beta": 0.9},
                        flags=("IllConditioned", "ClipEpsilon"))
    cases += _per_dtype(o, "momentum-beta", (3, 5), hparams={"momentum_beta": 0.9, "gamma": 0.01},
                        steps=12, flags=("ShortBetas", "MarsGamma"))
    cases += _per_dtype(o, "visible-step", (4, 6), hparams={"lr": BIG_LR_DOPE, "momentum_beta": 0.9},
                        flags=("ShortBetas",))
    # single quirks off from the reference profile: each must be visible in float64 and float32
    for qname in Quirks.names():
        if qname == "torch_empty_axis_mean":
            continue  # array-api-mean cases above
        hp = {"lr": BIG_LR_DOPE, "momentum_beta": 0.9}
        if qname == "mars_current_grad":
            hp["gamma"] = 0.01
        # Q5 changes values by ~1e-8 relative: only float64 can show it
        dts = ("float64",) if qname == "float32_scalars" else DTYPES
        cases += _per_dtype(o, f"no-{qname.replace('_', '-')}", (3, 5), dtypes=dts,
                            quirks={qname: False}, hparams=hp, flags=("QuirkOff",))
    return cases


def all_cases() -> list:
    cases = saveus_cases() + dope_cases()
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AssertionError(f"duplicate case names: {sorted(dup)}")
    return cases
