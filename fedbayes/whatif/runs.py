"""Runs on disk for what-if: loading a run's federation and state, retraining without clients, compatibility."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbayes.algorithms import Algorithm, DiskStore
from fedbayes.config import Experiment, resolve
from fedbayes.engine import run_rounds
from fedbayes.federation import Federation, make_model
from fedbayes.gaussian import DiagGaussian, check_same_layout
from fedbayes.results import ResultsWriter, load_checkpoint
from fedbayes.rounds import evaluate_posterior_on
from fedbayes.whatif.removal import RunMismatchError, UnsupportedAlgorithmError, WhatIfError, check_supported

__all__ = [
    "LoadedRun", "architecture", "build_federation", "check_compatible", "evaluate_posterior", "load_run",
    "parse_clients", "run_federation", "same_partition",
]


# ============================================================================================ runs on disk
def build_federation(
    exp: Experiment, out_dir: Path | None = None, data_dir: Path | None = None, *, compact: bool = False
) -> tuple[Federation, list[int]]:
    """:meth:`Federation.build` and the active clients (those not in ``exclude-clients``).

    ``compact=False`` is the engine's layout: rule slot = client id over all K (the rule's ``active`` list
    leaves excluded clients out of every average and of K).  ``compact=True`` rebuilds the rule over the
    K' = K − |excluded| active clients (slot j ↔ client ``active[j]``).
    """
    fed = Federation.build(exp, out_dir, data_dir)
    excluded = set(exp.run.exclude_clients)
    active = [c for c in range(exp.run.num_clients) if c not in excluded]
    if compact and len(active) != exp.run.num_clients:
        template = {k: v.detach() for k, v in fed.model.named_parameters()}
        store = fed.rule.store if isinstance(fed.rule.store, DiskStore) else None
        fed.rule = exp.algorithm_cls(template, len(active), exp.algo, store=store,
                                     participants=exp.run.participants_per_round())
    return fed, active


@dataclass
class LoadedRun:
    """A finished (or checkpointed) run: its config, checkpoint meta and federation with the state loaded.

    The rule has the engine's layout (slot = client id); ``active`` lists the clients not excluded.
    """

    path: Path
    exp: Experiment
    meta: dict[str, Any]
    fed: Federation
    active: list[int]
    _full: dict[int | None, dict[str, float]] = field(default_factory=dict)

    @property
    def rule(self) -> Algorithm:
        return self.fed.rule

    @property
    def round(self) -> int:
        return int(self.meta["round"])

    @property
    def algorithm(self) -> str:
        return self.exp.run.algorithm

    @property
    def excluded(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.exp.run.exclude_clients)))

    def slots(self, clients: Iterable[int]) -> list[int]:
        """Validate client ids (partition ids) for removal and return them as rule slots (sorted, unique)."""
        ids = sorted(set(int(c) for c in clients))
        if not ids:
            raise WhatIfError("no client given to remove")
        unknown = [c for c in ids if c not in self.active]
        if unknown:
            why = [c for c in unknown if c in self.excluded]
            extra = f" (already excluded from this run: {why})" if why else ""
            raise WhatIfError(f"unknown client id(s) {unknown}{extra}; this run's clients are {self.active}")
        if set(ids) >= set(self.active):
            raise WhatIfError(f"cannot remove every client {self.active}: nothing would remain")
        return ids

    def posterior(self) -> DiagGaussian:
        """The trained global posterior λ (unfloored, as the rule keeps it)."""
        g = self.rule.global_posterior()
        if g is None:
            raise UnsupportedAlgorithmError(f"'{self.algorithm}' has no global posterior")
        return g

    def full_metrics(self, subset: int | None = None) -> dict[str, float]:
        """The trained posterior's test metrics (computed once per ``subset``; on the whole test set, equal to the
        last evaluated round's)."""
        if subset not in self._full:
            self._full[subset] = self.evaluate(self.posterior(), subset=subset)
        return dict(self._full[subset])

    def evaluate(self, posterior: DiagGaussian, *, subset: int | None = None) -> dict[str, float]:
        """Test metrics of ``posterior`` as the engine evaluates the global one (:func:`evaluate_posterior`)."""
        return evaluate_posterior(self.fed, self.exp, posterior, self.round, self.rule.config.min_prec, subset=subset)

    def num_examples(self, client: int) -> int:
        return len(self.fed.parts[client])


def parse_clients(spec: str | Iterable[int]) -> list[int]:
    """``"3,5"`` or ``[3, 5]`` -> ``[3, 5]`` (sorted, unique), with a clear error for non-integers."""
    if isinstance(spec, str):
        items: list[Any] = [p for p in spec.split(",") if p.strip()]
    else:
        items = list(spec)
    try:
        out = sorted({int(str(p).strip()) for p in items})
    except ValueError:
        raise WhatIfError(f"client ids must be integers like '3' or '3,5', got {spec!r}") from None
    if not out:
        raise WhatIfError("no client given")
    return out


def load_run(run_dir: str | Path, *, data_dir: Path | None = None) -> LoadedRun:
    """Read a run folder (verified checkpoint), rebuild its federation and load the rule's state.

    Nothing is written; the source folder is only read.  Raises :class:`UnsupportedAlgorithmError` for point
    algorithms (before loading data) and :class:`~fedbayes.results.CheckpointError` for a missing/corrupt one.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise WhatIfError(f"run folder {path} does not exist")
    meta, state = load_checkpoint(path)
    exp = resolve(meta["config"])
    check_supported(exp.run.algorithm)
    fed, active = build_federation(exp, None, data_dir)
    fed.rule.load_state_tensors(state)
    return LoadedRun(path, exp, meta, fed, active)


def test_subset(n_test: int, size: int, seed: int) -> np.ndarray | None:
    """The fixed test-set subset of ``--eval subset``: ``size`` indices drawn without replacement (sorted), the
    same for every answer about one run (seeded by the run's seed); None when the test set is not larger."""
    if size >= n_test:
        return None
    return np.sort(np.random.default_rng([seed, 104729]).choice(n_test, size, replace=False))


def evaluate_posterior(
    fed: Federation, exp: Experiment, posterior: DiagGaussian, server_round: int, min_prec: float = 1e-8,
    *, subset: int | None = None,
) -> dict[str, float]:
    """Test metrics of ``posterior`` exactly as the engine evaluates the global one in ``server_round``
    (:func:`fedbayes.rounds.evaluate_posterior_on`, on the test set, with the precision floored at ``min_prec``),
    so a what-if posterior and the trained one see the same noise.  ``subset``: on that many test examples only
    (:func:`test_subset`)."""
    assert fed.x_test is not None and fed.y_test is not None
    x, y = fed.x_test, fed.y_test
    idx = test_subset(len(y), subset, exp.run.seed) if subset is not None else None
    if idx is not None:
        sel = torch.from_numpy(idx).to(x.device)
        x, y = x[sel], y[sel]
    post = posterior.to(dtype=torch.float64).clamp_prec(min_prec)
    return evaluate_posterior_on(fed.model, post.mean(), post, x, y, fed.data.task, exp, server_round, fed.device)


# ============================================================================================ retraining
def run_federation(
    flat: Mapping[str, Any] | Experiment,
    out_dir: str | Path | None,
    *,
    stop_round: int | None = None,
    data_dir: Path | None = None,
    progress: bool = False,
    evaluate: bool = True,
    train_seed: int | None = None,
) -> tuple[list[dict[str, Any]], Federation]:
    """Train from scratch a federation in which the ``exclude-clients`` never existed; returns (rows, federation).

    This is the engine's own loop (:func:`fedbayes.engine.run_rounds`): same data, partition (over all K),
    model initialisation, participants and per-client seeds as :func:`fedbayes.engine.run_experiment`; the
    rule counts only the active clients (``Algorithm.active``), so excluded clients are in no average, sum or
    K.  ``stop_round`` stops early while keeping the configured ``rounds`` (the cosine learning-rate schedule
    depends on it).  The folder (if any) gets ``config.json``, ``metrics.jsonl`` and ``posterior.safetensors``.
    ``evaluate=False``: no test metrics in the rows.  ``train_seed``: train with another seed (initialisation,
    participants, minibatches, IVON noise) on the same partition (which is drawn with the run's ``seed``).
    """
    exp = flat if isinstance(flat, Experiment) else resolve(flat)
    out = Path(out_dir) if out_dir is not None else None
    fed = Federation.build(exp, out, data_dir)
    if train_seed is not None and train_seed != exp.run.seed:  # same data and partition, another training seed
        exp = resolve({**exp.to_flat(), "seed": train_seed})
        model = make_model(exp, fed.data)
        template = {k: v.detach() for k, v in model.named_parameters()}
        rule = exp.algorithm_cls(template, exp.run.num_clients, exp.algo, active=fed.rule.active,
                                 participants=exp.run.participants_per_round())
        fed = dataclasses.replace(fed, exp=exp, model=model, rule=rule)
    writer = ResultsWriter(out, exp.to_flat()) if out is not None else None
    rows = run_rounds(fed, exp, [], writer, stop_round=stop_round, progress=progress, checkpoint=False,
                      evaluate=evaluate)
    return rows, fed


def architecture(exp: Experiment) -> dict[str, Any]:
    """What two runs must share to be combined: dataset and its input scale, model, hidden widths, activation
    and δ of λ₀."""
    r = exp.run
    return {"dataset": r.dataset, "raw-pixels": r.raw_pixels, "model": r.model, "hidden": list(r.hidden),
            "activation": r.activation, "prior-prec": getattr(exp.algo, "prior_prec", None)}


_PARTITION_KEYS = ("dataset", "train_fraction", "num_clients", "partition", "size_alpha", "class_alpha",
                   "classes_per_client", "per_class", "pool_clients", "seed")


def same_partition(a: LoadedRun, b: LoadedRun) -> bool:
    """Whether both runs split the same data the same way (so client ids name the same data)."""
    return all(getattr(a.exp.run, k) == getattr(b.exp.run, k) for k in _PARTITION_KEYS)


def check_compatible(a: LoadedRun, b: LoadedRun, what: str = "runs") -> list[str]:
    """Raise :class:`RunMismatchError` unless ``a`` and ``b`` share dataset, model, shapes and prior λ₀.

    Returns notes (e.g. that client disjointness cannot be checked because the partitions differ).  Runs on the
    same partition that share a client are rejected (its data would be counted twice).
    """
    arch_a, arch_b = architecture(a.exp), architecture(b.exp)
    diff = {k: (arch_a[k], arch_b[k]) for k in arch_a if arch_a[k] != arch_b[k]}
    if diff:
        raise RunMismatchError(f"{what} differ in {diff} ({a.path} vs {b.path}); they must share dataset, "
                               f"model and prior λ₀")
    ga, gb = a.rule.global_posterior(), b.rule.global_posterior()
    if ga is None or gb is None:
        raise UnsupportedAlgorithmError("both runs need a global posterior")
    try:
        check_same_layout(ga.eta, gb.eta, what)
    except ValueError as e:
        raise RunMismatchError(str(e)) from None
    notes = []
    if same_partition(a, b):
        both = sorted(set(a.active) & set(b.active))
        if both:
            raise RunMismatchError(f"client(s) {both} took part in both {a.path} and {b.path} (same partition): "
                                   f"their data would be counted twice; run them with disjoint exclude-clients")
    else:
        notes.append("the runs use different partitions: that their clients' data is disjoint cannot be checked")
    return notes
