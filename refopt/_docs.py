"""Docstring fragments built from the registry, shared by the core, refopt.torch and refopt.optax.

``args_section`` lists each hyperparameter with its symbol, default and the clauses that read it
(the same rows as the spec's hyperparameter table: ``tests/test_docs.py`` compares them);
``update_section`` lists the clause functions an optimizer composes, one line per spec clause.
"""
from __future__ import annotations

import inspect
import re

from . import registry

_GREEK = {r"\eta": "η", r"\beta": "β", r"\epsilon": "ε", r"\lambda": "λ", r"\mu": "μ", r"\nu": "ν",
          r"\gamma": "γ", r"\alpha": "α", r"\ell": "ℓ"}
_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def plain_symbol(tex: str) -> str:
    """The spec's LaTeX symbol in plain text: ``$(\\beta_1, \\beta_2)$`` -> ``(β₁, β₂)``."""
    s = tex.strip("$")
    for k, v in _GREEK.items():
        s = s.replace(k, v)
    s = re.sub(r"_(\d)", lambda m: m.group(1).translate(_SUB), s)
    s = re.sub(r"_\{?(\w)\}?", r"_\1", s)
    return s


def default_text(h: registry.Hyperparameter) -> str:
    if h.default is registry.clip_lambda_default:
        return "t**0.25"
    return repr(h.default)


def args_rows(facts: registry.OptimizerFacts):
    """(name, plain symbol, default, clauses, doc) per hyperparameter, in the reference's order."""
    return [(h.name, plain_symbol(h.symbol), default_text(h), ", ".join(h.clauses), h.doc)
            for h in facts.hparams]


def args_section(facts: registry.OptimizerFacts, *, extra: str = "") -> str:
    lines = ["Args:"]
    for name, symbol, default, clauses, doc in args_rows(facts):
        sym = "" if symbol == "—" else f"{symbol}, "
        lines.append(f"    {name} ({sym}default {default}): {doc}. [{clauses}]")
    lines.append("    profile ('reference' | 'documented'): the quirk settings to start from "
                 "(spec/profiles.md).")
    lines.append("    quirks (dict | None): single quirks switched on or off, by name (spec/quirks.md).")
    if extra:
        lines.append(extra.rstrip())
    return "\n".join(lines)


def summary(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def update_section(facts: registry.OptimizerFacts, steps) -> str:
    """One line per clause: id, the function that computes it, its one-line summary."""
    lines = [f"Update (spec/{facts.spec_file}; each clause is one function of refopt.{facts.key}):"]
    for clause_id, fn in steps:
        text = re.sub(r"\s*<[^>]+>", "", summary(fn))
        text = re.sub(r"^(?:[A-Z]\d+(?:, |: ))+", "", text)
        lines.append(f"    {clause_id:<4s}{fn.__name__}: {text}")
    return "\n".join(lines)


def state_section(facts: registry.OptimizerFacts) -> str:
    fields = ", ".join(facts.state)
    lines = [f"State: {facts.name}State({fields}), under the reference's names:"]
    lines += [f"    {k}: {facts.state_doc[k]}" for k in facts.state]
    return "\n".join(lines)


ZERO_GRADIENT_NOTE = """\
Reference behaviours a user may meet first (what the public code computes, in both profiles; not
defects, spec/common.md A2 and spec/numerics.md):
    * NaN for one-element channels: a parameter with two or more axes and one element per
      channel, i.e. shape (k, 1), (k, 1, 1), (k, 1, 1, 1) (nn.Linear(1, k).weight, a 1x1
      convolution with one input channel), becomes NaN at its first step, whatever its gradient
      (zero too), when normalize_channels=True and the normalization is on (the defaults): A2
      takes each channel's standard deviation with correction 1, which is 0/0 for one element.
      Put such parameters in a group with normalize_channels=False (one std for the tensor) or
      normalization=0."""

DOPE_DECAY_NOTE = """\
    * DOPE's default weight_decay=0.01 moves parameters even when every gradient is zero, so a
      zero-gradient step is not a no-op: D13 divides p by the D7 denominators, which are eps
      (1e-6) and eps2 (1e-2) without gradient history, so one step changes p by
      -lr * weight_decay * p / (eps * eps2), about -150 p at the defaults (lr=1.5e-4), and by
      similar amounts wherever the gradient history stays tiny. Neither profile changes it. Use
      weight_decay=0 (for all parameters, or a group of those that may get no gradient), or
      larger eps/eps2 to bound it."""

SAVEUS_DECAY_NOTE = """\
    * SAVEUS's coupled weight decay (weight_decay != 0 with decouple_weight_decay=False) is added
      to the direction after its denominator is formed (S8 after S7), so with zero gradients the
      denominator is eps (1e-8) and a step changes p by -lr / (1 - beta1**t) * weight_decay * p /
      eps: 1e5 p at step 1 with lr=1e-3, weight_decay=0.1. The default weight_decay=0 is not
      affected; decouple_weight_decay=True multiplies p by 1 - lr / (1 - beta1**t) * weight_decay
      instead."""


def reference_notes(facts: registry.OptimizerFacts) -> str:
    """The reference behaviours a user meets first, for the class docstrings (core and torch)."""
    own = DOPE_DECAY_NOTE if facts.key == "dope" else SAVEUS_DECAY_NOTE
    return f"{ZERO_GRADIENT_NOTE}\n{own}"
