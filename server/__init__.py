"""The fedbayes Flower ServerApp (:mod:`server.app`) and its strategy adapter (:mod:`server.strategy`)."""
