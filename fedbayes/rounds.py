"""One round of a federation, the same for every engine (in-process, Flower's strategy, what-if retraining).

The policy of round r lives here and only here:

1. **who**: the participants S (:func:`participants`, seeded by (seed, r); excluded clients never), and which of
   them the run's ``fail-rate``/``straggler-rate`` drops (:func:`injected_failure`, seeded by (seed, r, k));
2. **what each is sent**: ``rule.configure(k, r)`` encoded as on the wire (:func:`fedbayes.protocol.encode_task`)
   with the client's ConfigRecord (:func:`client_config`: local settings, the round's learning rate, the client's
   seed :func:`client_seed`);
3. **what came back**: every reply is validated once (:func:`fedbayes.protocol.decode_reply`, against the prior
   it answers for rules with signed sites); a client that trained but failed (diverged, an invalid reply, a
   ClientApp error) is recorded with its reason, an absent one without;
4. **the update**: ``rule.aggregate(r, replies in the order of S)``, unless every client that trained failed
   (:func:`check_round` stops the run);
5. **the row**: one evaluation of the global (:func:`evaluate_global`), the metrics row with the keys every
   engine writes, and its recording (metrics, posterior, checkpoint: :func:`record_round`).

An engine only moves messages: it asks :meth:`Round.job` for each client's message, delivers it however it
delivers, and hands back what arrived (:meth:`Round.receive`, :meth:`Round.fail`).  Because the choices are
functions of (seed, round, client) and the messages go through the same codec, two engines give the same
numbers, and a resumed run continues an interrupted one exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from torch import Tensor, nn

from fedbayes.algorithms import Algorithm, cosine_lr
from fedbayes.algorithms.base import ClientTask, ClientUpdate
from fedbayes.config import Experiment
from fedbayes.gaussian import DiagGaussian
from fedbayes.local import LocalSettings
from fedbayes.metrics import evaluate_model
from fedbayes.protocol import InvalidReply, Records, decode_reply, encode_task, nbytes

if TYPE_CHECKING:
    from fedbayes.federation import Federation
    from fedbayes.results import ResultsWriter

__all__ = [
    "ClientJob",
    "Round",
    "RoundHost",
    "check_round",
    "client_config",
    "client_seed",
    "evaluate_global",
    "evaluate_posterior_on",
    "injected_failure",
    "participants",
    "record_round",
    "round_diagnostics",
]

log = logging.getLogger("fedbayes")


def client_seed(seed: int, server_round: int, client: int) -> int:
    """Independent, reproducible seed for client k's local training in round r."""
    return int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])


def participants(exp: Experiment, server_round: int) -> list[int]:
    """The clients asked to train in ``server_round`` (sorted; seeded by (seed, round)); excluded ones never."""
    excluded = set(exp.run.exclude_clients)
    pool = [c for c in range(exp.run.num_clients) if c not in excluded]
    m = exp.run.participants_per_round()
    if m >= len(pool):
        return pool
    rng = np.random.default_rng([exp.run.seed, server_round, 0x5EED])
    return sorted(int(pool[i]) for i in rng.choice(len(pool), size=m, replace=False))


def injected_failure(exp: Experiment, server_round: int, client: int) -> str | None:
    """``"failed"``, ``"straggler"`` or None for this (round, client), drawn from ``fail-rate`` and
    ``straggler-rate`` with a generator seeded by (seed, round, client) — the same draws on resume."""
    if exp.run.fail_rate == 0.0 and exp.run.straggler_rate == 0.0:
        return None
    u = np.random.default_rng([exp.run.seed, server_round, client, 0xFA11]).random()
    if u < exp.run.fail_rate:
        return "failed"
    if u < exp.run.fail_rate + exp.run.straggler_rate:
        return "straggler"
    return None


def check_round(server_round: int, updates: list[ClientUpdate], reasons: Mapping[int, str]) -> None:
    """Stop the run (``RuntimeError``) when no reply arrived and every chosen client that trained failed with an
    error (diverged or sent an invalid reply): the configuration is broken, carrying on would only repeat it.
    A round whose clients were merely absent (``fail-rate``, stragglers, timeouts) is a no-op, not an error."""
    if updates or not reasons:  # a client that trained either replied (an update) or failed (a reason)
        return
    detail = "; ".join(f"client {c}: {why}" for c, why in sorted(reasons.items()))
    raise RuntimeError(f"round {server_round}: every client that trained failed, stopping ({detail})")


def round_diagnostics(rule: Algorithm, updates: list[ClientUpdate], reasons: Mapping[int, str]) -> dict[str, Any]:
    """The metrics-row fields shared by every engine: why clients failed (``failed_reasons``, client id → text)
    and how many coordinates each safeguard touched this round (``guard_*``: the rule's own, e.g.
    ``guard_safe_prior``, plus ``guard_site_clamp``, the site precisions clamped at 0 by IVON clients)."""
    out: dict[str, Any] = {"failed_reasons": {str(c): why for c, why in sorted(reasons.items())}}
    for name, n in sorted(rule.pop_guard_counts().items()):
        out["guard_" + name.replace("-", "_")] = n
    clamped = [u.metrics["site-clamped"] for u in updates if "site-clamped" in u.metrics]
    if clamped:
        out["guard_site_clamp"] = int(sum(clamped))
    return out


def client_config(exp: Experiment, rule: Algorithm, task: ClientTask, server_round: int, client: int) -> dict[str, Any]:
    """The ConfigRecord for client k: LocalSettings defaults ← the rule's local defaults ← the user's local keys
    ← the task's overrides, with the round's learning rate and seed."""
    kw: dict[str, Any] = dict(type(rule).local_defaults)
    kw.update(exp.local_overrides())
    kw.update(task.overrides)
    if rule.needs_site() and kw.get("mode", "ivon") != "ivon":
        kw["laplace"] = True  # a point-mode client of a Bayesian rule sends a Laplace site
    if exp.run.lr_schedule == "cosine":
        base_lr = kw.get("lr", LocalSettings.model_fields["lr"].default)
        kw["lr"] = cosine_lr(float(base_lr), server_round, exp.run.rounds)
    kw["seed"] = client_seed(exp.run.seed, server_round, client)
    cfg = LocalSettings(**kw).to_wire()
    cfg.update({"reply": "site" if rule.needs_site() else "mean", "round": server_round, "partition-id": client})
    return cfg


def evaluate_posterior_on(
    model: nn.Module, mean: dict[str, Tensor], posterior: DiagGaussian | None, x: Tensor, y: Tensor, task: str,
    exp: Experiment, server_round: int, device: str = "cpu", prefix: str = "test_",
) -> dict[str, float]:
    """The one evaluation: metrics on (x, y) of the prediction at ``mean`` (``{prefix}*``) and, given a
    ``posterior`` and ``bma-samples`` > 0, of the posterior average (``bma_{prefix}*``, formed as
    ``bma-predictive`` and ``bma-scale`` say: :mod:`fedbayes.predictive`), with the round's seed
    (seed·7919 + round), so any two posteriors evaluated for the same round see the same noise."""
    return evaluate_model(
        model, mean, x, y, task, posterior=posterior,
        samples=exp.run.bma_samples if posterior is not None else 0,
        noise_var=exp.local_setting("noise_var"), seed=exp.run.seed * 7919 + server_round, device=device, prefix=prefix,
        predictive=exp.run.bma_predictive, scale=exp.run.bma_scale, logit_samples=exp.run.bma_logit_samples,
    )


def evaluate_global(
    rule: Algorithm, model: nn.Module, x: Tensor, y: Tensor, task: str, exp: Experiment, server_round: int,
    device: str = "cpu", prefix: str = "test_",
) -> dict[str, float]:
    """:func:`evaluate_posterior_on` for the rule's global (its mean, and its posterior floored at ``min-prec``);
    ``prefix`` is ``"test_"`` or ``"val_"`` (:meth:`Federation.eval_data`)."""
    posterior = rule.global_posterior()
    if posterior is not None:
        posterior = rule.floor(posterior)
    return evaluate_posterior_on(model, rule.global_mean(), posterior, x, y, task, exp, server_round, device, prefix)


@dataclass(frozen=True)
class ClientJob:
    """What client k is sent in round r: the task (for engines that call the trainer directly), the encoded
    records that travel, and its ConfigRecord."""

    client: int
    task: ClientTask
    records: Records
    config: dict[str, Any]


class RoundHost(Protocol):
    """What a round needs of its federation: the experiment, the rule, the parameter shapes and each client's
    expected example count (None: not known, e.g. a user's Flower app; the reply's count is then not checked).
    A :class:`~fedbayes.federation.Federation` is one (and the only one whose rounds can evaluate themselves:
    :meth:`Round.row` with ``evaluate=True``); :class:`fedbayes.flower.FedBayes` is another."""

    @property
    def exp(self) -> Experiment: ...

    @property
    def rule(self) -> Algorithm: ...

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def client_examples(self, client: int) -> int | None: ...


class Round:
    """Round ``server_round`` of federation ``fed``: participants, messages, replies, update and metrics row.

    Parameters
    ----------
    fed
        The built federation (data, partition sizes, model, rule), or any :class:`RoundHost`.
    server_round
        The absolute round (1-based; a resumed run continues the numbering).
    """

    def __init__(self, fed: RoundHost, server_round: int) -> None:
        self.fed = fed
        self.exp = fed.exp
        self.server_round = server_round
        self.chosen: list[int] = participants(self.exp, server_round)
        self.replies: dict[int, ClientUpdate] = {}
        self.reasons: dict[int, str] = {}
        self.updates: list[ClientUpdate] = []
        self.diagnostics: dict[str, Any] = {}
        self.up = 0
        self.down = 0
        self._prior_prec: dict[int, Mapping[str, np.ndarray]] = {}

    def job(self, client: int, *, reachable: bool = True) -> ClientJob | None:
        """Configure client k and encode its message (counted in ``bytes_down`` whether or not it travels);
        None when it does not train: unreachable (no node, a test's failure hook) or drawn by ``fail-rate`` /
        ``straggler-rate``.  Such a client is absent: it stays stale, with no reason recorded."""
        rule, r = self.fed.rule, self.server_round
        task = rule.configure(client, r)
        cfg = client_config(self.exp, rule, task, r, client)
        records = encode_task(task)
        self.down += nbytes(records)
        if not reachable or injected_failure(self.exp, r, client) is not None:
            return None
        if rule.signed_sites:  # the reply is checked against the prior it answers (prior + site > 0): the
            self._prior_prec[client] = records["prior.prec"]  # precision as sent (wire dtype), kept until the reply
        return ClientJob(client, task, records, cfg)

    def receive(self, client: int, records: Mapping[str, Mapping[str, np.ndarray]], metrics: Mapping[str, Any], *,
                expected_examples: int | None = None, counted: bool = True) -> ClientUpdate | None:
        """Validate client k's reply; a valid one is kept for the update, an invalid one makes k a failed client
        (``invalid reply: …``).  ``counted``: add the reply to ``bytes_up``."""
        if counted:
            self.up += nbytes(records)
        rule = self.fed.rule
        n = expected_examples if expected_examples is not None else self.fed.client_examples(client)
        try:
            u = decode_reply(records, metrics, client=client, shapes=self.fed.shapes, need_site=rule.needs_site(),
                             expected_examples=n, prior_prec=self._prior_prec.pop(client, None))
        except InvalidReply as e:
            self.fail(client, f"invalid reply: {e}")
            return None
        self.replies[client] = u
        return u

    def fail(self, client: int, reason: str) -> None:
        """Client k trained and failed (diverged, a ClientApp error, an invalid reply): recorded with ``reason``."""
        log.warning("round %d: dropped reply of client %d: %s", self.server_round, client, reason)
        self.reasons[client] = reason

    @property
    def failed(self) -> list[int]:
        """The chosen clients without a valid reply (absent or failed), in the order of S."""
        return [c for c in self.chosen if c not in self.replies]

    def aggregate(self) -> list[ClientUpdate]:
        """``rule.aggregate`` over the valid replies in the order of S (after :func:`check_round`)."""
        self.updates = [self.replies[c] for c in self.chosen if c in self.replies]
        check_round(self.server_round, self.updates, self.reasons)
        self.fed.rule.aggregate(self.server_round, self.updates)
        self.diagnostics = round_diagnostics(self.fed.rule, self.updates, self.reasons)
        return self.updates

    def row(self, elapsed: Callable[[], float], *, evaluate: bool = True) -> dict[str, Any]:
        """The metrics row: the evaluation (every ``eval-every`` rounds, each of the last ``eval-last`` and the last;
        none with ``evaluate=False``),
        then the round's facts; ``elapsed()`` gives the run's wall time so far (read after the evaluation)."""
        exp, r = self.exp, self.server_round
        row: dict[str, Any] = {"round": r}
        if evaluate and (r % exp.run.eval_every == 0 or r > exp.run.rounds - max(exp.run.eval_last, 1)):
            fed = cast("Federation", self.fed)  # evaluating needs the federation's data
            x_ev, y_ev, prefix = fed.eval_data()  # the test set, or the validation set (eval-split): val_* keys
            row.update(evaluate_global(fed.rule, fed.model, x_ev, y_ev, fed.data.task, exp, r, fed.device, prefix))
        losses = [u.metrics.get("train-loss", float("nan")) for u in self.updates]
        row.update({
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "bytes_up": self.up, "bytes_down": self.down,
            "participants": [u.client for u in self.updates], "failed": self.failed,
            "train_s": float(sum(u.metrics.get("train-seconds", 0.0) for u in self.updates)),
            "wall_s": elapsed(),
        })
        row.update(self.diagnostics)
        return row


def record_round(writer: ResultsWriter | None, rule: Algorithm, row: dict[str, Any], rows: list[dict[str, Any]],
                 *, checkpoint: bool = True) -> None:
    """Append ``row`` to ``rows`` and, with a results folder, to ``metrics.jsonl``; rewrite the posterior and
    (``checkpoint``) the checkpoint of this round."""
    rows.append(row)
    if writer is None:
        return
    writer.append_metrics(row)
    post = rule.global_posterior()
    writer.write_posterior(rule.global_mean(), rule.floor(post) if post is not None else None)
    if checkpoint:
        writer.write_checkpoint(int(row["round"]), rule, rows)
