"""The fedbayes Flower ServerApp: the run config -> an experiment -> :class:`server.strategy.FedBayesStrategy`.

``context.run_config`` (``[tool.flwr.app.config]`` in pyproject.toml, overridden by ``flwr run -c``) is split
into fedbayes' flat config and the Flower-only keys by :func:`fedbayes.runconfig.split_run_config` (unset keys take
the ``preset``'s values, by default the dataset's preset, as ``fedbayes run`` does) and validated
by :func:`fedbayes.config.resolve` before anything else happens: a bad key stops the run with an error naming
it, and the results folder of an earlier run is not touched.  The folder is written only once the nodes are
bound, with the in-process engine's layout (config.json, metrics.jsonl, posterior.safetensors, checkpoint/);
config.json's ``provenance`` (:mod:`fedbayes.provenance`) has the ServerApp's command line and Flower's run id.

``resume-from = "<folder>"`` continues the run whose checkpoint is in that folder (:mod:`fedbayes.resume`): the
checkpoint and the run config are verified first (a damaged checkpoint or another experiment's config stops
the run with a clear error and leaves the folder as it was), then the rule's state is restored and the run
goes on from the checkpoint's round + 1 to ``rounds``, appending to that folder's metrics.

What it prints (:mod:`server.logs`): the run, one line per round with its metrics, where the results are; Flower's
own INFO lines only with ``verbose = true``; no colour codes unless on a terminal (and never with ``NO_COLOR``).
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

__all__ = ["app", "main"]

log = logging.getLogger("flwr")

QUERY_TIMEOUT_S = 600.0
"""How long the start-up query waits for node replies when the run sets no ``round-timeout``."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or, with ``resume-from``, continue) one fedbayes experiment over the nodes of ``grid``.

    Raises
    ------
    ConfigError
        A bad run-config key or value, or (resume) a run config that describes another experiment than the
        checkpoint's; nothing is written.
    CheckpointError
        (resume) A missing, truncated or corrupted checkpoint; nothing is written.
    """
    from fedbayes.federation import Federation
    from fedbayes.flower import arrays_of
    from fedbayes.provenance import provenance
    from fedbayes.results import CheckpointError, ResultsWriter
    from fedbayes.resume import load_resume, prepare_folder
    from fedbayes.runconfig import experiment_from_run_config
    from server.logs import configure_server_logging
    from server.strategy import FedBayesStrategy

    configure_server_logging(context.run_config.get("verbose") is True)  # before anything is logged
    exp, opts = experiment_from_run_config(context.run_config)  # ConfigError naming the key: nothing touched yet
    resume = None
    if opts.resume_from is not None:
        resume = load_resume(opts.resume_from, exp)  # CheckpointError / ConfigError: nothing touched yet
        exp, out = resume.exp, resume.folder
        if opts.out_dir.resolve() != out:
            log.info("fedbayes: resume-from is set: results go to %s (out-dir is not used)", out)
        log.info("fedbayes: resuming %s from round %d of %d in %s", exp.run.algorithm, resume.done, exp.run.rounds,
                 out)
    else:
        out = opts.out_dir.resolve()
        log.info("fedbayes: %s on %s, %d clients, %d rounds, %s -> %s", exp.run.algorithm, exp.run.dataset,
                 exp.run.num_clients, exp.run.rounds, opts.preset_line(), out)
    fed = Federation.build(exp, out if exp.run.store == "disk" else None, opts.data_dir)
    if resume is not None:
        try:
            resume.load_into(fed.rule)
        except CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot resume from {out}: the checkpoint's state does not fit the "
                                  f"{exp.run.algorithm} rule: {e}") from None
    deadline = exp.run.round_timeout or None  # round-timeout = 0: wait for every reply
    strategy = FedBayesStrategy(fed, query_timeout_s=max(deadline, 120.0) if deadline else QUERY_TIMEOUT_S,
                                start_round=resume.start_round if resume else 1, rows=resume.rows if resume else None)
    if strategy.num_rounds == 0:
        log.info("fedbayes: the checkpoint already holds all %d rounds: nothing to do", exp.run.rounds)
        log.info("fedbayes: results in %s", out)
        return
    strategy.bind_nodes(grid, opts.node_wait_s)
    run_id = {"flower-run-id": int(context.run_id)}  # in config.json's provenance (fedbayes.provenance)
    strategy.writer = (prepare_folder(resume, run_id) if resume is not None
                       else ResultsWriter(out, exp.to_flat(), provenance=provenance(**run_id)))
    fed.write_split(out)  # split.json when the run has a validation set
    strategy.start(
        grid=grid,
        initial_arrays=arrays_of(fed.rule.global_mean()),
        num_rounds=strategy.num_rounds,
        timeout=deadline,  # None: no deadline
    )
    log.info("fedbayes: results in %s", out)
