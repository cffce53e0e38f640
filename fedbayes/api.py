"""The Python API: a rule, a model, the clients' data → a federation run in process (:func:`run`).

``fedbayes.run(rule, model, clients, test=..., rounds=..., local=LocalSettings(...), out="runs/x")`` builds a
:class:`fedbayes.federation.Federation` from the objects (:meth:`Federation.from_data`) and runs it with the one
round loop of the in-process engine (:func:`fedbayes.engine.run_experiment`): the same messages, seeds, metrics
rows, results folder (``config.json``, ``metrics.jsonl``, ``posterior.safetensors``, ``checkpoint/``) and resume as
``fedbayes run``.  No second engine.

Decisions:

* **Rules are small spec objects** (:class:`Rule` and one subclass per algorithm, e.g. :class:`BayesADMM`) holding
  the algorithm's hyperparameters under the paper's names (``rho``, ``prior_prec`` …; snake or kebab case), checked
  at construction against the algorithm's ``Config`` model.  They are not the server-rule classes of
  :mod:`fedbayes.algorithms` (which need the model and the client count): those are built at run time.
* **Local settings** are :class:`fedbayes.local.LocalSettings`; only the fields a caller *set* are passed on, so
  a rule's own local defaults (bayes-admm's ``mode = "ivon"``, the per-mode β2) still apply to the rest.  The
  fields the rule or the run choose (``seed``, ``device``, ``ess-scale`` …) are refused there.
* **What identifies the model and the data** is recorded in ``config.json``'s provenance (``model``: class and
  parameter names/shapes; ``data``: task, classes, client sizes and SHA-256 digests of tensor clients, a Dataset's
  class and length).  ``model``/``data`` in the config are ``"python"`` (objects, not rebuildable from the config
  alone).  ``resume=True`` refuses a model or data that differ, naming the difference, before anything is written.
* At the end the model object holds the global mean (the result's :attr:`Result.mean`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from fedbayes.algorithms import get_algorithm
from fedbayes.config import PYTHON, ConfigError, Experiment, resolve
from fedbayes.data.user import ClientData, FederatedData, data_fingerprint, load_user_data, model_signature
from fedbayes.gaussian import DiagGaussian
from fedbayes.keys import kebab, kebab_keys
from fedbayes.local import ADAM_BETA2, IVON_BETA2, RULE_KEYS, LocalSettings
from fedbayes.names import did_you_mean

__all__ = [
    "PVI", "BayesADMM", "FedADMM", "FedAvg", "FedDyn", "FedLap", "FedLapCov", "FedProx", "Result", "Rule", "run",
]


class Rule:
    """A server rule and its hyperparameters, e.g. ``BayesADMM(rho=0.2, prior_prec=1.0)``.

    Keyword arguments are the algorithm's config keys (``fedbayes keys --algorithm NAME``; snake_case or kebab-case),
    validated now; unset ones keep the algorithm's defaults.  ``Rule.of("fedlap-cov", rho=0.1)`` names the algorithm.

    Raises
    ------
    ConfigError
        An unknown key (with the closest valid ones) or a bad value.
    """

    algorithm: ClassVar[str] = ""

    def __init__(self, **hyperparameters: Any) -> None:
        cls = get_algorithm(self.algorithm)
        kw = kebab_keys(hyperparameters)
        valid = sorted(kebab(n) for n in cls.Config.model_fields)
        for key in kw:
            if key not in valid:
                close = did_you_mean(key, valid)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(f"{type(self).__name__}: unknown hyperparameter '{key}'{hint} valid: {valid}")
        try:
            cls.Config.model_validate(kw)
        except ValueError as e:
            raise ConfigError(f"{type(self).__name__}: {e}") from None
        self.hyperparameters: dict[str, Any] = dict(kw)

    @staticmethod
    def of(algorithm: str, **hyperparameters: Any) -> Rule:
        """The rule of a registered algorithm by name (``fedbayes.algorithms.REGISTRY``)."""
        get_algorithm(algorithm)  # ValueError listing the names
        sub = next((c for c in _RULES if c.algorithm == algorithm), None)
        if sub is not None:
            return sub(**hyperparameters)
        named = type(algorithm, (Rule,), {"algorithm": algorithm})
        return named(**hyperparameters)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        args = ", ".join(f"{k.replace('-', '_')}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({args})"


class FedAvg(Rule):
    """FedAvg (McMahan et al. 2017): weighted average of the local means; no hyperparameters of its own."""

    algorithm = "fedavg"


class FedProx(Rule):
    """FedProx (Li et al. 2020): proximal term μ/2‖θ − m_g‖² (``mu``)."""

    algorithm = "fedprox"


class FedADMM(Rule):
    """FedADMM (Zhou & Li 2023): ADMM duals with penalty ρ (``rho``)."""

    algorithm = "fedadmm"


class FedDyn(Rule):
    """FedDyn (Acar et al. 2021): dynamic regulariser α (``alpha``), ``weight_decay``."""

    algorithm = "feddyn"


class FedLap(Rule):
    """FedLap (Swaroop et al. 2025): Laplace-ADMM with prior precision δ (``prior_prec``) and ``rho`` (or
    ``rho_k`` = |S|ρ, |S| the participants per round)."""

    algorithm = "fedlap"


class FedLapCov(Rule):
    """FedLap-Cov: damped diagonal-GGN Laplace sites (damping ``rho`` ≤ 2/|S|, or ``rho_k`` = |S|ρ,
    |S| the participants per round)."""

    algorithm = "fedlap-cov"


class PVI(Rule):
    """Partitioned variational inference with IVON sites (damping ``rho``)."""

    algorithm = "pvi"


class BayesADMM(Rule):
    """IVON-ADMM / Bayes-ADMM (Möllenhoff et al. 2025): duals in natural parameters; ``rho`` (or ``rho_k``),
    ``prior_prec`` (δ), ``damping`` (γ), ``server_step`` (α), ``server_mean`` (``"participants"``, the default, or
    ``"heard"``: which posteriors the server averages under partial participation)."""

    algorithm = "bayes-admm"


_RULES: tuple[type[Rule], ...] = (FedAvg, FedProx, FedADMM, FedDyn, FedLap, FedLapCov, PVI, BayesADMM)


@dataclass
class Result:
    """What :func:`run` returns.

    Attributes
    ----------
    metrics
        One row per round (``metrics.jsonl``'s rows: ``test_accuracy``, ``test_nll``, ``bma_test_accuracy`` …).
    mean
        The global mean by parameter name (float64).
    posterior
        The global diagonal Gaussian by parameter name (Bayesian rules; precisions floored at ``min-prec``), else
        None.
    folder
        The results folder (None: nothing was written).
    config
        The resolved flat configuration (``config.json`` without its provenance).
    """

    metrics: list[dict[str, Any]]
    mean: dict[str, Tensor]
    posterior: DiagGaussian | None
    folder: Path | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last round's row."""
        return self.metrics[-1]


def _local_keys(local: LocalSettings | None) -> dict[str, Any]:
    """The run keys of the fields the caller set (β2 only where it differs from its mode's default)."""
    if local is None:
        return {}
    given = set(local.model_fields_set)
    chosen = sorted(given & RULE_KEYS)
    if chosen:
        raise ConfigError(f"LocalSettings({', '.join(f'{k}=...' for k in chosen)}): chosen by the rule or the run, "
                          "not by the caller (seed: fedbayes.run(seed=...); device: fedbayes.run(device=...))")
    out = {kebab(k): getattr(local, k) for k in given if k != "beta2"}
    if local.beta2 != (ADAM_BETA2 if local.mode == "adam" else IVON_BETA2):
        out["beta2"] = local.beta2
    return out


def _model_differences(want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
    wp, hp = dict(want.get("parameters", {})), dict(have.get("parameters", {}))
    out = [f"parameter '{k}' has shape {tuple(wp[k])} now, {tuple(hp[k])} in the run"
           for k in wp if k in hp and list(wp[k]) != list(hp[k])]
    new, gone = [k for k in wp if k not in hp], [k for k in hp if k not in wp]
    if new:
        out.append(f"parameters {new[:5]} are new")
    if gone:
        out.append(f"parameters {gone[:5]} of the run are missing")
    if not out and list(wp) != list(hp):
        out.append("the parameters come in another order")
    if want.get("class") != have.get("class"):
        out.append(f"the class is {want.get('class')}, the run's was {have.get('class')}")
    return out


def _data_differences(want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
    out = [f"{k} is {want.get(k)!r} now, {have.get(k)!r} in the run" for k in ("task", "num-classes")
           if want.get(k) != have.get(k)]
    ws, hs = list(want.get("sizes", [])), list(have.get("sizes", []))
    if len(ws) != len(hs):
        out.append(f"{len(ws)} clients now, {len(hs)} in the run")
    else:
        out += [f"client {k} has {a} examples now, {b} in the run" for k, (a, b) in enumerate(zip(ws, hs, strict=True))
                if a != b][:5]
        if not out:
            out += [f"client {k}'s data differ" for k, (a, b) in
                    enumerate(zip(want.get("clients", []), have.get("clients", []), strict=False)) if a != b][:5]
    for k in ("test", "validation"):
        if want.get(k) != have.get(k):
            out.append(f"the {k} set differs")
    return out


def _check_same(folder: Path, model_id: Mapping[str, Any], data_id: Mapping[str, Any]) -> None:
    """Refuse to resume ``folder`` with another model or data (naming the differences); nothing is written."""
    try:
        made = json.loads((folder / "config.json").read_text()).get("provenance", {})
    except (OSError, ValueError, AttributeError):
        return  # no readable config.json: load_resume reports the folder's state
    problems = []
    if isinstance(made, dict) and isinstance(made.get("model"), dict):
        problems += [f"model: {d}" for d in _model_differences(model_id, made["model"])]
    if isinstance(made, dict) and isinstance(made.get("data"), dict):
        problems += [f"data: {d}" for d in _data_differences(data_id, made["data"])]
    if problems:
        raise ConfigError(f"resuming {folder}: the model or data differ from the run's: {'; '.join(problems)}. Build "
                          "the same model and data as the run did, or start a new run (another out, or "
                          "overwrite=True). Nothing was written")


def run(
    rule: Rule,
    model: nn.Module,
    clients: Sequence[ClientData],
    *,
    test: ClientData,
    validation: ClientData | None = None,
    rounds: int = 10,
    local: LocalSettings | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    task: Literal["classification", "regression"] = "classification",
    num_classes: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    **run_keys: Any,
) -> Result:
    """Run a federation of ``model`` over ``clients`` in process; return its metrics and posterior.

    Parameters
    ----------
    rule
        The server rule, e.g. ``fedbayes.BayesADMM(rho=0.2)`` or ``fedbayes.FedAvg()``.
    model
        Any ``nn.Module`` whose learnable state is its parameters (no BatchNorm running statistics: use
        GroupNorm).  Its current weights are the initial global model of rules that start from one; at the end it
        holds the global mean.
    clients
        One entry per client: ``(x, y)`` tensors (x of shape (N, …), y of shape (N,)) or a map-style torch
        ``Dataset`` of (x, y) pairs (:mod:`fedbayes.data.user`).
    test, validation
        The test set (evaluated every ``eval_every`` rounds) and an optional validation set (``eval_split =
        "validation"``), as tensors or a Dataset.
    rounds, seed
        Rounds, and the seed of every random choice (participants, batch order, IVON's noise).
    local
        Local training (``LocalSettings(lr=..., epochs=..., batch_size=...)``); unset fields: the rule's defaults.
    out
        The results folder (None: keep nothing on disk).  A folder that holds a run is refused unless
        ``overwrite`` or ``resume``.
    task, num_classes
        ``"classification"`` (labels 0..C−1; C default: 1 + the largest tensor label) or ``"regression"``
        (Gaussian likelihood, ``noise_var`` σ²; sets ``loss = "gaussian"``).
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    resume
        Continue ``out`` from its checkpoint (``rounds`` may extend it).  The model and data must be the run's
        (their parameter names/shapes and data fingerprint, recorded in ``config.json``): else a ``ConfigError``
        naming what differs; so must the rule and the other settings.
    run_keys
        Any other run key in snake_case (``clients_per_round=0.5``, ``eval_every=5``, ``bma_samples=0``,
        ``client_engine="sequential"``, ``store="disk"`` …; ``fedbayes keys``).

    Returns
    -------
    Result
        ``.metrics`` (rows), ``.mean``, ``.posterior``, ``.folder``, ``.config``.

    Raises
    ------
    ConfigError
        A bad setting, or a resume whose model, data or settings differ from the run's.
    fedbayes.data.user.UserDataError
        Data of the wrong form, or a model that does not take it (one forward pass before training, naming shapes).
    """
    from fedbayes.engine import run_experiment
    from fedbayes.federation import Federation
    from fedbayes.provenance import provenance
    from fedbayes.resume import load_resume

    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a fedbayes rule such as fedbayes.BayesADMM(...), got {type(rule).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data = load_user_data(FederatedData(list(clients), test, validation, task, num_classes), "fedbayes.run")
    flat: dict[str, Any] = {
        **kebab_keys(run_keys), "algorithm": rule.algorithm, **rule.hyperparameters, "rounds": rounds, "seed": seed,
        "num-clients": len(data.clients), "model": PYTHON, "data": PYTHON, "device": device, **_local_keys(local),
    }
    if task == "regression":
        flat.setdefault("loss", "gaussian")
    exp = resolve(flat)
    model_id, data_id = model_signature(model), data_fingerprint(data)
    folder = Path(out) if out is not None else None
    if resume:
        if folder is None:
            raise ValueError("resume=True needs out, the run's folder")
        _check_same(folder.resolve(), model_id, data_id)
        load_resume(folder, exp, advice="Pass the run's rule and settings; only rounds may grow")
    built: list[Federation] = []

    def build(e: Experiment, o: Path | None) -> Federation:
        built.append(Federation.from_data(e, model, data, o))
        return built[-1]

    rows = run_experiment(exp, folder, resume=resume, overwrite=overwrite, progress=progress, build=build,
                          provenance={**provenance(), "model": model_id, "data": data_id})
    rule_obj = built[-1].rule
    mean = {k: v.detach().clone() for k, v in rule_obj.global_mean().items()}
    post = rule_obj.global_posterior()
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(mean[k].to(device=p.device, dtype=p.dtype))
    return Result(rows, mean, rule_obj.floor(post) if post is not None else None, folder,
                  built[-1].exp.to_flat())
