"""Run a fedbayes experiment through Flower: the simulation runtime, or a local deployment of real processes.

:func:`run_flower_simulation` is ``fedbayes run --engine flower``: it starts a private SuperLink in simulation
mode on a free port (a private ``FLWR_HOME`` in a temporary folder, runtime dependency installation off),
submits this project as a Flower App with ``flwr run . <connection> --run-config FILE.toml
--federation-config "num-supernodes=K client-resources-num-cpus=… client-resources-num-gpus=…" --stream``,
stops the SuperLink and every process it started **by PID**, and returns the metrics rows the ServerApp wrote
to ``out_dir`` (the in-process engine's layout).  Flower's own managed ``local`` SuperLink is not used: it has
fixed ports, is shared by every ``flwr run . local`` on the machine and outlives the command.

:class:`simulations.deployment.LocalDeployment` starts real ``flower-superlink`` and ``flower-supernode``
processes for tests and benchmarks; both use the PID-based process handling of :mod:`simulations.processes`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.processes import (
    FlowerRunError,
    flower_bin,
    flower_env,
    flwr_run,
    free_port,
    start_process,
    stop_process,
    wait_healthy,
    write_flwr_home,
)

__all__ = ["FlowerRunError", "project_root", "run_flower_simulation"]


def project_root() -> Path:
    """The folder with this project's ``pyproject.toml`` (the Flower App that ``flwr run`` submits)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        raise FileNotFoundError(f"no pyproject.toml in {root}: the Flower engine needs a source checkout")
    return root


def run_flower_simulation(
    flat_config: Mapping[str, Any],
    out_dir: Path,
    num_supernodes: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    *,
    app_dir: Path | None = None,
    timeout_s: float | None = None,
    echo: bool = True,
    keep_logs: Path | None = None,
    resume: bool = False,
    verbose: bool = False,
    preset: str | None = None,
) -> list[dict[str, Any]]:
    """Run an experiment through Flower's simulation runtime; return the metrics rows from ``out_dir``.

    Parameters
    ----------
    flat_config
        A fedbayes flat config (as for :func:`fedbayes.engine.run_experiment`); validated first.
    out_dir
        The results folder the ServerApp writes (config.json, metrics.jsonl, posterior.safetensors, checkpoint/).
    num_supernodes
        Simulated SuperNodes; must equal the config's ``num-clients`` (partition-id = client).
    num_cpus, num_gpus
        Resources per ClientApp (``client-resources-num-cpus`` / ``-num-gpus``; a GPU fraction such as 0.25
        lets four ClientApps share one GPU).  Parallelism is min(CPUs / num_cpus, GPUs / num_gpus).
    app_dir
        The Flower App to submit (default: this project).
    timeout_s
        Stop everything and raise after this long (default: no limit).
    echo
        Stream Flower's output to stdout: the run, one line per round with its metrics, where the results are,
        warnings and errors; no colour codes unless stdout is a terminal (never with ``NO_COLOR``).
    verbose
        Show Flower's own INFO output too (the ServerApp's run-config key ``verbose``).
    preset
        The preset ``flat_config`` was resolved from, for the ServerApp's first line (run-config key
        ``resolved-preset``; every key is sent, so the ServerApp applies no preset itself).
    keep_logs
        Copy the SuperLink and ``flwr run`` logs to this folder.
    resume
        Continue the run whose checkpoint is in ``out_dir`` (run-config ``resume-from``): ``flat_config`` must be
        that run's config, except ``rounds`` (which may extend it) and ``round-timeout``; the rows of all rounds
        are returned.

    Raises
    ------
    ConfigError
        A bad key in ``flat_config`` (before anything starts).
    ValueError
        ``num_supernodes`` differs from ``num-clients``, or bad resources.
    FlowerRunError
        The run did not write all its rounds; the message has the tail of the logs.
    """
    from fedbayes.config import resolve
    from fedbayes.results import read_metrics
    from fedbayes.runconfig import overrides_toml, run_config_overrides

    exp = resolve(flat_config)
    if num_supernodes != exp.run.num_clients:
        raise ValueError(f"num_supernodes={num_supernodes} must equal num-clients={exp.run.num_clients} "
                         "(each SuperNode is one client partition)")
    if not num_cpus > 0 or num_gpus < 0:
        raise ValueError(f"client resources must be num_cpus > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
    out = Path(out_dir).resolve()
    app = (app_dir or project_root()).resolve()
    flower_opts: dict[str, Any] = {"out-dir": str(out), "node-wait-s": 30.0, "verbose": verbose,
                                   "resolved-preset": preset or ""}
    if resume:
        flower_opts["resume-from"] = str(out)
    overrides = run_config_overrides(exp.to_flat(), flower_opts)
    fed_cfg = (f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus:g} "
               f"client-resources-num-gpus={num_gpus:g}")
    with tempfile.TemporaryDirectory(prefix="fbflwr-") as tmp_s:
        tmp = Path(tmp_s)
        home = tmp / "home"
        port = free_port()
        write_flwr_home(home, {"fedbayes-sim": {"address": f"127.0.0.1:{port}", "insecure": True}}, "fedbayes-sim")
        env = flower_env(home, {"RAY_TMPDIR": str(tmp)})
        (tmp / "run-config.toml").write_text(overrides_toml(overrides))
        link = start_process("superlink", [
            flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
        ], env, tmp, cwd=tmp)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", link)
            link.snapshot()
            rc = flwr_run(app, "fedbayes-sim", env, tmp / "flwr-run.log", run_config=tmp / "run-config.toml",
                          federation_config=fed_cfg, timeout_s=timeout_s, echo=echo,
                          verbose=verbose)
            link.snapshot()
        finally:
            stop_process(link)
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for name in ("superlink.log", "flwr-run.log"):
                    if (tmp / name).exists():
                        (keep_logs / name).write_bytes((tmp / name).read_bytes())
        run_log = (tmp / "flwr-run.log").read_text(errors="replace") if (tmp / "flwr-run.log").exists() else ""
        rows = read_metrics(out) if (out / "metrics.jsonl").exists() else []
        if rc != 0 or len(rows) < exp.run.rounds or "fedbayes: results in" not in run_log:
            raise FlowerRunError(
                f"Flower simulation did not finish (flwr run exit {rc}, {len(rows)}/{exp.run.rounds} rounds "
                f"in {out}):\n{run_log[-6000:]}"
            )
    return rows
