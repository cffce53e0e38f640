"""Client stores (memory, disk, float32) and incremental checkpoints: what a round writes, resuming at K = 1,000
with partial participation, and damaged, foreign or unwritable client files."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbayes.algorithms import DiskStore, MemoryStore
from fedbayes.algorithms.store import ClientFiles, StoreError
from fedbayes.engine import run_experiment
from fedbayes.results import CheckpointError, load_checkpoint, read_posterior

SHAPES = {"w": (3, 2), "b": (2,)}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"dual.{p}/{k}": torch.randn(s, generator=g, dtype=torch.float64) for p in ("eta", "prec")
            for k, s in SHAPES.items()}


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_float32_store_returns_what_it_keeps(kind: str, tmp_path: Path) -> None:
    store = MemoryStore(torch.float32) if kind == "memory" else DiskStore(tmp_path, torch.float32)
    t = _tensors(0)
    kept = store.put_all(4, t)
    back = store.get_all(4)
    for k, v in t.items():
        assert back[k].dtype == torch.float64
        assert torch.equal(back[k], kept[k])  # what put_all returns is exactly what a read gives
        assert torch.equal(kept[k], v.float().double())  # rounded to float32
        assert not torch.equal(kept[k], v)
    assert store.clients() == [4] and store.dirty() == [4]
    store.mark_clean()
    store.delete(4)
    assert store.clients() == [] and store.dirty() == [4] and store.get_all(4) == {}


def test_disk_store_cache_is_bounded_and_reads_back_from_files(tmp_path: Path) -> None:
    one = sum(v.numel() * 8 for v in _tensors(0).values())
    store = DiskStore(tmp_path, cache_bytes=3 * one)
    for c in range(10):
        store.put_all(c, _tensors(c))
        assert store.cached_bytes <= 3 * one
    assert len(list(tmp_path.glob("c*.safetensors"))) == 10
    for c in range(10):  # evicted clients come back from their files, unchanged
        got = store.get_all(c)
        assert all(torch.equal(got[k], v) for k, v in _tensors(c).items())
    store.put_all(3, _tensors(99))  # a new file; the superseded one stays until commit (a checkpoint may name it)
    assert len(list(tmp_path.glob("c*.safetensors"))) == 11
    store.files.commit()
    assert len(list(tmp_path.glob("c*.safetensors"))) == 10


def test_damaged_foreign_or_misshapen_files_are_named(tmp_path: Path) -> None:
    files = ClientFiles(tmp_path, fingerprint="run-a", shapes=SHAPES)
    files.write(7, _tensors(7))
    path = files.path(7)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"client 7's state file .*{path.name} is damaged"):
        files.read(7)
    other = ClientFiles(tmp_path / "b", fingerprint="run-b", shapes=SHAPES)
    other.write(7, _tensors(7))
    foreign = ClientFiles(tmp_path / "b", dict(other.index), fingerprint="run-a", shapes=SHAPES)
    with pytest.raises(StoreError, match="belongs to another run or model"):
        foreign.read(7)
    wrong = ClientFiles(tmp_path / "b", dict(other.index), fingerprint="run-b", shapes={"w": (2, 3), "b": (2,)})
    with pytest.raises(StoreError, match=r"client 7's state file .* tensor 'dual\.\w+/w' has shape \(3, 2\)"):
        wrong.read(7)
    moved = ClientFiles(tmp_path / "b", {8: other.index[7]}, fingerprint="run-b")
    with pytest.raises(StoreError, match="holds client '7', not client 8"):
        moved.read(8)


# ------------------------------------------------------------------------------------- runs at K = 1,000
def _config(k: int, rounds: int, store: str, **extra: Any) -> dict[str, Any]:
    return {"algorithm": "bayes-admm", "dataset": "synthetic-classification", "num-clients": k,
            "partition": "iid", "rounds": rounds, "epochs": 1, "batch-size": 4, "hidden": "8",
            "clients-per-round": 50 / k, "bma-samples": 0, "eval-every": rounds, "seed": 3, "store": store,
            "rho-k": 4.0, "damping": 0.5, **extra}


def _files(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoint" / "clients").glob("c*.safetensors")}


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_checkpoint_writes_only_the_participants_and_resume_is_bit_identical(store: str, tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    rows = run_experiment(_config(1000, 4, store), ref, progress=False)
    seen: set[int] = set()
    for r in rows:
        seen |= set(r["participants"])
    meta, _ = load_checkpoint(ref, clients=False)
    assert meta["format"] == 2 and sorted(int(c) for c in meta["clients"]) == sorted(seen)
    assert _files(ref) == {v[0] for v in meta["clients"].values()}  # superseded files deleted

    run_experiment(_config(1000, 4, store), cut, progress=False, stop_round=2)
    before = _files(cut)
    meta2, _ = load_checkpoint(cut, clients=False)
    run_experiment(_config(1000, 4, store), cut, progress=False, resume=True, stop_round=3)
    meta3, _ = load_checkpoint(cut, clients=False)
    third = set(next(r for r in rows if r["round"] == 3)["participants"])
    changed = {int(c) for c, v in meta3["clients"].items() if meta2["clients"].get(c) != v}
    assert changed == third  # round 3's checkpoint wrote exactly its participants' files
    assert len(_files(cut) - before) == len(third)
    run_experiment(_config(1000, 4, store), cut, progress=False, resume=True)
    a, b = read_posterior(ref), read_posterior(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed twice, bit-identical
    assert load_checkpoint(cut)[1].keys() == load_checkpoint(ref)[1].keys()


def test_float32_client_state_keeps_running_sums_exact(tmp_path: Path) -> None:
    from fedbayes.algorithms.base import RECOMPUTE_EVERY
    from fedbayes.config import resolve
    from fedbayes.engine import run_rounds
    from fedbayes.federation import Federation

    exp = resolve(_config(200, RECOMPUTE_EVERY - 1, "memory", **{"client-state-dtype": "float32"}))
    fed = Federation.build(exp)
    run_rounds(fed, exp, [], None, evaluate=False)
    rule = fed.rule
    running = (rule.state.post_sum, rule.state.dual_sum)
    fresh = rule.recomputed_sums()
    for got, want in zip(running, fresh, strict=True):
        for part in ("eta", "prec"):
            for k, v in getattr(want, part).items():
                err = float((getattr(got, part)[k] - v).abs().max()) / max(float(v.abs().max()), 1e-300)
                assert err <= 1e-12, (part, k, err)
    assert all(v.dtype == torch.float32 for v in rule.store._d[rule.store.clients()[0]].values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_full_disk_during_a_checkpoint_names_the_client_and_keeps_the_last_one(
        store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run_experiment(_config(1000, 3, store), run, progress=False, stop_round=1)
    good = (run / "checkpoint" / "meta.json").read_bytes()
    real_write, calls = ClientFiles.write, {"n": 0}

    def full(self: ClientFiles, client: int, tensors: dict[str, torch.Tensor]) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            raise StoreError(f"writing client {client}'s state to {self.folder} failed: "
                             f"{OSError(errno.ENOSPC, 'No space left on device')}")
        real_write(self, client, tensors)

    monkeypatch.setattr(ClientFiles, "write", full)
    with pytest.raises((CheckpointError, StoreError), match=r"writing client \d+'s state .* No space left"):
        run_experiment(_config(1000, 3, store), run, progress=False, resume=True)
    monkeypatch.setattr(ClientFiles, "write", real_write)
    assert (run / "checkpoint" / "meta.json").read_bytes() == good  # the round-1 checkpoint, untouched
    meta, _ = load_checkpoint(run)
    assert meta["round"] == 1
    run_experiment(_config(1000, 3, store), run, progress=False, resume=True)
    ref = tmp_path / "ref"
    run_experiment(_config(1000, 3, store), ref, progress=False)
    a, b = read_posterior(ref), read_posterior(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_damaged_or_foreign_client_file(tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    run_experiment(_config(1000, 3, "memory"), run, progress=False, stop_round=1)
    run_experiment(_config(1000, 3, "memory", seed=4), other, progress=False, stop_round=1)
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    client, (name, _) = next(iter(meta["clients"].items()))
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").rglob("*") if p.is_file()}
    victim = run / "checkpoint" / "clients" / name
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"client {client}'s state file .*{name} is damaged"):
        run_experiment(_config(1000, 3, "memory"), run, progress=False, resume=True)
    # a file of another run under the expected name, with a matching digest in the index: refused as foreign
    theirs = json.loads((other / "checkpoint" / "meta.json").read_text())["clients"]
    shared = sorted(theirs)[0]
    fname = theirs[shared][0]
    shutil.copy(other / "checkpoint" / "clients" / fname, run / "checkpoint" / "clients" / fname)
    meta["clients"][shared] = theirs[shared]
    victim.write_bytes(before[name])
    (run / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"client {shared}'s state file .* belongs to another run or model"):
        load_checkpoint(run)
