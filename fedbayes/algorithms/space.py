"""Search spaces: the ranges ``fedbayes tune`` samples an algorithm's hyperparameters from.

Each algorithm declares its space next to its config, as data (a class-level table keyed by the flat
kebab-case config keys, run-level local keys such as ``lr`` or ``temperature`` as well as the algorithm's own
such as ``rho``)::

    search_space: ClassVar[dict[str, Dim]] = {"lr": LogUniform(1e-4, 1e-2), "mu": LogUniform(1e-4, 1.0)}

A :class:`Dim` knows how to ask a sampler for a value (:meth:`Dim.suggest`, through the small
:class:`Suggester` protocol that an ``optuna.Trial`` satisfies, so this module does not import Optuna), whether a
value lies inside it, and how to describe itself (the description is stored with a study, so a study is never
continued with other ranges).  Keys that are not in the space keep the preset's values.  A preset may move a
dimension's edges for its own model (``[search-space.bayes-admm] lr = [2e-3, 3e-2]``, :meth:`Dim.rebound`): the
ranges are made for the papers' MLP, and IVON's useful ``lr`` scales with its ``hess-init``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

__all__ = ["Choice", "Dim", "IntRange", "LogUniform", "Suggester", "Uniform", "describe_space"]


class Suggester(Protocol):
    """The part of ``optuna.Trial`` a :class:`Dim` uses."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


@dataclass(frozen=True)
class Dim(ABC):
    """One dimension of a search space."""

    @abstractmethod
    def suggest(self, trial: Suggester, name: str) -> Any:
        """Ask ``trial`` for a value of the key ``name``."""

    @abstractmethod
    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this dimension."""

    @abstractmethod
    def describe(self) -> str:
        """A short, exact description, e.g. ``"log-uniform[0.0001, 0.01]"``."""

    def bounds(self) -> list[Any]:
        """Values at the edges of the dimension (used to check a space against the config's validation)."""
        return []

    def rebound(self, value: Any) -> Dim:
        """The same kind of dimension over other edges: ``[low, high]`` (a float or integer range) or the list
        of options (:class:`Choice`); how a preset's ``[search-space.A]`` table widens or narrows a rule's space
        for a model it was not made for.  Raises ``ValueError`` naming what is wrong."""
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"{self.describe()}: give [low, high], got {value!r}")
        low, high = value
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"{self.describe()}: [low, high] must be numbers, got {value!r}")
        if isinstance(self, IntRange) and not all(isinstance(v, int) for v in (low, high)):
            raise ValueError(f"{self.describe()}: [low, high] must be integers, got {value!r}")
        return replace(self, low=low, high=high)  # type: ignore[call-arg]


def _check_range(low: float, high: float, what: str) -> None:
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ValueError(f"{what}: need finite low < high, got [{low}, {high}]")


@dataclass(frozen=True)
class LogUniform(Dim):
    """A float whose logarithm is uniform on [log low, log high] (for values that span decades)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_range(self.low, self.high, "LogUniform")
        if self.low <= 0:
            raise ValueError(f"LogUniform needs low > 0, got {self.low}")

    def suggest(self, trial: Suggester, name: str) -> float:
        return float(trial.suggest_float(name, self.low, self.high, log=True))

    def contains(self, value: Any) -> bool:
        return isinstance(value, int | float) and self.low <= float(value) <= self.high

    def describe(self) -> str:
        return f"log-uniform[{self.low:g}, {self.high:g}]"

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Uniform(Dim):
    """A float uniform on [low, high]."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_range(self.low, self.high, "Uniform")

    def suggest(self, trial: Suggester, name: str) -> float:
        return float(trial.suggest_float(name, self.low, self.high))

    def contains(self, value: Any) -> bool:
        return isinstance(value, int | float) and self.low <= float(value) <= self.high

    def describe(self) -> str:
        return f"uniform[{self.low:g}, {self.high:g}]"

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


@dataclass(frozen=True)
class IntRange(Dim):
    """An integer in [low, high] (both included), optionally log-spaced."""

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"IntRange: need low < high, got [{self.low}, {self.high}]")
        if self.log and self.low < 1:
            raise ValueError(f"IntRange(log=True) needs low >= 1, got {self.low}")

    def suggest(self, trial: Suggester, name: str) -> int:
        return int(trial.suggest_int(name, self.low, self.high, log=self.log))

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        return f"int{'-log' if self.log else ''}[{self.low}, {self.high}]"

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Choice(Dim):
    """One of a few values (str, int, float or bool)."""

    options: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise ValueError(f"Choice needs at least two options, got {self.options}")

    def suggest(self, trial: Suggester, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.options))

    def contains(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return "choice[" + ", ".join(repr(o) for o in self.options) + "]"

    def rebound(self, value: Any) -> Dim:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{self.describe()}: give the list of options, got {value!r}")
        return Choice(tuple(value))

    def bounds(self) -> list[Any]:
        return list(self.options)


def describe_space(space: Mapping[str, Dim]) -> dict[str, str]:
    """``{key: description}`` in key order (what a study stores to refuse continuing with other ranges)."""
    return {k: space[k].describe() for k in sorted(space)}
