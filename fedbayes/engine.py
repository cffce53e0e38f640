"""The in-process simulation engine: the same server rules, wire format and local trainer, called directly.

One round r is :class:`fedbayes.rounds.Round` (participants, each client's message, validation of the replies,
the update, the metrics row), with the client's whole job (:func:`fedbayes.protocol.execute`) called directly
in place of a network: encode (float32, what would travel) → train → encode the reply → decode and validate.

Because the messages go through the same encode/decode as Flower's and every random choice is derived from
(seed, round, client), this engine and Flower's runtime give the same numbers, and a run resumed from its
checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedbayes.config import Experiment, resolve
from fedbayes.federation import Federation
from fedbayes.protocol import execute
from fedbayes.provenance import strip
from fedbayes.results import ResultsWriter, check_new_run
from fedbayes.resume import load_resume, prepare_folder
from fedbayes.rounds import Round, record_round

__all__ = ["run_experiment", "run_rounds"]

log = logging.getLogger("fedbayes")


def run_experiment(
    exp: Experiment | Mapping[str, Any],
    out_dir: str | Path | None,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    data_dir: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    fail: Callable[[int, int], bool] | None = None,
    stop_round: int | None = None,
    build: Callable[[Experiment, Path | None], Federation] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) an experiment in process; returns the metrics rows.

    Parameters
    ----------
    exp
        A resolved experiment or a flat config mapping (a run's ``config.json``: its ``provenance`` is ignored).
    out_dir
        The results folder (None: keep nothing on disk).
    resume
        Continue from ``out_dir/checkpoint`` (:mod:`fedbayes.resume`: its config wins; ``exp.rounds`` may extend
        the run).
    overwrite
        ``out_dir`` may hold a run (:func:`fedbayes.results.holds_run`): remove it first.  Without it such a
        folder is refused with :class:`fedbayes.results.RunExistsError` before anything is written, so a library
        call never destroys results silently (a resumed run continues its folder; this does not apply).
    on_round
        Called with each round's metrics row once the round is recorded; an exception it raises (e.g.
        ``optuna.TrialPruned`` from ``fedbayes tune``) stops the run and propagates.
    fail
        ``fail(round, client) -> True`` drops that client's reply (failure injection for tests/benchmarks).
    stop_round
        Stop after this round while keeping the configured ``rounds`` (a later resume continues exactly).
    build
        ``build(exp, out_dir) -> Federation`` in place of :meth:`Federation.build` (:func:`fedbayes.run`: a
        federation of the caller's model and data objects).
    provenance
        A new run's ``config.json`` provenance (default: :func:`fedbayes.provenance.provenance` now).
    """
    if not isinstance(exp, Experiment):
        exp = resolve(strip(exp))  # a config.json as written (its provenance is not a config key) is a config
    out = Path(out_dir) if out_dir is not None else None
    start_round, rows = 1, []
    cont = None
    if resume:
        if out is None:
            raise ValueError("resume needs the run folder")
        cont = load_resume(out, rounds=exp.run.rounds)  # the checkpoint's config, extended to exp's rounds
        exp, start_round, rows = cont.exp, cont.start_round, list(cont.rows)
    elif out is not None:
        check_new_run(out, overwrite)  # RunExistsError before anything is touched; overwrite: the old run removed
    fed = build(exp, out) if build is not None else Federation.build(exp, out, data_dir)
    if cont is not None:
        cont.load_into(fed.rule)
    writer = None
    if out is not None:
        writer = prepare_folder(cont) if cont is not None else ResultsWriter(out, exp.to_flat(), provenance=provenance)
    if out is not None:
        fed.write_split(out)
    source = exp.run.data or exp.run.dataset
    log.info("%s: %s", source, fed.summary())
    if progress:
        print(f"[fedbayes] {exp.run.algorithm} on {source}: {fed.summary()}")
    return run_rounds(fed, exp, rows, writer, start_round=start_round, stop_round=stop_round, progress=progress,
                      on_round=on_round, fail=fail)


def run_rounds(
    fed: Federation,
    exp: Experiment,
    rows: list[dict[str, Any]],
    writer: ResultsWriter | None,
    *,
    start_round: int = 1,
    stop_round: int | None = None,
    progress: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    fail: Callable[[int, int], bool] | None = None,
    checkpoint: bool = True,
    evaluate: bool = True,
) -> list[dict[str, Any]]:
    """The round loop: rounds ``start_round..stop_round`` (default ``rounds``) of a built federation; appends to
    and returns ``rows`` (``evaluate=False``: rows without test metrics, for callers that evaluate themselves).
    The lr schedule, participants and seeds are functions of the absolute round and the configured ``rounds``, so
    stopping early and resuming later reproduces an uninterrupted run."""
    stop = exp.run.rounds if stop_round is None else min(int(stop_round), exp.run.rounds)
    t_start = time.perf_counter() - (rows[-1]["wall_s"] if rows else 0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=start_round - 1, desc=exp.run.algorithm, unit="round", leave=False)
    for r in range(start_round, stop + 1):
        rnd = Round(fed, r)
        (_train_batched if fed.batched else _train_sequential)(fed, rnd, fail)
        rnd.aggregate()
        row = rnd.row(lambda: time.perf_counter() - t_start, evaluate=evaluate)
        record_round(writer, fed.rule, row, rows, checkpoint=checkpoint)
        if on_round is not None:
            on_round(row)
        if bar is not None:
            bar.update(1)
            for pre in ("test_", "val_"):
                if f"{pre}accuracy" in row:
                    bar.set_postfix(acc=f"{row[f'{pre}accuracy']:.4f}", nll=f"{row[f'{pre}nll']:.3f}")
    if bar is not None:
        bar.close()
    return rows


def _train_sequential(fed: Federation, rnd: Round, fail: Callable[[int, int], bool] | None) -> None:
    """The round's clients one after another, each through the client's whole job (encode → train → decode)."""
    for c in rnd.chosen:
        job = rnd.job(c, reachable=not (fail is not None and fail(rnd.server_round, c)))
        if job is None:
            continue  # the reply never arrives (or arrives after the deadline): the client stays stale
        x, y = fed.client_data[c]
        try:
            reply, metrics = execute(fed.model, job.records, job.config, x, y, device=fed.device)
        except ArithmeticError as e:  # local training diverged (FloatingPointError): a failed client
            rnd.fail(c, f"diverged: {e}")
            continue
        rnd.receive(c, reply, metrics)


def _train_batched(fed: Federation, rnd: Round, fail: Callable[[int, int], bool] | None) -> None:
    """The round's clients at once (:func:`fedbayes.batched.execute_batched`): the same messages, codec and
    validation as :func:`_train_sequential`; a diverged client fails alone."""
    from fedbayes.batched import execute_batched

    jobs = []
    for c in rnd.chosen:
        job = rnd.job(c, reachable=not (fail is not None and fail(rnd.server_round, c)))
        if job is not None:
            jobs.append(job)
    if not jobs:
        return
    outs = execute_batched(fed.model, [(j.records, j.config, *fed.client_data[j.client]) for j in jobs],
                           device=fed.device, batch_clients=fed.exp.run.batch_clients)
    for job, out in zip(jobs, outs, strict=True):
        if isinstance(out, ArithmeticError):
            rnd.fail(job.client, f"diverged: {out}")
        elif isinstance(out, Exception):
            raise out
        else:
            rnd.receive(job.client, *out)
