"""fedbayes: federated variational-Bayes ADMM with IVON clients.

The library never imports Flower; ``server/`` and ``client/`` adapt it to Flower's Message API.
"""

__version__ = "0.1.0"
