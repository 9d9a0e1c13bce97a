"""State containers, built from the registry: NamedTuples (pytrees for JAX, plain tuples
elsewhere) whose fields, under the reference code's names, read as attributes and as keys."""
from __future__ import annotations

from typing import NamedTuple

from . import registry


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


def _state_type(facts: registry.OptimizerFacts) -> type:
    name = f"{facts.name}State"
    cls = NamedTuple(name, [(field, object) for field in facts.state])
    cls.__getitem__ = _getitem
    cls.keys = _keys
    cls.items = _items
    cls.__module__ = "refopt"
    fields = "; ".join(f"``{k}``: {facts.state_doc[k]}" for k in facts.state)
    cls.__doc__ = f"{facts.name} state ({facts.clauses[0]}, spec/{facts.spec_file}#state): {fields}."
    return cls


SAVEUSState = _state_type(registry.SAVEUS)
DOPEState = _state_type(registry.DOPE)
