"""``fedbayes evaluate RUN``: re-evaluate a finished run's saved posterior (``posterior.safetensors``) with other
prediction settings, without retraining.

    fedbayes evaluate runs/x --split validation --set bma-predictive=linearized --set bma-scale=10

Only the keys that change how the saved posterior is turned into predictions may be set (:data:`EVAL_KEYS`:
``bma-predictive``, ``bma-scale``, ``bma-samples``, ``bma-logit-samples``, ``device``); the data, split and model
are rebuilt from the run's ``config.json`` exactly as in training (the validation split is seeded by the run's
``seed``).  The posterior average uses the seed the engine used in the run's last round, so with the run's own
settings the numbers are those of the last row of ``metrics.jsonl`` (for the split it was evaluated on).  Prints
one JSON object: ``{split}_*`` for the mean prediction and ``bma_{split}_*`` for the posterior average.

``--split validation`` needs a validation set: a run trained with ``validation-fraction`` > 0 has one; for a run
trained without, ``--validation-fraction F`` draws one from the training examples no client holds (possible only
when the run left some unused: ``train-fraction`` < 1, or a ``shards``/``paper`` partition), else the run must be
retrained with ``--set validation-fraction=0.1``.  The error says which.

The module imports torch only when a command runs: the parser (:func:`add_subparsers`) is built for every
``fedbayes`` command, ``--help`` included.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbayes.keys import kebab_keys

if TYPE_CHECKING:
    import torch

    from fedbayes.config import Experiment
    from fedbayes.federation import Federation
    from fedbayes.gaussian import DiagGaussian

__all__ = ["EVAL_KEYS", "SavedRun", "add_subparsers", "evaluate_run"]

EVAL_KEYS = ("bma-predictive", "bma-scale", "bma-samples", "bma-logit-samples", "device")
"""Run keys ``fedbayes evaluate --set`` may change (they do not touch the data, the model or the posterior)."""


@dataclass
class SavedRun:
    """A finished run's config, rebuilt federation (data, split, model) and saved global mean/posterior."""

    path: Path
    exp: Experiment
    fed: Federation
    mean: dict[str, torch.Tensor]
    posterior: DiagGaussian | None
    last_round: int

    @staticmethod
    def load(run_dir: str | Path, data_dir: Path | None = None, validation_fraction: float | None = None
             ) -> SavedRun:
        """``validation_fraction``: give a run trained without a validation set one, drawn by the rule of
        :mod:`fedbayes.data.validation` from the training-file examples no client holds (refused when that would
        hold examples out of the clients' data: the posterior was trained on them)."""
        from fedbayes.config import ConfigError, load_config_file, resolve
        from fedbayes.federation import Federation
        from fedbayes.gaussian import DiagGaussian
        from fedbayes.results import read_metrics, read_posterior

        path = Path(run_dir)
        if not (path / "posterior.safetensors").exists():
            raise ValueError(f"{path} has no posterior.safetensors (not a finished run folder)")
        flat = load_config_file(path / "config.json")
        if validation_fraction is not None:
            flat = {**flat, "validation-fraction": validation_fraction}
        exp = resolve(flat)
        fed = Federation.build(exp, None, data_dir)
        if validation_fraction is not None and fed.validation is not None and fed.validation.source != "unused":
            raise ConfigError(f"{path}: too few training examples are unused for validation-fraction "
                              f"{validation_fraction} (the run's partition uses every training example); a hold-out "
                              "would take examples the run trained on. Retrain with a validation set: "
                              f"`fedbayes run --config {path / 'config.json'} --set validation-fraction=0.1 --out NEW`")
        saved = read_posterior(path)
        names = list(dict(fed.model.named_parameters()))
        mean = {k: saved[f"mean/{k}"].double() for k in names}
        posterior = None
        if all(f"prec/{k}" in saved for k in names):
            posterior = DiagGaussian.from_mean_prec(mean, {k: saved[f"prec/{k}"].double() for k in names})
        rows = [r for r in read_metrics(path) if "round" in r]
        last = int(rows[-1]["round"]) if rows else exp.run.rounds
        return SavedRun(path, exp, fed, mean, posterior, last)

    def evaluate(self, sets: Mapping[str, Any] | None = None, split: str | None = None) -> dict[str, float]:
        """Metrics on ``split`` (``"validation"``, ``"test"``; None: the run's ``eval-split``) with the run's
        prediction settings changed by ``sets`` (keys in :data:`EVAL_KEYS`)."""
        from fedbayes.config import ConfigError, resolve
        from fedbayes.federation import resolve_device
        from fedbayes.metrics import evaluate_model

        sets = kebab_keys(sets)
        bad = sorted(set(sets) - set(EVAL_KEYS))
        if bad:
            raise ConfigError(f"evaluate: {bad} cannot be changed after training; valid: {list(EVAL_KEYS)}")
        exp = resolve({**self.exp.to_flat(), **sets})
        split = split or exp.run.eval_split
        if split == "validation":
            if self.fed.x_val is None or self.fed.y_val is None:
                raise ConfigError(
                    f"{self.path}: the run has no validation split (it was trained with validation-fraction = 0). "
                    "Give it one with --validation-fraction 0.1 (drawn from the training examples no client holds; "
                    "possible when the run left some unused: train-fraction < 1, or a shards/paper partition), or "
                    f"retrain with one: `fedbayes run --config {self.path / 'config.json'} "
                    "--set validation-fraction=0.1 --out NEW`; or evaluate --split test")
            x, y, prefix = self.fed.x_val, self.fed.y_val, "val_"
        elif split == "test":
            assert self.fed.x_test is not None and self.fed.y_test is not None
            x, y, prefix = self.fed.x_test, self.fed.y_test, "test_"
        else:
            raise ConfigError(f"evaluate: unknown split {split!r}; valid: ['test', 'validation']")
        return evaluate_model(
            self.fed.model, self.mean, x, y, self.fed.data.task, posterior=self.posterior,
            samples=exp.run.bma_samples if self.posterior is not None else 0, noise_var=exp.local_setting("noise_var"),
            seed=exp.run.seed * 7919 + self.last_round, prefix=prefix, device=resolve_device(exp.run.device),
            predictive=exp.run.bma_predictive, scale=exp.run.bma_scale, logit_samples=exp.run.bma_logit_samples,
        )


def evaluate_run(
    run_dir: str | Path, sets: Mapping[str, Any] | None = None, split: str | None = None,
    data_dir: Path | None = None, validation_fraction: float | None = None,
) -> dict[str, float]:
    """Metrics of a finished run's saved posterior on ``split`` with its prediction settings changed by ``sets``."""
    return SavedRun.load(run_dir, data_dir, validation_fraction).evaluate(sets, split)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedbayes.config import parse_sets

    res = evaluate_run(args.run, parse_sets(args.set), args.split, validation_fraction=args.validation_fraction)
    print(json.dumps(res, indent=1))
    return 0


def add_subparsers(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="re-evaluate a finished run's posterior with other prediction settings")
    e.add_argument("run", help="the run folder (config.json, posterior.safetensors)")
    e.add_argument("--split", choices=["validation", "test"],
                   help="the data to evaluate on (default: the run's eval-split); validation needs a run trained "
                        "with validation-fraction > 0, or --validation-fraction")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"one of {', '.join(EVAL_KEYS)} (repeatable)")
    e.add_argument("--validation-fraction", type=float, default=None,
                   metavar="F", help="a validation set of F × the clients' examples for a run trained without one "
                                     "(from unused training examples only)")
    e.set_defaults(fn=cmd_evaluate)
