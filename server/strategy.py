"""This project's Flower strategy: :class:`fedbayes.flower.FedBayes` (the public strategy any ServerApp can use) on
a :class:`fedbayes.federation.Federation` built from the run config, with nodes bound by ``partition-id``.

What it adds to the public strategy, through its public hooks only: the rule and the experiment come from the
federation (built before :meth:`start`); nodes are bound by the node book (:meth:`bind_nodes`,
:meth:`refresh_nodes`); each message carries the run's resolved config (:data:`fedbayes.flower.EXPERIMENT_KEY`,
from which the ClientApp rebuilds its data); a reply's ``num-examples`` is checked against the partition; the
evaluation is the federation's own (central test or validation metrics: :meth:`round_row`).  No federated
evaluation (``fraction_evaluate = 0``).

The round is :class:`fedbayes.rounds.Round`, the policy the in-process engine runs too; the strategy only moves
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
import time
from typing import Any

from flwr.serverapp import Grid

from fedbayes.federation import Federation
from fedbayes.flower import EXPERIMENT_KEY, FedBayes
from fedbayes.flower.strategy import Flight
from fedbayes.results import ResultsWriter
from fedbayes.rounds import RoundHost
from server.nodes import NodeBook

__all__ = ["FedBayesStrategy"]

log = logging.getLogger("flwr")


class FedBayesStrategy(FedBayes):
    """:class:`fedbayes.flower.FedBayes` for a federation of this project's ClientApps.

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
        super().__init__(fed.rule, num_clients=fed.exp.run.num_clients, fraction_evaluate=0.0)
        self.fed = fed
        self.exp = fed.exp
        self.rule = fed.rule
        self.experiment_json = json.dumps(fed.exp.to_flat())  # sent in every message (fedbayes.flower.records)
        self.writer = writer
        self.book = NodeBook(self.exp.run.num_clients, [len(p) for p in fed.parts], self.experiment_json,
                             query_timeout_s)
        self.start_round = start_round
        self.rows = list(rows or [])
        self.wall_before = float(self.rows[-1].get("wall_s", 0.0)) if self.rows else 0.0  # wall_s continues

    @property
    def node_of(self) -> dict[int, int]:
        """Partition -> Flower node id of the nodes bound so far."""
        return self.book.node_of

    def bind_nodes(self, grid: Grid, wait_s: float | None = None) -> None:
        """:meth:`NodeBook.bind`, then the run's clock starts."""
        self.book.bind(grid, self.node_wait_s if wait_s is None else wait_s)
        self.t_start = time.perf_counter()

    def refresh_nodes(self, grid: Grid) -> None:
        self.book.refresh(grid)

    def expected_examples(self, client: int) -> int:
        return self.book.expected_examples(client)

    def train_message_config(self) -> dict[str, Any]:
        return {EXPERIMENT_KEY: self.experiment_json}

    def round_host(self) -> RoundHost:
        return self.fed

    def round_row(self, flight: Flight) -> dict[str, Any]:
        """The federation's own evaluation (test or validation set) and the engine's metrics row."""
        return flight.round.row(lambda: self.wall_before + time.perf_counter() - self.t_start)

    def summary(self) -> None:
        run = self.exp.run
        log.info("\t├── fedbayes rule: %s (%s)", run.algorithm, type(self.rule).summary)
        log.info("\t├── %s, %d clients, %s partition, %d rounds",
                 run.dataset, run.num_clients, run.partition, run.rounds)
        log.info("\t├── nodes bound: %d of %d partitions", len(self.node_of), run.num_clients)
        if self.start_round > 1:
            log.info("\t└── resumed: rounds %d..%d (Flower's rounds 1..%d)", self.start_round, run.rounds,
                     self.num_rounds)
        else:
            log.info("\t└── rounds 1..%d", run.rounds)
