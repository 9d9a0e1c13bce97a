"""The registry of facts: everything refopt states once and derives everywhere else.

Clause ids and titles, the hyperparameters of each optimizer (name, symbol, default, valid values,
the clauses that read them), the state each optimizer keeps, the dtypes, the quirks with the
clauses they touch and their setting in each profile. The core's signatures, validation and
docstrings, the torch and optax adapters, the vector catalogue, the CLI's choices, the diagnosis
and the tests are all built from these tables; ``tests/test_registry.py`` checks them against the
tables of ``spec/``. (``refopt.builders.oracle`` keeps its own copy on purpose, and a test checks
that the two agree.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import _checks as check

#: Storage dtypes a parameter may have (spec/common.md, A3), narrowest last.
DTYPES = ("float16", "bfloat16", "float32", "float64")
#: The 16-bit dtypes that are computed in float32 and rounded back after each operation (A3).
LOW_PRECISION = ("float16", "bfloat16")
PROFILES = ("reference", "documented")


@dataclass(frozen=True)
class Clause:
    id: str
    title: str
    file: str  # the spec file that defines it

    @property
    def anchor(self) -> str:
        return f"spec/{self.file}#{self.id.lower()}"


def _clauses(file, rows):
    return tuple(Clause(cid, title, file) for cid, title in rows)


#: Every clause id, in the spec's order (spec/README.md, "Clause index").
CLAUSES = {c.id: c for c in (
    *_clauses("common.md", (
        ("A1", "trailing-axes mean (empty axis list reduces all axes)"),
        ("A2", "normalizer standard deviation"),
        ("A3", "arithmetic dtype and rounding"),
        ("A4", "scalar dtype"),
        ("A5", "non-finite values propagate"),
        ("A6", "empty tensors"))),
    *_clauses("saveus.md", (
        ("S0", "SAVEUS state and step count"),
        ("S1", r"centralization (gate $\ne 0$)"),
        ("S2", "normalization"),
        ("S3", "bias corrections and step size"),
        ("S4", "first moment `ema`"),
        ("S5", "amplification"),
        ("S6", "second moment `ema_squared`"),
        ("S7", "denominator"),
        ("S8", "weight decay, coupled or decoupled"),
        ("S9", "clipping by value"),
        ("S10", "parameter update"))),
    *_clauses("dope.md", (
        ("D0", "DOPE state and step count"),
        ("D1", "centralization (gate $> 0$)"),
        ("D2", "normalization"),
        ("D3", "per-tensor clipping by norm"),
        ("D4", "`fim`, `fim_diff`, `prev_grad`"),
        ("D5", "bias corrections"),
        ("D6", "epsilon with `eps_floor`"),
        ("D7", "denominators"),
        ("D8", "natural gradient (two divisions)"),
        ("D9", "MARS correction"),
        ("D10", "momentum and centring"),
        ("D11", "amplified momentum"),
        ("D12", "cautious mask"),
        ("D13", "preconditioned weight decay"),
        ("D14", "parameter update"))),
    *_clauses("quirks.md", (
        ("Q1", "`aliased_lerp` (S2, D2)"),
        ("Q2", "`torch_empty_axis_mean` (A1)"),
        ("Q3", "`mars_current_grad` (D9)"),
        ("Q4", "`lambda_scaled_amplification` (D11)"),
        ("Q5", "`float32_scalars` (D11, D12)"),
        ("Q6", "`cautious_processed_grad` (D12)"))),
)}
CLAUSE_IDS = tuple(CLAUSES)


@dataclass(frozen=True)
class Quirk:
    id: str
    name: str
    clauses: tuple      # the clauses whose result it changes
    reference: bool     # its setting in profile "reference"
    documented: bool    # its setting in profile "documented"
    optimizers: tuple   # the optimizers whose step reads it
    summary: str        # what the switch does when on

    def setting(self, profile: str) -> bool:
        return self.reference if profile == "reference" else self.documented


#: The quirk register (spec/quirks.md).
QUIRKS = {q.name: q for q in (
    Quirk("Q1", "aliased_lerp", ("S2", "D2"), True, False, ("saveus", "dope"),
          "the normalization's lerp aliases its ends: the result is g/s whatever `normalization` is "
          "(NaN where g/s is infinite); off: the documented interpolation g + a*(g/s - g)"),
    Quirk("Q2", "torch_empty_axis_mean", ("A1", "S1", "D1", "D10"), True, True, ("saveus", "dope"),
          "a mean over no trailing axes reduces over all axes (PyTorch); off: over none (array API)"),
    Quirk("Q3", "mars_current_grad", ("D9",), True, False, ("dope",),
          "the MARS term uses this step's processed gradient g_t; off: g_{t-1}, as documented"),
    Quirk("Q4", "lambda_scaled_amplification", ("D11",), True, False, ("dope",),
          "the amplification is lambda * t**lambda; off: t**lambda, as documented"),
    Quirk("Q5", "float32_scalars", ("D11", "D12"), True, False, ("dope",),
          "the amplification and the cautious scale are float32, the scale a reciprocal then a "
          "multiply; off: exact scalars, numel / (k + 1e-8)"),
    Quirk("Q6", "cautious_processed_grad", ("D12",), True, False, ("dope",),
          "the cautious mask compares the update with the processed gradient g_t; off: with the "
          "MARS-corrected natural gradient c_t, as documented"),
)}
QUIRK_NAMES = tuple(QUIRKS)


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    symbol: str          # as written in the spec's hyperparameter table
    default: Any
    valid: str           # the spec table's "valid values" cell
    clauses: tuple       # the clauses that read it
    doc: str             # one line for docstrings
    validate: Callable   # (name, value) -> the validated value, or raises (spec/errors.md)


H = Hyperparameter


def clip_lambda_default(t):
    """S9's default threshold ``t**0.25`` (``t``: the 1-based step count, a 0-d float array)."""
    return t**0.25


_LR = check.Real(low=0.0, message="Invalid learning rate")
_EPS = check.Real(low=0.0, message="Invalid epsilon value")
_FINITE = check.Real()
_FLAG = check.Flag()
_BETAS = check.Betas()

SAVEUS_HPARAMS = (
    H("lr", r"$\eta$", 1e-3, r"finite real, $\ge 0$", ("S3", "S8", "S10"), "learning rate", _LR),
    H("betas", r"$(\beta_1, \beta_2)$", (0.9, 0.999), "a pair; each finite, in $[0, 1)$",
      ("S3", "S4", "S6"), "decay rates of ``ema`` and ``ema_squared``", _BETAS),
    H("eps", r"$\epsilon$", 1e-8, r"finite real, $\ge 0$", ("S7",), "added to the denominator", _EPS),
    H("weight_decay", r"$\lambda_w$", 0.0, "finite real, any sign", ("S8",),
      "weight decay; coupled (added to the direction) unless ``decouple_weight_decay``", _FINITE),
    H("centralization", "$c$", 0.5, "finite real, any sign", ("S1",),
      "fraction of the trailing-axes mean removed; acts when non-zero", _FINITE),
    H("normalization", "$a$", 0.5, "finite real, any sign", ("S2", "Q1"),
      "switches the std normalization on when non-zero (its value matters only with Q1 off)",
      _FINITE),
    H("normalize_channels", "—", True, "`True` or `False`", ("S2", "A2"),
      "per-channel (axes 1..) std instead of one std for the tensor", _FLAG),
    H("amp_fac", r"$\alpha$", 2.0, "finite real, any sign", ("S5",),
      "amplification of the gradient by ``ema``", _FINITE),
    H("clip_lambda", r"$\ell(t)$", clip_lambda_default, "a callable, or `None`", ("S9",),
      "clipping threshold as a function of the 1-based step count", check.CallableOrNone()),
    H("decouple_weight_decay", "—", False, "`True` or `False`", ("S8",),
      "decay the parameter directly (by lr/bc1) instead of adding to the direction", _FLAG),
    H("clip_gradients", "—", False, "`True` or `False`", ("S9",),
      "clip the final direction to [-clip_lambda(t), clip_lambda(t)]", _FLAG),
)

DOPE_HPARAMS = (
    H("lr", r"$\eta$", 1.5e-4, r"finite real, $\ge 0$", ("D13", "D14"), "learning rate", _LR),
    H("betas", r"$(\beta_1, \beta_2)$", (0.999, 0.9999), "a pair; each finite, in $[0, 1)$",
      ("D4", "D5", "D9"), "decay rates of ``fim_diff`` (beta1) and ``fim`` (beta2)", _BETAS),
    H("momentum_beta", r"$\mu$", 0.9999, "finite, in $[0, 1)$", ("D10",), "decay rate of ``exp_avg``",
      check.Real(low=0.0, high=1.0, message="Invalid momentum_beta parameter")),
    H("eps", r"$\epsilon$", 1e-6, r"finite real, $\ge 0$", ("D6", "D7"),
      "added to the Fisher denominator", _EPS),
    H("eps2", r"$\epsilon_2$", 1e-2, r"finite real, $\ge 0$", ("D7",),
      "added to the difference denominator", check.Real(low=0.0, message="Invalid epsilon2 value")),
    H("eps_floor", r"$\epsilon_f$", None, r"`None`, or finite real $\ge 0$", ("D6",),
      "when set, epsilon becomes max(eps_floor, eps * sqrt(t))",
      check.Optional(check.Real(low=0.0, message="Invalid eps_floor value"))),
    H("weight_decay", r"$\lambda_w$", 0.01, "finite real", ("D13",),
      "preconditioned weight decay; acts when positive", _FINITE),
    H("centralization", "$c$", 0.5, "finite real", ("D1",),
      "fraction of the trailing-axes mean removed; acts when positive", _FINITE),
    H("normalization", "$a$", 0.5, "finite real", ("D2", "Q1"),
      "switches the std normalization on when positive (its value matters only with Q1 off)",
      _FINITE),
    H("diff_mult", r"$\nu$", 1.0, "finite real", ("D7",), "scale of the difference denominator",
      _FINITE),
    H("momentum_lambda", r"$\lambda$", 0.25, "finite real", ("D11", "Q4"),
      "exponent (and factor, Q4) of the momentum amplification", _FINITE),
    H("gamma", r"$\gamma$", 0.0005, "finite real", ("D9",), "strength of the MARS correction",
      _FINITE),
    H("clip", "$C$", 1.0, "finite real", ("D3",), "per-tensor norm bound; acts when positive", _FINITE),
    H("cautious", "—", True, "`True` or `False`", ("D12",),
      "mask (and rescale) update elements whose sign disagrees with the gradient", _FLAG),
    H("normalize_channels", "—", True, "`True` or `False`", ("D2", "A2"),
      "per-channel (axes 1..) std instead of one std for the tensor", _FLAG),
)


@dataclass(frozen=True)
class OptimizerFacts:
    key: str             # "saveus" | "dope": vector files, CLI choices
    name: str            # "SAVEUS" | "DOPE"
    hparams: tuple       # Hyperparameter, in the reference's signature order
    state: tuple         # state field names, "step" first
    state_doc: dict      # field -> one line
    clauses: tuple       # the optimizer's own clause ids, in order
    spec_file: str

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.hparams}

    @property
    def buffers(self) -> tuple:
        """The state fields that are arrays shaped like the parameter."""
        return self.state[1:]

    @property
    def quirks(self) -> tuple:
        """The quirk names whose switch can change this optimizer's result."""
        return tuple(q.name for q in QUIRKS.values() if self.key in q.optimizers)

    def hparam(self, name: str) -> Hyperparameter:
        return next(h for h in self.hparams if h.name == name)


SAVEUS = OptimizerFacts(
    "saveus", "SAVEUS", SAVEUS_HPARAMS, ("step", "ema", "ema_squared"),
    {"step": "number of steps taken (0-d integer array)",
     "ema": "moving average of the processed gradient",
     "ema_squared": "moving average of the squared amplified gradient"},
    tuple(f"S{i}" for i in range(11)), "saveus.md")
DOPE = OptimizerFacts(
    "dope", "DOPE", DOPE_HPARAMS, ("step", "exp_avg", "fim", "fim_diff", "prev_grad"),
    {"step": "number of steps taken (0-d integer array)",
     "exp_avg": "momentum, stored after centring (D10)",
     "fim": "moving average of the squared processed gradient",
     "fim_diff": "moving average of the squared step-to-step gradient difference",
     "prev_grad": "the processed gradient of the previous step"},
    tuple(f"D{i}" for i in range(15)), "dope.md")
OPTIMIZERS = {o.key: o for o in (SAVEUS, DOPE)}
