"""One Flower strategy for every fedbayes algorithm: it delegates all algorithm work to the server rule.

The round is :class:`fedbayes.rounds.Round`, the policy the in-process engine runs too; this class only moves
its messages through Flower:

1. ``configure_train``: for every participant k of the round, ``Round.job(k)`` (the rule's prior for k, encoded,
   and k's ConfigRecord) becomes one Message (ArrayRecords ``prior.eta``, ``prior.prec``, optional
   ``start.mean``/``start.prec``, keyed by parameter name, and the ``config`` ConfigRecord) to the node of
   partition k.  A partition without a node is absent, like a client that ``fail-rate`` draws.
2. ``aggregate_train``: the replies that arrived within ``round-timeout`` seconds (0: no deadline) go to
   ``Round.receive`` (validated before they touch state; a ClientApp error or an invalid reply makes a failed
   client, with its reason), then ``Round.aggregate`` (``rule.aggregate(r, updates)`` in the order of S).
3. ``evaluate`` (the ``evaluate_fn`` of :meth:`Strategy.start`): ``Round.row`` (one evaluation, the metrics row
   with the engine's keys) and :func:`fedbayes.rounds.record_round` (metrics, posterior, checkpoint).

Client identity is the node config's ``partition-id``, learnt by the strategy's node book
(:class:`server.nodes.NodeBook`).

**Replies that never come.** With ``round-timeout`` set, ``Strategy.start`` passes it to
``grid.send_and_receive``, so a round ends when the deadline passes whatever is missing: a SuperNode that died
(it stays "online" on the SuperLink for up to two heartbeat intervals, ~60 s, and gets messages that nobody
answers), a hung ClientApp, a slow machine.  Missing clients are recorded in ``failed`` and keep their stale
site/dual, exactly like a failure in the engine; the run goes on.  Once the SuperLink reports the node offline
its messages come back as errors at once, and once it leaves ``grid.get_node_ids()`` its partition counts as
failed without a message.  (Without a deadline a round waits for every reply.)

**Resume.** Flower's ``Strategy.start`` always counts rounds from 1.  A resumed run
(:mod:`fedbayes.resume`) passes ``start_round`` = the checkpoint's round + 1, and every method maps Flower's round
``i`` to the absolute round ``start_round + i - 1`` before it does anything, so seeds, participants, injected
failures and the learning-rate schedule are those of the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client.records import EXPERIMENT_KEY, METRIC_RECORD, arrays_of, content_of, records_of
from fedbayes.federation import Federation
from fedbayes.protocol import InvalidReply, nbytes
from fedbayes.results import ResultsWriter
from fedbayes.rounds import Round, record_round
from server.nodes import NodeBook, addressee

__all__ = ["FedBayesStrategy"]

log = logging.getLogger("flwr")


@dataclass
class _Flight:
    """The Flower side of one round: which node got which client's message (the policy is :class:`Round`)."""

    round: Round
    sent: dict[int, int] = field(default_factory=dict)  # node id -> client
    messages: list[Message] = field(default_factory=list)  # the train messages (ids set by the grid on push)


def _ordered(rec: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Parameter order as the model's (names missing or extra stay, for decode_reply to report)."""
    out = {k: rec[k] for k in names if k in rec}
    out.update({k: v for k, v in rec.items() if k not in out})
    return out


def _error_reason(reply: Message, node: int) -> str:
    if int(reply.metadata.src_node_id) == node:
        return f"the ClientApp failed: {reply.error.reason}"
    return f"no reply, the SuperLink says: {reply.error.reason} (code {reply.error.code})"


class FedBayesStrategy(Strategy):
    """A Flower strategy whose every decision is the fedbayes server rule's.

    Parameters
    ----------
    fed
        The experiment's data, partition, model and rule (:meth:`fedbayes.federation.Federation.build`).
    writer
        The results folder (None: keep nothing on disk).
    query_timeout_s
        How long to wait for the replies to a query message.
    start_round
        The absolute round of Flower's round 1 (> 1: a run resumed from a checkpoint of round
        ``start_round - 1``).
    rows
        The metrics rows of rounds ``1..start_round - 1`` (a resumed run's checkpoint); new rows are appended.
    """

    def __init__(self, fed: Federation, writer: ResultsWriter | None = None, *, query_timeout_s: float = 600.0,
                 start_round: int = 1, rows: list[dict[str, Any]] | None = None) -> None:
        if start_round < 1:
            raise ValueError(f"start_round must be >= 1, got {start_round}")
        if len(rows or []) != start_round - 1:
            raise ValueError(f"start_round {start_round} needs the {start_round - 1} earlier metrics rows, "
                             f"got {len(rows or [])}")
        self.fed = fed
        self.exp = fed.exp
        self.experiment_json = json.dumps(fed.exp.to_flat())  # sent in every message (client.records)
        self.writer = writer
        self.book = NodeBook(self.exp.run.num_clients, [len(p) for p in fed.parts], self.experiment_json,
                             query_timeout_s)
        self.start_round = start_round
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._round: _Flight | None = None
        self.t_start = time.perf_counter()
        self.wall_before = float(self.rows[-1].get("wall_s", 0.0)) if self.rows else 0.0  # wall_s continues

    @property
    def num_rounds(self) -> int:
        """How many rounds ``Strategy.start`` must run: ``start_round..rounds``."""
        return max(0, self.exp.run.rounds - self.start_round + 1)

    def absolute(self, server_round: int) -> int:
        """Flower's round counter (1, 2, … in this run; 0 before the first round) -> the experiment's round."""
        return server_round + self.start_round - 1 if server_round > 0 else 0

    @property
    def node_of(self) -> dict[int, int]:
        """Partition -> Flower node id of the nodes bound so far."""
        return self.book.node_of

    def bind_nodes(self, grid: Grid, wait_s: float) -> None:
        """:meth:`NodeBook.bind`, then the run's clock starts."""
        self.book.bind(grid, wait_s)
        self.t_start = time.perf_counter()

    def expected_examples(self, client: int) -> int:
        return self.book.expected_examples(client)

    # -- the Strategy interface ---------------------------------------------------------------------
    def summary(self) -> None:
        run = self.exp.run
        log.info("\t├── fedbayes rule: %s (%s)", run.algorithm, type(self.fed.rule).summary)
        log.info("\t├── %s, %d clients, %s partition, %d rounds",
                 run.dataset, run.num_clients, run.partition, run.rounds)
        log.info("\t├── nodes bound: %d of %d partitions", len(self.node_of), run.num_clients)
        if self.start_round > 1:
            log.info("\t└── resumed: rounds %d..%d (Flower's rounds 1..%d)", self.start_round, run.rounds,
                     self.num_rounds)
        else:
            log.info("\t└── rounds 1..%d", run.rounds)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per chosen client, to the node holding its partition, with the client's own prior."""
        server_round = self.absolute(server_round)
        if self.start_round > 1:
            log.info("round %d of %d", server_round, self.exp.run.rounds)
        self.book.refresh(grid)
        flight = _Flight(Round(self.fed, server_round))
        for c in flight.round.chosen:
            node = self.node_of.get(c)
            job = flight.round.job(c, reachable=node is not None)  # no node for this partition: absent
            if job is None or node is None:
                continue
            content = content_of(job.records, config={**job.config, EXPERIMENT_KEY: self.experiment_json})
            msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            flight.messages.append(msg)
            flight.sent[node] = c
        self._round = flight
        return flight.messages

    def _receive(self, flight: _Flight, reply: Message, node: int) -> None:
        """Hand one reply to the round: a ClientApp error or a wrong partition-id fails the client, an error the
        SuperLink makes for an unreachable node leaves it absent (like a timeout), anything else is decoded."""
        rnd, c = flight.round, flight.sent[node]
        if reply.has_error():
            reason = _error_reason(reply, node)
            if int(reply.metadata.src_node_id) == node:
                rnd.fail(c, reason)  # the ClientApp failed (e.g. diverged)
            else:
                log.warning("round %d: dropped reply of client %d: %s", rnd.server_round, c, reason)
            return
        records = records_of(reply.content)
        rnd.up += nbytes(records)
        metrics: dict[str, Any] = dict(reply.content.metric_records.get(METRIC_RECORD, {}))
        said = metrics.get("partition-id")
        if said != c:
            rnd.fail(c, f"invalid reply: {InvalidReply(f'reply says partition-id {said!r}, expected {c}')}")
            return
        names = list(self.fed.shapes)
        rnd.receive(c, {name: _ordered(rec, names) for name, rec in records.items()}, metrics,
                    expected_examples=self.expected_examples(c), counted=False)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand every reply to the round (validated once there), then ``rule.aggregate`` in the order of S."""
        server_round = self.absolute(server_round)
        flight = self._round
        if flight is None or flight.round.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train")
        replied: set[int] = set()
        for reply in replies:
            node = addressee(reply, flight.messages)
            if node not in flight.sent:
                log.warning("round %d: reply from unexpected node %d ignored", server_round, node)
                continue
            c = flight.sent[node]
            if c in replied:
                log.warning("round %d: second reply for client %d ignored", server_round, c)
                continue
            replied.add(c)
            self._receive(flight, reply, node)
        for c in flight.sent.values():
            if c not in replied:
                log.warning("round %d: no reply from client %d within round-timeout", server_round, c)
        updates = flight.round.aggregate()
        losses = [u.metrics.get("train-loss", float("nan")) for u in updates]
        metrics: dict[str, Any] = {"num-updates": len(updates), "num-failed": len(flight.round.failed)}
        if losses:
            metrics["train-loss"] = float(np.mean(losses))
        return arrays_of(self.fed.rule.global_mean()), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the global model is evaluated centrally (:meth:`evaluate`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The ``evaluate_fn``: central test (or, ``eval-split = "validation"``, validation) metrics and the engine's
        metrics row, posterior and checkpoint."""
        server_round = self.absolute(server_round)
        if server_round == 0:
            return None  # the engine has no round-0 row
        flight = self._round
        if flight is None or flight.round.server_round != server_round:
            raise RuntimeError(f"evaluate({server_round}) without a trained round")
        row = flight.round.row(lambda: self.wall_before + time.perf_counter() - self.t_start)
        record_round(self.writer, self.fed.rule, row, self.rows)
        shown = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        log.info("fedbayes: round %d: %s", server_round,
                 ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "round"))
        return MetricRecord({k: float(v) for k, v in shown.items() if math.isfinite(float(v))})
