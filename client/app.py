"""The fedbayes Flower ClientApp: decode a train message, train locally under the prior it carries, reply.

Two handlers, both thin: ``query`` (the ServerApp asks each node once which client ``partition-id`` it is, how
many examples it has, and whether they come from its own ``data-path`` file) and ``train`` (one local
problem, :func:`fedbayes.flower.train`).  The work lives in :mod:`client.task`, imported on the first
message, so ``import client.app`` stays light (no torch): a deployment starts a fresh ClientApp process per
message, and the SuperNode only needs to load the app object.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

__all__ = ["app"]

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's identity and data size (errors name the bad node-config key)."""
    from client.task import handle_query

    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train under the prior in ``msg`` and reply with the site or the mean, plus metrics."""
    from client.task import handle_train

    return handle_train(msg, context)
