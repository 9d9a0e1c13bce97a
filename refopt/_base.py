"""What SAVEUS and DOPE share: hyperparameter storage, profiles, init, and the checked step."""
from __future__ import annotations

import math
from typing import Any, Mapping

from . import _validate
from ._arrays import is_real_floating, namespace
from .quirks import Quirks


class Optimizer:
    """Immutable description of an optimizer: hyperparameters plus quirk settings.

    ``init(param)`` and ``step(param, grad, state)`` are pure; the object holds no arrays, so a
    bound ``step`` can be handed to ``jax.jit`` or ``torch.compile`` as it is."""

    name: str
    State: type
    #: (name, default) pairs in the reference's signature order.
    DEFAULTS: tuple[tuple[str, Any], ...]

    def __init__(self, *, profile: str = "reference", quirks: Mapping[str, bool] | None = None,
                 check_finite: bool = False, **hparams):
        unknown = sorted(set(hparams) - {k for k, _ in self.DEFAULTS})
        if unknown:
            raise TypeError(
                f"{self.name}() got an unexpected hyperparameter {unknown[0]!r}; "
                f"known: {', '.join(k for k, _ in self.DEFAULTS)}"
            )
        values = {k: hparams.get(k, d) for k, d in self.DEFAULTS}
        self._hparams = self._validate(values)
        self.profile = profile
        self.quirks = Quirks.for_profile(profile, quirks)
        self.check_finite = _validate.flag("check_finite", check_finite)

    def _validate(self, h: dict) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getattr__(self, key):
        try:
            return self.__dict__["_hparams"][key]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {key!r}") from None

    @property
    def hparams(self) -> dict:
        """The hyperparameters, by the reference's names (a copy)."""
        return dict(self._hparams)

    def replace(self, **changes) -> "Optimizer":
        """A copy with some hyperparameters (or ``profile``/``quirks``/``check_finite``) changed."""
        kw = dict(self._hparams, profile=self.profile, quirks=self.quirks.as_dict(),
                  check_finite=self.check_finite)
        kw.update(changes)
        return type(self)(**kw)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams.items())
        return f"refopt.{self.name}({args}, profile={self.profile!r})"

    def init(self, param):
        """S0/D0: step 0 and zero buffers in ``param``'s namespace, dtype and device."""
        xp = namespace(param)
        if not is_real_floating(xp, param.dtype):
            raise TypeError(f"{self.name}.init: param dtype must be real floating, got {param.dtype}")
        zeros = [xp.zeros_like(param) for _ in self.State._fields[1:]]
        return self.State(xp.asarray(0, device=_device(param)), *zeros)

    def step(self, param, grad, state):
        """One update; returns ``(new_param, new_state)``. The inputs are never modified."""
        xp = _validate.step_inputs(self.name, self.State, param, grad, state)
        if self.check_finite:
            _validate.finite_inputs(self.name, xp, param, grad)
        if math.prod(param.shape) == 0:  # A6: nothing to update, only the count moves
            return param, state._replace(step=xp.asarray(state.step + 1))
        return self._update(param, grad, state)

    def _update(self, param, grad, state):  # pragma: no cover - overridden
        raise NotImplementedError


def _device(x):
    import array_api_compat as aac

    return aac.device(x)
