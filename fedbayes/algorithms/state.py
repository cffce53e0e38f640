"""Typed rule state: small frozen dataclasses of Gaussians and parameter dicts (as optax's ``NamedTuple`` states).

Each rule declares its global state and its per-client state, e.g. bayes-admm's::

    @dataclass(frozen=True)
    class Client(State):
        dual: DiagGaussian | None = None     # λ̂ₖ
        post: DiagGaussian | None = None     # λₖ

and its update reads those fields, never string keys.  The flat ``prefix/param`` names exist only where state meets
storage: :meth:`State.to_tensors` writes a Gaussian field ``f`` as ``f.eta/<param>`` and ``f.prec/<param>`` and a
parameter field as ``f/<param>`` (the layout of every checkpoint fedbayes has written, so old checkpoints load
unchanged); a field's key may differ from its Python name (``field(metadata={"key": "global"})``: ``global`` is a
Python keyword).  Absent fields are ``None``.

Each name is declared once, in the dataclass: the storage keys, the checkpoint layout, the client store's entries
and what-if's edits all come from the fields (:func:`_layout`); a field that is a running sum over the clients is
marked where it is declared (``metadata=DERIVED``), not listed again by name; and a rule's state
types are the type arguments of ``Algorithm[GlobalState, ClientState]`` (:class:`fedbayes.algorithms.base.Algorithm`
reads them from there).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Self

from torch import Tensor

from fedbayes.gaussian import DiagGaussian, Params

__all__ = ["DERIVED", "NoState", "State"]


_LAYOUTS: dict[type, tuple[tuple[str, str, bool], ...]] = {}


DERIVED: Mapping[str, Any] = types.MappingProxyType({"derived": True})
"""Field metadata of a field that is a sum over the clients' states (a running sum, recomputed from the client
store): ``total: Params | None = field(default=None, metadata=DERIVED)``.  Whoever edits the client store behind the
rule's back (``fedbayes forget``) unsets such fields with :meth:`State.without_derived`, and the rule recomputes
them."""


def _layout(cls: type) -> tuple[tuple[str, str, bool], ...]:
    """(attribute, storage key, is Gaussian) per field of a state class (computed once per class)."""
    if cls in _LAYOUTS:
        return _LAYOUTS[cls]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        args = typing.get_args(hint) if union else (hint,)
        gaussian = DiagGaussian in args
        if not gaussian and not any(a is dict or typing.get_origin(a) is dict for a in args):
            raise TypeError(f"{cls.__name__}.{f.name}: state fields are DiagGaussian or Params (optionally None)")
        out.append((f.name, str(f.metadata.get("key", f.name)), gaussian))
    _LAYOUTS[cls] = tuple(out)
    return _LAYOUTS[cls]


@dataclasses.dataclass(frozen=True)
class State:
    """Base of typed rule states (subclasses are frozen dataclasses of ``DiagGaussian | Params | None`` fields)."""

    @classmethod
    def derived_fields(cls) -> tuple[str, ...]:
        """The fields declared with :data:`DERIVED` (sums over the clients' states)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("derived"))

    def without_derived(self) -> Self:
        """A copy with the :data:`DERIVED` fields unset (recomputed from the client store on the next update)."""
        return dataclasses.replace(self, **{f: None for f in self.derived_fields()})

    def to_tensors(self) -> dict[str, Tensor]:
        """The flat named tensors of the set fields (the storage layout)."""
        out: dict[str, Tensor] = {}
        for attr, name, gaussian in _layout(type(self)):
            v = getattr(self, attr)
            if v is None:
                continue
            if gaussian:
                out.update({f"{name}.eta/{k}": t for k, t in v.eta.items()})
                out.update({f"{name}.prec/{k}": t for k, t in v.prec.items()})
            else:
                out.update({f"{name}/{k}": t for k, t in v.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], names: Iterable[str]) -> Self:
        """Inverse of :meth:`to_tensors` for a model with parameters ``names`` (a field whose tensors are absent is
        ``None``; one whose tensors are only partly there is an error naming the missing key)."""
        names = list(names)
        values: dict[str, Any] = {}
        for attr, name, gaussian in _layout(cls):
            parts = (f"{name}.eta", f"{name}.prec") if gaussian else (name,)
            if not any(f"{p}/{k}" in tensors for p in parts for k in names):
                values[attr] = None
                continue
            missing = [f"{p}/{k}" for p in parts for k in names if f"{p}/{k}" not in tensors]
            if missing:
                raise ValueError(f"{cls.__qualname__}: state '{name}' lacks {missing[:3]}")
            got = [{k: tensors[f"{p}/{k}"] for k in names} for p in parts]
            values[attr] = DiagGaussian(got[0], got[1]) if gaussian else got[0]
        return cls(**values)

    def replace(self, **changes: DiagGaussian | Params | None) -> Self:
        """A copy with ``changes`` applied (states are immutable)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class NoState(State):
    """The per-client state of a rule that keeps none (FedAvg, FedProx)."""

