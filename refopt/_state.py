"""State containers: NamedTuples (pytrees for JAX, plain tuples elsewhere) whose fields are
readable as attributes and as keys, under the reference code's names."""
from __future__ import annotations

from typing import Any, NamedTuple


def _getitem(self, key):
    if isinstance(key, str):
        if key not in self._fields:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {', '.join(self._fields)}")
        return getattr(self, key)
    return tuple.__getitem__(self, key)


def _keys(self):
    return self._fields


def _items(self):
    return tuple(zip(self._fields, self))


class SAVEUSState(NamedTuple):
    """S0: ``step`` (0-d integer array, steps taken), ``ema``, ``ema_squared`` (param's dtype)."""

    step: Any
    ema: Any
    ema_squared: Any

    __getitem__ = _getitem
    keys = _keys
    items = _items


class DOPEState(NamedTuple):
    """D0: ``step``, ``exp_avg`` (centred momentum), ``fim``, ``fim_diff``, ``prev_grad``."""

    step: Any
    exp_avg: Any
    fim: Any
    fim_diff: Any
    prev_grad: Any

    __getitem__ = _getitem
    keys = _keys
    items = _items
