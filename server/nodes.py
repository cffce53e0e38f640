"""Which Flower node is which fedbayes client: the strategy's node book.

Client identity is the node config's ``partition-id``.  :meth:`NodeBook.bind` sends each node a query message
at the start (and :meth:`NodeBook.refresh` again whenever a new node id appears; the query carries the run's
resolved configuration, :mod:`fedbayes.flower.records`) and maps Flower node ids to partitions.  A node that claims a
partition another online node holds is ignored until the holder leaves (a restarted SuperNode takes over its
partition); a node that left is forgotten, and its partition counts as failed until a node holds it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedbayes.flower.records import CONFIG_RECORD, EXPERIMENT_KEY, METRIC_RECORD
from fedbayes.flower.strategy import addressee

__all__ = ["NodeBook", "NodeInfo", "addressee"]

log = logging.getLogger("flwr")


@dataclass
class NodeInfo:
    """What a node said about itself in reply to the query message."""

    node_id: int
    partition_id: int
    num_examples: int
    own_data: bool


class NodeBook:
    """Flower node ids <-> client partitions, learnt from the nodes' answers to a query message.

    Parameters
    ----------
    num_clients
        The run's ``num-clients`` (valid partitions are ``0..num_clients-1``).
    sizes
        The server's partition sizes (a node's reported size is checked against them unless it uses its own
        ``data-path``).
    experiment_json
        The run's resolved configuration, sent in every query.
    timeout_s
        How long to wait for the replies to a query message.
    """

    def __init__(self, num_clients: int, sizes: Sequence[int], experiment_json: str, timeout_s: float) -> None:
        self.num_clients = num_clients
        self.sizes = list(sizes)
        self.experiment_json = experiment_json
        self.timeout_s = timeout_s
        self.nodes: dict[int, NodeInfo] = {}
        self.node_of: dict[int, int] = {}  # partition -> node id
        self._asked: set[int] = set()
        self._conflicts: dict[int, int] = {}  # node id -> partition it claimed while another node held it

    def _forget(self, node_id: int) -> None:
        info = self.nodes.pop(node_id, None)
        if info is not None and self.node_of.get(info.partition_id) == node_id:
            del self.node_of[info.partition_id]

    def refresh(self, grid: Grid) -> None:
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
            Message(RecordDict({CONFIG_RECORD: ConfigRecord({EXPERIMENT_KEY: self.experiment_json})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in new
        ]
        answered = set()
        for reply in grid.send_and_receive(msgs, timeout=self.timeout_s):
            node = addressee(reply, msgs)
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
        if not 0 <= pid < self.num_clients:
            log.error("node %d claims partition-id %d outside [0, %d): ignored", node, pid, self.num_clients)
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

    def bind(self, grid: Grid, wait_s: float) -> None:
        """Learn every node's ``partition-id``, waiting up to ``wait_s`` for all ``num-clients`` partitions.

        Raises
        ------
        RuntimeError
            No usable node at all after ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        k = self.num_clients
        while True:
            self.refresh(grid)
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

    def expected_examples(self, client: int) -> int:
        node = self.node_of.get(client)
        info = self.nodes.get(node) if node is not None else None
        return info.num_examples if info is not None and info.own_data else self.sizes[client]
