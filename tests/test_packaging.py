"""What `pip install` of the project puts into a user's environment: the wheel's top-level packages (no generic
`server`/`client`), and the `fedbayes` command's error when the bench extra (optuna, matplotlib) is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_has_no_top_level_server_or_client(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("fedbayes-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fedbayes", "simulations"}, top
    assert "fedbayes/flower/strategy.py" in names and "fedbayes/presets/demo.toml" in names


def test_client_needs_no_bench_extra() -> None:
    """optuna and matplotlib are the bench extra (and dev's), not dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    assert "optuna" not in deps and "matplotlib" not in deps
    bench = " ".join(project["optional-dependencies"]["bench"])
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert all(p in bench and p in dev for p in ("optuna", "matplotlib"))


def test_command_names_the_missing_extra(tmp_path: Path) -> None:
    """`fedbayes tune` without optuna: exit 2 and a message naming the extra to install."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nclass _B:\n    def find_spec(self, name, path=None, target=None):\n"
                       "        if name.split('.')[0] == 'optuna':\n"
                       "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                       "sys.meta_path.insert(0, _B())\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "fedbayes", "tune", "--preset", "digits-10-het", "--algorithm",
                          "fedavg", "--trials", "1", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "pip install 'fedbayes[bench]'" in out.stderr and "optuna" in out.stderr, out.stderr[-2000:]
