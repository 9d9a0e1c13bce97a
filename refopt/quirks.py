"""Profiles and the quirk register (spec/quirks.md), built from ``refopt.registry.QUIRKS``.

A quirk is a place where the public PyTorch code computes something other than its own
documentation says. Profile ``reference`` switches every quirk on (what the code executes);
profile ``documented`` switches off those the documentation contradicts. Each quirk can also be
set on its own, so a port can be told exactly which one it deviates on.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, fields, make_dataclass, replace

from .registry import PROFILES, QUIRKS


def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _for_profile(cls, profile: str = "reference", overrides: Mapping[str, bool] | None = None):
    """The quirk settings of ``profile``, with ``overrides`` ({quirk name: bool}) applied."""
    if profile not in PROFILES:
        raise ValueError(f"Invalid profile: {profile!r}; expected one of {', '.join(PROFILES)}")
    base = cls(**{name: q.setting(profile) for name, q in QUIRKS.items()})
    if overrides is None:
        return base
    if not isinstance(overrides, Mapping):
        raise TypeError(f"quirks must be a mapping of quirk names to True/False (or None), got "
                        f"{type(overrides).__name__} {overrides!r}")
    unknown = sorted(set(overrides) - set(QUIRKS), key=str)
    if unknown:
        raise TypeError(f"unknown quirk {unknown[0]!r}; known quirks: {', '.join(QUIRKS)}")
    for name, value in overrides.items():
        if not isinstance(value, bool):
            raise TypeError(f"quirk {name!r} must be True or False, got {value!r}")
    return replace(base, **dict(overrides))


def _as_dict(self) -> dict[str, bool]:
    return {f.name: getattr(self, f.name) for f in fields(self)}


Quirks = make_dataclass(
    "Quirks",
    [(name, bool, field(default=q.reference, metadata={"id": q.id, "clauses": q.clauses}))
     for name, q in QUIRKS.items()],
    frozen=True,
    namespace={"names": classmethod(_names), "for_profile": classmethod(_for_profile), "as_dict": _as_dict},
)
Quirks.__module__ = __name__
Quirks.__doc__ = "Quirk switches (spec/quirks.md); the defaults are profile 'reference'.\n\n" + "\n".join(
    f"    {name} ({q.id}; {', '.join(q.clauses)}): {q.summary}." for name, q in QUIRKS.items())

DOCUMENTED = Quirks.for_profile("documented")
#: Which quirks each optimizer's step reads (the others cannot change its result).
SAVEUS_QUIRKS = tuple(n for n, q in QUIRKS.items() if "saveus" in q.optimizers)
DOPE_QUIRKS = tuple(n for n, q in QUIRKS.items() if "dope" in q.optimizers)
