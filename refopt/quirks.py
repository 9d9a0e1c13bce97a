"""Profiles and the quirk register (spec/quirks.md).

A quirk is a place where the public PyTorch code computes something other than its own
documentation says. Profile ``reference`` switches every quirk on (what the code executes);
profile ``documented`` switches off those the documentation contradicts. Each quirk can also be
set on its own, so a port can be told exactly which one it deviates on.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping

PROFILES = ("reference", "documented")


@dataclass(frozen=True)
class Quirks:
    #: Q1 (S2, D2) ``x.lerp_(x.div_(s), w)`` aliases: the result is g/s whatever ``normalization``
    #: is. Off: the documented interpolation ``g + a*(g/s - g)``.
    aliased_lerp: bool = True
    #: Q2 (A1: S1, D1, D10) a mean over no trailing axes reduces over all axes (PyTorch). Off: the
    #: array API's ``axis=()``, which reduces over none. On in both profiles.
    torch_empty_axis_mean: bool = True
    #: Q3 (D9) MARS uses this step's processed gradient g_t. Off: g_{t-1}, as documented.
    mars_current_grad: bool = True
    #: Q4 (D11) amplification ``lambda * t**lambda``. Off: ``t**lambda``, as documented.
    lambda_scaled_amplification: bool = True
    #: Q5 (D11, D12) the amplification and the cautious scale are float32, the scale a
    #: reciprocal then a multiply. Off: exact scalars in the scalar dtype, ``numel / (k + 1e-8)``.
    float32_scalars: bool = True
    #: Q6 (D12) the cautious mask compares the update with the processed gradient g_t. Off: with
    #: the MARS-corrected natural gradient c_t, as documented.
    cautious_processed_grad: bool = True

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def for_profile(cls, profile: str = "reference", overrides: Mapping[str, bool] | None = None) -> "Quirks":
        if profile not in PROFILES:
            raise ValueError(f"Invalid profile: {profile!r}; expected one of {', '.join(PROFILES)}")
        base = cls() if profile == "reference" else DOCUMENTED
        if not overrides:
            return base
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown quirk {unknown[0]!r}; known quirks: {', '.join(cls.names())}")
        for name, value in overrides.items():
            if not isinstance(value, bool):
                raise TypeError(f"quirk {name!r} must be True or False, got {value!r}")
        return replace(base, **dict(overrides))

    def as_dict(self) -> dict[str, bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DOCUMENTED = Quirks(
    aliased_lerp=False,
    mars_current_grad=False,
    lambda_scaled_amplification=False,
    float32_scalars=False,
    cautious_processed_grad=False,
)

#: Which quirks each optimizer's step reads (the others cannot change its result).
SAVEUS_QUIRKS = ("aliased_lerp", "torch_empty_axis_mean")
DOPE_QUIRKS = Quirks.names()
