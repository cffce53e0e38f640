"""The run configuration: one flat set of kebab-case keys, shared by the command line (``--set key=value``),
presets (TOML), ``config.json`` and Flower's run config (``[tool.flwr.app.config]``, ``flwr run -c``).

Keys split in two: the run's own (:class:`RunConfig`: data, model, clients, rounds, local training, …) and
the chosen algorithm's hyperparameters (its ``Config`` model, e.g. ``rho``, ``prior-prec``).  Every key is
validated before any training starts; an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` naming the key and what is allowed.

The local-training keys (``mode``, ``lr``, ``epochs`` …) are not written here: :class:`RunConfig` is generated from
the one schema, :class:`fedbayes.local.LocalSettings`, with its types and bounds; left unset (``None``) they take
the algorithm's defaults (e.g. ``mode = "ivon"`` for bayes-admm), then the schema's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from fedbayes.algorithms import REGISTRY, Algorithm, AlgorithmConfig, get_algorithm
from fedbayes.data.datasets import DATASETS, dataset_names
from fedbayes.data.partition import PARTITIONERS
from fedbayes.data.user import is_import_path
from fedbayes.keys import kebab, kebab_keys
from fedbayes.local import USER_KEYS, LocalSettings
from fedbayes.models import model_names
from fedbayes.names import did_you_mean, unknown

__all__ = [
    "LOCAL_KEYS", "ConfigError", "Experiment", "RunConfig", "RunKeys", "load_config_file", "parse_sets", "resolve",
    "unknown_keys_message",
]


class ConfigError(ValueError):
    """A configuration problem, reported before any training starts."""


PYTHON = "python"
"""The ``model``/``data`` value of a run whose model or data were Python objects (:func:`fedbayes.run`)."""


LOCAL_KEYS = USER_KEYS
"""The run's local-training keys: generated from :class:`fedbayes.local.LocalSettings` (:data:`USER_KEYS`)."""


class RunKeys(BaseModel):
    """The run's own keys (data, model, clients, rounds, evaluation …); :data:`RunConfig` adds the local keys."""

    model_config = ConfigDict(extra="forbid", alias_generator=kebab, populate_by_name=True, frozen=True)

    algorithm: str = "bayes-admm"
    dataset: str = "digits"
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    data: str = ""
    """The clients' data from your own code: ``"package.module:function"`` returning a
    :class:`fedbayes.data.user.FederatedData` (clients, test set, task; :mod:`fedbayes.data.user` says what it may
    hold).  Then ``dataset`` and the partition keys are not used, and ``num-clients`` must equal its client count.
    ``"python"``: data handed to :func:`fedbayes.run` as objects (recorded, not rebuildable from the config).
    ``""``: the built-in ``dataset``."""
    model: str = "mlp"
    """A built-in model (``fedbayes keys``: logreg, mlp, linreg, cnn, resnet20) or your own:
    ``"package.module:factory"`` returning an ``nn.Module`` (:mod:`fedbayes.data.user`); ``"python"``: a model
    object handed to :func:`fedbayes.run`."""
    hidden: tuple[int, ...] = (200, 100)
    activation: Literal["sigmoid", "relu", "tanh", "gelu"] = "sigmoid"
    num_clients: int = Field(10, ge=1, le=100_000)
    partition: str = "dirichlet"
    size_alpha: float = Field(1.0, gt=0.0)
    class_alpha: float = Field(0.5, gt=0.0)
    classes_per_client: int = Field(2, ge=1)
    per_class: int | None = Field(None, ge=1)
    """Examples per class: drawn from each class by ``partition = "paper"`` (required there; 600 for the papers'
    "10p" Fashion-MNIST runs), given to each of a client's classes by ``"shards"`` (unset: the most that fits)."""
    pool_clients: int = Field(0, ge=0)
    """0: off.  K > 0: draw the partition for K clients and give their union to the one client (needs
    ``num-clients = 1``); the pooled-data baseline on exactly the federation's examples."""
    raw_pixels: bool = False
    """Image datasets: feed the raw pixel values (0-255) instead of [0, 1] (as the reference code did for
    Fashion-MNIST)."""
    rounds: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    clients_per_round: float = Field(1.0, gt=0.0)
    """A fraction in (0, 1] of the K clients, or a whole number of clients > 1."""
    eval_every: int = Field(1, ge=1)
    """Evaluate every this many rounds (and the last round)."""
    eval_last: int = Field(0, ge=0)
    """Also evaluate each of the last N rounds, whatever ``eval-every`` says: ``compare`` and the tuner average
    the last 3 evaluated rounds, so ``eval-every = rounds, eval-last = 3`` gives the same table at three
    evaluations (for models whose evaluation is costly, e.g. the posterior average of a CNN)."""
    validation_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """f > 0: set aside a validation set of round(f · n) examples, n = the examples the clients hold: a
    stratified sample (seeded by ``seed``) of the training-file examples no client holds, so the clients' data
    is unchanged; only when too few are unused (``train-fraction = 1`` and a partition that uses everything)
    held out of the training set before partitioning (then f < 0.5).  f may reach 1 when drawn from unused
    examples: a validation set as large as the clients' data costs nothing to training, and 600 examples
    (f = 0.1 on fmnist-10-het) measure accuracy only to ±1.5 points.  The test set is never touched
    (:mod:`fedbayes.data.validation`)."""
    eval_split: Literal["test", "validation"] = "test"
    """What each round is evaluated on; ``"validation"`` (needs ``validation-fraction`` > 0) writes ``val_*``
    metric keys (``val_nll``, ``bma_val_nll``) instead of ``test_*``, so the two can never be mixed up."""
    bma_samples: int = Field(16, ge=0)
    """Posterior-averaged prediction (``bma_*`` metrics) of Bayesian rules: Monte-Carlo draws (0: none)."""
    bma_predictive: Literal["sample", "linearized", "linearized-probit"] = "linearized-probit"
    """How the posterior average is formed (:mod:`fedbayes.predictive`, which gives the validation evidence for the
    default): ``"linearized-probit"`` the linearised (GLM) predictive with the probit approximation,
    ``"linearized"`` the same with Monte Carlo over the Gaussian outputs (``bma-logit-samples`` draws),
    ``"sample"`` averages ``bma-samples`` networks drawn from the posterior."""
    bma_scale: float = Field(1.0, gt=0.0)
    """Multiplies the posterior variance in the posterior average (1: the posterior as it is)."""
    bma_logit_samples: int = Field(1024, ge=1)
    """``linearized``: Monte-Carlo draws of the Gaussian logits (shared by all examples, antithetic; no network
    evaluations: 1024 draws cost ~2 s per 10,000 examples on one CPU thread; 16 draws cost a wide fedlap-cov
    posterior 7 points of accuracy)."""
    reported_prediction: Literal["posterior-average", "mean"] = "posterior-average"
    """Which prediction ``fedbayes compare`` reports in its headline columns for a rule with a posterior (both are
    always recorded): the posterior average (``bma_*``), or the prediction at the posterior mean.  Chosen per rule
    on validation data: bayes-admm's posterior average had the lower NLL and ECE in every check made; fedlap-cov's
    linearised average is badly underconfident when its damped sites have not converged (fmnist-10-het,
    validation: NLL 1.44 against the mean's 0.47), so its presets report the mean."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    client_engine: Literal["auto", "sequential", "batched"] = "auto"
    """How the in-process engine trains a round's clients: one after another (``sequential``), or all at once as
    one model with a leading client axis (``batched``, :mod:`fedbayes.batched`: the same answers to 1e-5 in
    float32).  ``auto``: batched when the device is a GPU and the model and local mode can be batched, else
    sequential (on a CPU, batching buys little: ``fedbayes bench engine``)."""
    batch_clients: int = Field(0, ge=0)
    """``client-engine = batched``: clients trained at once (0: as many as fit in half the free memory on a GPU, in
    48 MiB of buffers on a CPU, :data:`fedbayes.batched.CPU_CHUNK_BYTES`); a value that does not fit in memory is
    refused before training starts."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    store: Literal["memory", "disk"] = "memory"
    """Where the server keeps per-client state (:mod:`fedbayes.algorithms.store`): ``memory``, or ``disk`` (one file
    per client in ``checkpoint/clients/`` of the results folder, with an LRU cache of ``store-cache-mb``): memory
    bounded whatever the number of clients."""
    client_state_dtype: Literal["float64", "float32"] = "float64"
    """Precision of the stored per-client state (sites, duals): ``float32`` halves it (docs/scale.md measures its
    effect on accuracy and on what-if answers); the global state and running sums stay float64."""
    store_cache_mb: float = Field(512.0, ge=0.0)
    """``store = "disk"``: the most megabytes of decoded client state kept in memory (512: the 50 participants of a
    round of bayes-admm on the paper's MLP, 8.5 MB each, stay cached from their configure to the update)."""
    tensorboard: Literal["auto"] | bool = "auto"
    """TensorBoard event files in the results folder's ``tensorboard/`` (:mod:`fedbayes.tensorboard`): ``"auto"``
    when the ``tensorboard`` package is installed (the extra ``fedbayes[tensorboard]``), ``true`` (an error when it
    is missing), ``false`` never."""
    exclude_clients: tuple[int, ...] = ()
    """Clients never asked to train (e.g. after ``fedbayes forget``); ids in [0, num-clients)."""
    # reliability: failure injection (in-process engine) and the round deadline (Flower)
    fail_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Probability that a chosen client fails this round (its reply never arrives); seeded per (round, client)."""
    straggler_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Probability that a chosen client is too slow and misses the round deadline (its reply is discarded)."""
    round_timeout: float = Field(0.0, ge=0.0)
    """Seconds the Flower strategy waits for replies in a round (0: no deadline)."""
    @field_validator("hidden", mode="before")
    @classmethod
    def _hidden(cls, v: Any) -> Any:
        if isinstance(v, str):
            parts = [p for p in v.replace("-", ",").split(",") if p.strip()]
            try:
                return tuple(int(p) for p in parts)
            except ValueError as e:
                raise ValueError(f"hidden must be widths like '200,100', got {v!r}") from e
        if isinstance(v, int):
            return (v,)
        return v

    @field_validator("exclude_clients", mode="before")
    @classmethod
    def _exclude(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return tuple(int(p) for p in v.replace(";", ",").split(",") if p.strip())
            except ValueError as e:
                raise ValueError(f"exclude-clients must be client ids like '1,3', got {v!r}") from e
        if isinstance(v, int):
            return (v,)
        return v

    @field_validator("hidden")
    @classmethod
    def _hidden_pos(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(h <= 0 for h in v):
            raise ValueError(f"hidden widths must be positive, got {list(v)}")
        return v

    @field_validator("algorithm")
    @classmethod
    def _algo(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(unknown("algorithm", v, REGISTRY))
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v not in dataset_names():
            raise ValueError(unknown("dataset", v, dataset_names()))
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in model_names() and v != PYTHON and not is_import_path(v):
            raise ValueError(unknown("model", v, model_names()) + " or an import path 'package.module:factory'")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if v not in ("", PYTHON) and not is_import_path(v):
            raise ValueError(f"data must be an import path 'package.module:function' (or '' for the built-in "
                             f"dataset), got {v!r}")
        return v

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        if v not in PARTITIONERS:
            raise ValueError(unknown("partition", v, PARTITIONERS))
        return v

    @field_validator("clients_per_round")
    @classmethod
    def _cpr(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"clients-per-round must be a fraction in (0, 1] or a whole number, got {v}")
        return v

    @model_validator(mode="after")
    def _data_keys(self) -> RunKeys:
        if self.partition == "paper":
            if self.train_fraction != 1.0:
                raise ValueError(
                    f"partition 'paper' indexes the whole training file: it needs train-fraction = 1 (got "
                    f"{self.train_fraction}); set its size with per-class (600 for the papers' 10p runs)"
                )
            if self.per_class is None:
                raise ValueError("partition 'paper' needs per-class (examples drawn per class, e.g. 600)")
        if self.pool_clients > 0 and self.num_clients != 1:
            raise ValueError(
                f"pool-clients = {self.pool_clients} pools the partition into one client: it needs num-clients = 1 "
                f"(got {self.num_clients})"
            )
        if self.raw_pixels and DATASETS[self.dataset].pixel_max is None:
            with_pixels = [n for n, s in DATASETS.items() if s.pixel_max is not None]
            raise ValueError(
                f"raw-pixels = true needs an image dataset ({', '.join(with_pixels)}); '{self.dataset}' has no pixels"
            )
        return self

    @model_validator(mode="after")
    def _eval_split(self) -> RunKeys:
        if self.eval_split == "validation" and self.validation_fraction <= 0:
            raise ValueError("eval-split = 'validation' needs validation-fraction > 0 (e.g. 0.1)")
        return self

    @model_validator(mode="after")
    def _exclude_range(self) -> RunKeys:
        bad = [c for c in self.exclude_clients if not 0 <= c < self.num_clients]
        if bad:
            raise ValueError(f"exclude-clients {bad} out of range [0, {self.num_clients})")
        if len(set(self.exclude_clients)) >= self.num_clients:
            raise ValueError("exclude-clients leaves no client to train")
        return self

    def participants_per_round(self) -> int:
        c = self.clients_per_round
        available = self.num_clients - len(set(self.exclude_clients))
        n = math.ceil(c * available) if c <= 1 else int(c)
        return max(1, min(available, n))


def _optional(name: str) -> tuple[Any, Any]:
    """A local setting as an optional run key: the schema's type and bounds, default None (the rule's choice)."""
    f = LocalSettings.model_fields[name]
    inner: Any = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
    return inner | None, Field(None, description=f.description)


if TYPE_CHECKING:
    RunConfig = RunKeys
else:
    RunConfig = create_model(
        "RunConfig", __base__=RunKeys, __module__=__name__, **{name: _optional(name) for name in USER_KEYS}
    )
    RunConfig.__doc__ = (
        "Everything about a run except the algorithm's own hyperparameters: RunKeys and, generated from "
        "fedbayes.local.LocalSettings, one optional key per user-set local setting (None: the rule's default, "
        "then the schema's)."
    )


@dataclass(frozen=True)
class Experiment:
    """A fully validated configuration: the run's keys and the algorithm's hyperparameters."""

    run: RunConfig
    algo: AlgorithmConfig

    @property
    def algorithm_cls(self) -> type[Algorithm]:
        return get_algorithm(self.run.algorithm)

    def local_overrides(self) -> dict[str, Any]:
        """Local keys the user set explicitly (they win over the algorithm's local defaults)."""
        return {k: getattr(self.run, k) for k in LOCAL_KEYS if getattr(self.run, k) is not None}

    def local_setting(self, name: str) -> Any:
        """A local setting as clients get it: the user's value, else the rule's default, else the schema's."""
        if getattr(self.run, name, None) is not None:
            return getattr(self.run, name)
        defaults = self.algorithm_cls.local_defaults
        return defaults[name] if name in defaults else LocalSettings.model_fields[name].default

    def to_flat(self) -> dict[str, Any]:
        """All keys, kebab-case, JSON-ready (``config.json``); :func:`resolve` of it gives the same run."""
        out = self.run.model_dump(by_alias=True, mode="json")
        out.update(self.algo.model_dump(by_alias=True, mode="json"))
        return out


def _format(err: ValidationError, what: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or what
        got = e.get("input")
        lines.append(f"{loc}: {e['msg']} (got {got!r})")
    return f"invalid {what}: " + "; ".join(lines)


def resolve(flat: Mapping[str, Any]) -> Experiment:
    """Validate a flat kebab-case (or snake_case) mapping into an :class:`Experiment`.

    A run folder's ``config.json`` resolves as it is: its reserved ``provenance`` entry (what made the run,
    :mod:`fedbayes.provenance`) is not a configuration key and is ignored.

    Raises
    ------
    ConfigError
        Unknown key (listing the valid ones), wrong type or out-of-range value (naming the key).
    """
    norm = kebab_keys({k: v for k, v in flat.items() if k != "provenance"})
    run_keys = {kebab(n) for n in RunConfig.model_fields}
    run_part = {k: v for k, v in norm.items() if k in run_keys}
    try:
        run = RunConfig.model_validate(run_part)
    except ValidationError as e:
        raise ConfigError(_format(e, "run config")) from None
    algo_cls = get_algorithm(run.algorithm)
    algo_keys = {kebab(n) for n in algo_cls.Config.model_fields}
    bad = sorted(k for k in norm if k not in run_keys and k not in algo_keys)
    if bad:
        raise ConfigError(unknown_keys_message(bad, run.algorithm, run_keys, algo_keys))
    try:
        algo = algo_cls.Config.model_validate({k: v for k, v in norm.items() if k in algo_keys})
    except ValidationError as e:
        raise ConfigError(_format(e, f"{run.algorithm} config")) from None
    try:  # checks that need the federation's size K or |S| (e.g. fedlap-cov's rho <= 2/|S|)
        algo_cls.check_config(algo, run.num_clients - len(set(run.exclude_clients)), run.participants_per_round())
    except ValueError as e:
        raise ConfigError(f"invalid {run.algorithm} config: {e}") from None
    return Experiment(run=run, algo=algo)


def unknown_keys_message(bad: list[str], algorithm: str, run_keys: set[str], algo_keys: set[str]) -> str:
    """The error for config keys that are neither run keys nor ``algorithm``'s: per key, the closest valid keys
    (:func:`fedbayes.names.did_you_mean`) or the other algorithms that have it, and where the full list is
    (``fedbayes keys --algorithm A``) instead of all ~55 keys on one line."""
    parts = []
    for key in bad:
        owners = [n for n, cls in REGISTRY.items() if key in {kebab(f) for f in cls.Config.model_fields}]
        close = did_you_mean(key, sorted(run_keys | algo_keys))
        if owners:
            hint = f"a key of {', '.join(owners)}, not of {algorithm}"
        elif close:
            hint = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
        else:
            hint = "no key is close"
        parts.append(f"'{key}' ({hint})")
    return (f"unknown config key{'s' if len(bad) > 1 else ''} for algorithm '{algorithm}': {'; '.join(parts)}. "
            f"All valid keys: `fedbayes keys --algorithm {algorithm}`")


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["lr=0.1", "rho=0.2"]`` -> ``{"lr": "0.1", "rho": "0.2"}`` (types are checked by :func:`resolve`)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat ``config.json`` written by a run, without its reserved ``provenance`` entry (what made the run,
    :mod:`fedbayes.provenance`: not a configuration key)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    return {k: v for k, v in data.items() if k != "provenance"}


