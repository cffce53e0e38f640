"""``fedbayes tune`` and ``fedbayes tune-apply``: fair hyperparameter tuning on a validation split.

``fedbayes tune --preset P --algorithm A --trials N`` runs an Optuna study (seeded TPE sampler, median pruning;
``--pruner hyperband|halving|none``: :func:`simulations.tune.study.make_pruner`)
over A's search space (``search_space`` in its module, :mod:`fedbayes.algorithms.space`).  Every trial is one
in-process run (:func:`fedbayes.engine.run_experiment`, nothing written to disk) of the preset's config for A with
the sampled values, ``validation-fraction`` (0.1 unless the preset or ``--set`` gives one) and
``eval-split = "validation"`` forced: it trains on exactly the clients' data of the final runs whenever the
training file has enough unused examples (:mod:`fedbayes.data.validation`) and never sees the test set.  Each
round's validation metric is reported to Optuna, which may prune the trial; the objective is the mean of the
last 3 evaluated rounds' ``val_nll`` (minimised) or, with ``--objective accuracy``, ``val_accuracy``
(maximised).  A trial that diverges (the run raises, or a metric is NaN) is recorded as pruned, with the reason
in its ``diverged`` user attribute; the study goes on.

Storage and resuming.  The study lives in an SQLite file ``DIR/study.db`` (default ``DIR`` =
``runs/tune/P/A``) or in any Optuna RDB storage given by ``--storage URL`` (shared by several machines).  It
records its preset, algorithm, rounds, objective, predictor, pruner, search space and the rest of the trial config in
its user attributes; running the command against a study with other values stops with an error naming the key,
before anything is written.  Re-running the same command continues a killed study until N trials are finished
(complete or pruned); with the folder's own SQLite file, trials left RUNNING by a killed process are marked
FAIL first (a lock file keeps two commands off one folder); with ``--storage`` they are failed by Optuna's
heartbeat once stale.  ``--jobs J`` runs J processes (one torch thread each) that share the storage and split
the remaining trials between them.

Outputs (after every trial, and at the end): ``DIR/best.toml`` — a preset fragment ``[algorithms.A]``: the
preset's table with the best values merged in, under a comment header (study, trials, budget, objective, best
value) — and ``DIR/best.json``; at the end ``history.png`` (optimisation history), ``importance.png``
(parameter importances; needs 2 complete trials) and ``curves.png`` (validation metric per round per trial).

``fedbayes compare --tune N`` (:mod:`simulations.tune.protocol`) runs the whole comparison protocol from one
command: every rule tuned with N trials (one study serving both objectives: every trial records ``val_accuracy``
and ``val_nll``), each rule's best chosen on validation, the final runs on the test set, both tables.

``fedbayes tune-apply DIR... --preset P --out NEW.toml`` merges the ``best.toml`` of one or more studies into
a copy of preset P and validates the result: tuned presets come from a command, not from hand edits.

Start point.  A fresh study's first trial is the preset's own values of the search-space keys (those inside the
space), so a re-tune starts from the previous best and every method gets the same head start.

``--set`` keys shape the trials (e.g. ``epochs=2`` as a cheaper budget) and are listed in best.toml's header;
only a ``--set`` key that is in the search space is fixed (no longer tuned) and written into the table.

The package's names are imported on first use (:func:`__getattr__`): ``fedbayes`` builds the ``tune`` parsers
(:mod:`simulations.tune.cli`) for every command, ``--help`` included, and the study code imports torch and Optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulations.tune.cli import add_subparsers
    from simulations.tune.outputs import apply_best, toml_table
    from simulations.tune.spec import DEFAULT_VALIDATION_FRACTION, LAST_ROUNDS, OBJECTIVES, TuneSpec, make_spec
    from simulations.tune.study import tune

_WHERE = {
    "add_subparsers": "cli", "apply_best": "outputs", "toml_table": "outputs", "DEFAULT_VALIDATION_FRACTION": "spec",
    "LAST_ROUNDS": "spec", "OBJECTIVES": "spec", "TuneSpec": "spec", "make_spec": "spec", "tune": "study",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"simulations.tune.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'simulations.tune' has no attribute {name!r}")

__all__ = [
    "DEFAULT_VALIDATION_FRACTION",
    "LAST_ROUNDS",
    "OBJECTIVES",
    "TuneSpec",
    "add_subparsers",
    "apply_best",
    "make_spec",
    "toml_table",
    "tune",
]
