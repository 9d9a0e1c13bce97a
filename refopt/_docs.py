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
Reference behaviours a user may meet first (what the public code computes, not defects):
    * A parameter with a one-element channel (shape (k, 1), (k, 1, 1, 1); normalize_channels=True
      and normalization on) becomes NaN: the channel's std with correction 1 is 0/0 (A2). Use
      normalize_channels=False or normalization=0 for such parameters."""

DOPE_DECAY_NOTE = """\
    * DOPE's default weight_decay=0.01 moves parameters even when every gradient is zero: D13
      divides p by denominators that are about eps * eps2 = 1e-8 without gradient history, so a
      step moves p by about lr * weight_decay * 1e8 = 150 times its value. Set weight_decay=0
      (or a larger eps/eps2) where gradients can be zero for long."""
