"""The names the command line offers as choices, importable without torch, and "did you mean" suggestions.

Why a list here and not the registries themselves: the algorithm and model registries
(:data:`fedbayes.algorithms.REGISTRY`, :data:`fedbayes.models.MODELS`) are dictionaries of torch classes, so reading
them imports torch (about 4 s), and the dataset and partition registries pull in numpy and the loaders.  The
``fedbayes`` parser is built for every command, ``--help`` included, so it takes its choices from this module, which
imports nothing but the standard library; ``tests/test_cli_ux.py`` checks that each tuple equals its registry, so
adding an algorithm, model, dataset or partition without adding its name here fails a test instead of hiding it
from the command line.  The registries stay the one place where a name is *defined*.

:func:`did_you_mean` is the one spelling of a suggestion for every unknown name (algorithm, dataset, model,
partition, preset, config key).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable

__all__ = ["ALGORITHMS", "DATASETS", "MODELS", "PARTITIONS", "choice", "did_you_mean", "unknown"]

ALGORITHMS: tuple[str, ...] = ("fedavg", "fedprox", "fedadmm", "feddyn", "fedlap", "fedlap-cov", "pvi", "bayes-admm")
"""The keys of :data:`fedbayes.algorithms.REGISTRY`, in its order."""
MODELS: tuple[str, ...] = ("cnn", "linreg", "logreg", "mlp", "resnet20")
""":func:`fedbayes.models.model_names`."""
DATASETS: tuple[str, ...] = (
    "fmnist", "mnist", "adult", "digits", "breast-cancer", "synthetic-regression", "synthetic-classification",
)
""":func:`fedbayes.data.dataset_names`, in registry order."""
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "paper")
"""The keys of :data:`fedbayes.data.PARTITIONERS`."""


def did_you_mean(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The up to ``n`` entries of ``valid`` closest to ``name`` (:func:`difflib.get_close_matches`, cutoff 0.6),
    best first; a case-insensitive exact match comes first."""
    valid = [str(v) for v in valid]
    exact = [v for v in valid if v.lower() == str(name).lower()]
    close = difflib.get_close_matches(str(name).lower(), valid, n=n, cutoff=0.6)
    return list(dict.fromkeys(exact + close))[:n]


def unknown(kind: str, name: str, valid: Iterable[str], where: str = "") -> str:
    """The message for an unknown ``kind`` (e.g. ``"dataset"``): the name, the closest valid ones, and either the
    whole list (short lists) or ``where`` the whole list is (e.g. ``"`fedbayes keys`"``).

    >>> unknown("algorithm", "bayes-adm", ALGORITHMS)  # doctest: +ELLIPSIS
    "unknown algorithm 'bayes-adm'; did you mean 'bayes-admm'? valid: fedavg, fedprox, ..."
    """
    valid = [str(v) for v in valid]
    close = did_you_mean(name, valid)
    msg = f"unknown {kind} '{name}'"
    if close:
        msg += "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    if where:
        msg += f" (all of them: {where})"
    else:
        msg += f" valid: {', '.join(valid)}" if close else f"; valid: {', '.join(valid)}"
    return msg


def choice(kind: str, valid: Iterable[str], also: Iterable[str] = (), where: str = "") -> Callable[[str], str]:
    """An argparse ``type`` that accepts a name of ``valid`` (or of ``also``, e.g. ``"all"``) and rejects any other
    with :func:`unknown`'s message (argparse's own ``invalid choice`` has no suggestion).  Pair it with
    ``choices=`` for the help text; argparse applies ``type`` first."""
    names = [str(v) for v in valid]
    ok = set(names) | {str(a) for a in also}

    def check(value: str) -> str:
        if value not in ok:
            raise argparse.ArgumentTypeError(unknown(kind, value, [*names, *also], where))
        return value

    check.__name__ = kind  # argparse names the type in some messages
    return check
