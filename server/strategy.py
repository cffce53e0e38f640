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

Client identity is the node config's ``partition-id``: :meth:`FedBayesStrategy.bind_nodes` sends each node a
query message at the start (and again whenever a new node id appears) and maps Flower node ids to partitions.

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

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedbayes.engine import Federation
from fedbayes.protocol import InvalidReply, nbytes
from fedbayes.results import ResultsWriter
from fedbayes.rounds import Round, record_round

__all__ = ["CONFIG_RECORD", "METRIC_RECORD", "FedBayesStrategy", "NodeInfo", "arrays_of"]

log = logging.getLogger("flwr")
CONFIG_RECORD = "config"
METRIC_RECORD = "metrics"


@dataclass
class NodeInfo:
    """What a node said about itself in reply to the query message."""

    node_id: int
    partition_id: int
    num_examples: int
    own_data: bool


@dataclass
class _Flight:
    """The Flower side of one round: which node got which client's message (the policy is :class:`Round`)."""

    round: Round
    sent: dict[int, int] = field(default_factory=dict)  # node id -> client
    messages: list[Message] = field(default_factory=list)  # the train messages (ids set by the grid on push)


def _records(content: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    return {name: {k: a.numpy() for k, a in rec.items()} for name, rec in content.array_records.items()}


def _ordered(rec: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Parameter order as the model's (names missing or extra stay, for decode_reply to report)."""
    out = {k: rec[k] for k in names if k in rec}
    out.update({k: v for k, v in rec.items() if k not in out})
    return out


def _addressee(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for: the destination of the message it replies to (a reply the SuperLink makes
    for an unavailable node comes from the SuperLink's own node id), else its sender."""
    by_id = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))


def _error_reason(reply: Message, node: int) -> str:
    if int(reply.metadata.src_node_id) == node:
        return f"the ClientApp failed: {reply.error.reason}"
    return f"no reply, the SuperLink says: {reply.error.reason} (code {reply.error.code})"


def arrays_of(params: dict[str, Any]) -> ArrayRecord:
    """Named tensors -> an ArrayRecord (the global mean, for Flower's logs and ``Result``)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in params.items()})


class FedBayesStrategy(Strategy):
    """A Flower strategy whose every decision is the fedbayes server rule's.

    Parameters
    ----------
    fed
        The experiment's data, partition, model and rule (:meth:`fedbayes.engine.Federation.build`).
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
        self.writer = writer
        self.query_timeout_s = query_timeout_s
        self.nodes: dict[int, NodeInfo] = {}
        self.node_of: dict[int, int] = {}  # partition -> node id
        self._asked: set[int] = set()
        self._conflicts: dict[int, int] = {}  # node id -> partition it claimed while another node held it
        self.sizes = [len(p) for p in fed.parts]
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

    # -- node identity ------------------------------------------------------------------------------
    def _forget(self, node_id: int) -> None:
        info = self.nodes.pop(node_id, None)
        if info is not None and self.node_of.get(info.partition_id) == node_id:
            del self.node_of[info.partition_id]

    def refresh_nodes(self, grid: Grid) -> None:
        """Query nodes not seen before; forget nodes that left."""
        online = set(grid.get_node_ids())
        for gone in [n for n in self.nodes if n not in online]:
            log.warning("node %d (partition %d) left the federation", gone, self.nodes[gone].partition_id)
            self._forget(gone)
        for node, pid in list(self._conflicts.items()):  # ask again once the holder is gone (a restarted node)
            if node not in online or pid not in self.node_of:
                del self._conflicts[node]
                self._asked.discard(node)
        self._asked &= online
        new = sorted(online - self._asked)
        if not new:
            return
        self._asked.update(new)
        msgs = [
            Message(RecordDict({CONFIG_RECORD: ConfigRecord({"num-clients": self.exp.run.num_clients})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in new
        ]
        answered = set()
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout_s):
            node = _addressee(reply, msgs)
            if node not in new:
                log.warning("query reply from unexpected node %d ignored", node)
                continue
            if reply.has_error() and int(reply.metadata.src_node_id) != node:
                log.warning("node %d did not answer the query: %s", node, reply.error.reason)
                continue  # the SuperLink answered for it (node offline): ask again later
            answered.add(node)
            self._register(reply, node)
        self._asked -= set(new) - answered  # no answer in time: ask again later

    def _register(self, reply: Message, node: int) -> None:
        if reply.has_error():
            log.error("node %d cannot take part: %s", node, reply.error.reason)
            return
        m: dict[str, Any] = dict(reply.content.metric_records.get(METRIC_RECORD, {}))
        try:
            pid, n = int(m["partition-id"]), int(m["num-examples"])
        except (KeyError, TypeError, ValueError):
            log.error("node %d sent a malformed query reply %s: ignored", node, m)
            return
        if not 0 <= pid < self.exp.run.num_clients:
            log.error("node %d claims partition-id %d outside [0, %d): ignored", node, pid, self.exp.run.num_clients)
            return
        if pid in self.node_of and self.node_of[pid] != node:
            log.error("node %d claims partition-id %d, already held by node %d: ignored while that node is online",
                      node, pid, self.node_of[pid])
            self._conflicts[node] = pid
            return
        own = bool(m.get("own-data", 0))
        if not own and n != self.sizes[pid]:
            log.warning("node %d (partition %d) reports %d examples, the server's partition has %d",
                        node, pid, n, self.sizes[pid])
        self.nodes[node] = NodeInfo(node, pid, n, own)
        self.node_of[pid] = node
        log.info("node %d is client partition-id %d (%d examples%s)", node, pid, n, ", own data-path" if own else "")

    def bind_nodes(self, grid: Grid, wait_s: float) -> None:
        """Learn every node's ``partition-id``, waiting up to ``wait_s`` for all ``num-clients`` partitions.

        Raises
        ------
        RuntimeError
            No usable node at all after ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        k = self.exp.run.num_clients
        while True:
            self.refresh_nodes(grid)
            if len(self.node_of) >= k or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        missing = [c for c in range(k) if c not in self.node_of]
        if len(missing) == k:
            raise RuntimeError(
                f"no usable SuperNode after {wait_s:.0f} s (num-clients={k}); see the errors above, or start "
                f"SuperNodes with --node-config \"partition-id=<0..{k - 1}> num-partitions={k}\""
            )
        if missing:
            log.warning("no node for partition(s) %s after %.0f s: they count as failed until one joins",
                        missing, wait_s)
        self.t_start = time.perf_counter()

    def expected_examples(self, client: int) -> int:
        node = self.node_of.get(client)
        info = self.nodes.get(node) if node is not None else None
        return info.num_examples if info is not None and info.own_data else self.sizes[client]

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
            log.info("fedbayes round %d of %d", server_round, self.exp.run.rounds)
        self.refresh_nodes(grid)
        flight = _Flight(Round(self.fed, server_round))
        for c in flight.round.chosen:
            node = self.node_of.get(c)
            job = flight.round.job(c, reachable=node is not None)  # no node for this partition: absent
            if job is None or node is None:
                continue
            content = RecordDict({n: ArrayRecord({k: Array(v) for k, v in rec.items()})
                                  for n, rec in job.records.items()})
            content[CONFIG_RECORD] = ConfigRecord(job.config)
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
        records = _records(reply.content)
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
            node = _addressee(reply, flight.messages)
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
        log.info("round %d: %s", server_round, ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "round"))
        return MetricRecord({k: float(v) for k, v in shown.items() if math.isfinite(float(v))})
