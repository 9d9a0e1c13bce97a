"""(f) each quirk switch changes the result where its clause acts, and nowhere else.

Every case flips ONE quirk away from the reference profile, runs 3 float64 NumPy steps and
compares with the reference profile: ``differs`` means some parameter element moves by more than
1e-12 of the scale; ``same`` means bit-identical (the code path is the same), except where noted.
"""
from __future__ import annotations

import numpy as np
import pytest

import refopt

STEPS = 3


def _final(core, name, shape, quirks=None, **hp):
    opt = core.OPTIMIZERS[name](**hp, quirks=quirks)
    p0, grads = core.problem(shape, STEPS, seed=core.seed("quirks", shape))
    return core.run(core.numpy, opt, p0, grads)[-1][0]


def _change(core, name, quirk, shape, base=None, **hp):
    """Largest change of the final parameter, relative to its scale, when ``quirk`` is off
    (other quirks as in ``base``, default all on)."""
    ref = _final(core, name, shape, base, **hp)
    off = _final(core, name, shape, {**(base or {}), quirk: False}, **hp)
    if ref.size == 0:
        return 0.0
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(off))
    return float(np.nanmax(np.abs(off - ref)) / np.nanmax(np.abs(ref)))


DIFFERS = [
    # Q1: the documented interpolation differs when normalization is not 1 and S2/D2 act
    ("saveus", "aliased_lerp", (3, 5), {}),
    ("dope", "aliased_lerp", (17,), {}),
    ("saveus", "aliased_lerp", (4, 1), {"normalize_channels": False}),
    # Q2: only 1-D tensors (S1/D1, and D10 alone when centralization is off)
    ("saveus", "torch_empty_axis_mean", (17,), {}),
    ("dope", "torch_empty_axis_mean", (17,), {}),
    ("dope", "torch_empty_axis_mean", (17,), {"centralization": 0.0}),
    ("dope", "mars_current_grad", (3, 5), {}),
    ("dope", "lambda_scaled_amplification", (3, 5), {}),
    # Q6 shows only with Q3 off: with MARS on g_t, c_t = g_t * (1/(denom*denom_diff) + mars)
    # has the sign of g_t, so both masks agree whenever gamma >= 0
    ("dope", "cautious_processed_grad", (3, 5), {"base": {"mars_current_grad": False}}),
]

SAME = [
    ("saveus", "aliased_lerp", (3, 5), {"normalization": 0.0}),  # clause off
    ("dope", "aliased_lerp", (2,), {}),  # 1-D with <= 2 elements: no normalization
    ("saveus", "aliased_lerp", (), {}),
    ("saveus", "torch_empty_axis_mean", (3, 5), {}),  # trailing axes exist
    ("dope", "torch_empty_axis_mean", (2, 2, 3, 3), {}),
    ("saveus", "torch_empty_axis_mean", (), {}),  # 0-d: all axes and no axes give the same mean
    ("dope", "torch_empty_axis_mean", (), {}),
    ("saveus", "torch_empty_axis_mean", (17,), {"centralization": 0.0}),  # SAVEUS has no D10
    ("dope", "torch_empty_axis_mean", (17,), {"centralization": -0.5}),  # D1 gate is > 0 ...
    ("dope", "mars_current_grad", (3, 5), {"gamma": 0.0}),
    ("dope", "lambda_scaled_amplification", (3, 5), {"momentum_lambda": 1.0}),
    ("dope", "cautious_processed_grad", (3, 5), {"cautious": False}),
    ("dope", "cautious_processed_grad", (3, 5), {}),  # see DIFFERS: same sign while Q3 is on
    ("dope", "cautious_processed_grad", (17,), {"gamma": 0.3}),
    ("dope", "float32_scalars", (3, 5), {"cautious": False, "momentum_lambda": 0.0}),
]
SAVEUS_IGNORES = ["mars_current_grad", "lambda_scaled_amplification", "float32_scalars",
                  "cautious_processed_grad"]


@pytest.mark.parametrize("name,quirk,shape,hp", DIFFERS, ids=lambda v: str(v))
def test_quirk_changes_result(core, name, quirk, shape, hp):
    assert _change(core, name, quirk, shape, **hp) > 1e-12


@pytest.mark.parametrize("name,quirk,shape,hp", SAME, ids=lambda v: str(v))
def test_quirk_changes_nothing_elsewhere(core, name, quirk, shape, hp):
    if quirk == "torch_empty_axis_mean" and hp.get("centralization") == -0.5:
        # ... so D1 is idle, but D10's 1-D centring still reads the quirk
        assert _change(core, name, quirk, shape, **hp) > 1e-12
    else:
        assert _change(core, name, quirk, shape, **hp) == 0.0


def test_aliased_lerp_at_normalization_one_is_rounding_only(core):
    """With normalization=1 the documented interpolation g + (g/s - g) equals g/s up to rounding."""
    assert _change(core, "saveus", "aliased_lerp", (3, 5), normalization=1.0) <= 1e-14


@pytest.mark.parametrize("shape", [(), (3, 5)], ids=str)
def test_float32_scalars_tiny_but_nonzero(core, shape):
    """Q5: float32 D11/D12 scalars move a float64 result by float32 rounding only."""
    change = _change(core, "dope", "float32_scalars", shape)
    assert 0 < change < 1e-6


@pytest.mark.parametrize("shape", [(), (17,), (3, 5)], ids=str)
@pytest.mark.parametrize("quirk", SAVEUS_IGNORES)
def test_saveus_ignores_dope_quirks(core, quirk, shape):
    assert _change(core, "saveus", quirk, shape, weight_decay=0.01) == 0.0


def test_profiles():
    ref, doc = refopt.Quirks.for_profile("reference"), refopt.Quirks.for_profile("documented")
    assert all(ref.as_dict().values())
    assert doc.as_dict() == {**dict.fromkeys(refopt.Quirks.names(), False), "torch_empty_axis_mean": True}
    assert refopt.DOPE(profile="documented").quirks == doc
    assert refopt.DOPE(profile="documented", quirks={"float32_scalars": True}).quirks.float32_scalars
    assert set(refopt.Quirks.names()) == {"aliased_lerp", "torch_empty_axis_mean", "mars_current_grad",
                                          "lambda_scaled_amplification", "float32_scalars",
                                          "cautious_processed_grad"}
