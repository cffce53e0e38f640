"""The dataset cache: where the files live and their SHA-256 checks (``SHA256SUMS``), and the errors a missing or
damaged cache raises."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "MANIFEST", "DatasetCorruptedError", "DatasetNotFoundError", "data_dir", "dataset_dir", "read_manifest",
    "sha256_file", "verify_cache",
]

MANIFEST = "SHA256SUMS"
"""Name of the checksum file in each dataset's cache folder (``sha256sum -c`` format)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's cache is missing; the message says which ``fedbayes data fetch`` to run."""

    def __init__(self, name: str, folder: Path, missing: str) -> None:
        self.name = name
        self.folder = folder
        super().__init__(
            f"dataset {name!r} is not in the cache ({missing} missing in {folder}): run `fedbayes data fetch {name}`"
        )


class DatasetCorruptedError(ValueError):
    """A cached file does not match its recorded SHA-256."""

    def __init__(self, name: str, path: Path, expected: str, actual: str) -> None:
        self.name = name
        self.path = path
        super().__init__(
            f"cached file {path} of dataset {name!r} is corrupted (SHA-256 {actual}, expected {expected}); "
            f"re-fetch it with `fedbayes data fetch {name}`"
        )


# -------------------------------------------------------------------------------------------- the cache


def data_dir() -> pathlib.Path:
    """Root of the dataset cache: ``$FEDBAYES_DATA_DIR`` if set, else ``~/.cache/fedbayes/data``."""
    env = os.environ.get("FEDBAYES_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedbayes" / "data"


def dataset_dir(name: str, root: Path | None = None) -> Path:
    """Cache folder of one dataset: ``<root or data_dir()>/<name>``."""
    return (Path(root) if root is not None else data_dir()) / name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """Parse a ``SHA256SUMS`` file (``<hex>  <filename>`` per line) into ``{filename: hex}``."""
    sums: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, fname = line.partition(" ")
        sums[fname.strip().lstrip("*")] = digest.lower()
    return sums


def verify_cache(name: str, files: Sequence[str], folder: Path) -> None:
    """Check that ``files`` exist in ``folder`` and match its ``SHA256SUMS``.

    Raises
    ------
    DatasetNotFoundError
        When the manifest or a file is missing (or the manifest does not list a file).
    DatasetCorruptedError
        When a file's SHA-256 differs from the manifest.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DatasetNotFoundError(name, folder, MANIFEST)
    sums = read_manifest(manifest)
    for fname in files:
        path = folder / fname
        if not path.is_file() or fname not in sums:
            raise DatasetNotFoundError(name, folder, fname)
        actual = sha256_file(path)
        if actual != sums[fname]:
            raise DatasetCorruptedError(name, path, sums[fname], actual)
