"""IVON's Gaussian noise, drawn one step ahead on a worker thread.

An IVON step on a CPU spends a large share of its time in ``torch.randn``: one normal draw per parameter
(178,110 for the papers' MLP), made by the generator's Mersenne Twister one value after another on one core,
while the other cores sit idle.  The draw depends on nothing the step computes, so the draw of step t + 1 can run
on another core while step t's forward and backward pass run.

Exactness: a single worker thread runs the draws in the order they are asked for, from the same generator, at
most one draw ahead, and nothing else touches that generator meanwhile; so draw i is bit-identical to the one the
inline path makes, and after the last planned draw the generator is exactly where the inline path leaves it (the
caller plans the number of draws; none is made beyond it).

What else was tried for the noise (measured side by side, 1 thread, 178k float32 values): NumPy's PCG64, SFC64 and
Philox float32 normals are 3x slower than ``torch.randn``; ``torch.rand`` alone already costs about half of
``torch.randn`` (the generator, not Box-Muller, is the cost); float64 draws are 3-4x slower, bfloat16 no faster;
antithetic pairs (one draw for two samples) exist as the ``antithetic`` setting but change the estimator, so they
are not a free speed-up of the default single sample.

When: by default (``FEDBAYES_DRAW_AHEAD`` unset or ``auto``) for noise drawn on a CPU when a core is spare, i.e.
torch runs fewer intra-op threads than the process may use cores (a CUDA draw is an asynchronous kernel anyway).
Measured (``fedbayes bench engine``, 2 cores): with 1 torch thread it cuts an IVON step in the trainer by 0.4-0.9
ms; with 2 torch threads the draw competes with the matrix products and the step got slower (5.1 vs 4.4 ms), hence
the spare-core rule.  Commands that start several one-thread processes (``compare --jobs``, ``tune --jobs``,
``bench whatif --jobs``) call :func:`share_cores`, which switches it off when those processes fill the cores.
``FEDBAYES_DRAW_AHEAD=1`` / ``0`` force it on / off; it never changes a number.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["ahead_enabled", "run_ahead", "share_cores"]

T = TypeVar("T")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    """The process's one noise thread (one thread: draws run in the order they were asked for)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedbayes-noise")
        return _pool


def _forget_worker() -> None:
    """In a forked child the parent's worker thread does not exist: start a fresh one on first use."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_worker)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ahead_enabled(device: torch.device | str) -> bool:
    """Draw ahead for noise on ``device``: ``FEDBAYES_DRAW_AHEAD`` = 1 / 0 forces it; otherwise (``auto``) on for a
    CPU when torch's intra-op threads leave a core spare."""
    flag = os.environ.get("FEDBAYES_DRAW_AHEAD", "auto").strip().lower()
    if flag in ("0", "1"):
        return flag == "1" and torch.device(device).type == "cpu"
    if flag != "auto":
        raise ValueError(f"FEDBAYES_DRAW_AHEAD={flag!r}: expected 0, 1 or auto")
    return torch.device(device).type == "cpu" and torch.get_num_threads() < _cores()


def share_cores(processes: int, threads: int = 1) -> None:
    """Before starting ``processes`` workers of ``threads`` torch threads each: unless the user set
    ``FEDBAYES_DRAW_AHEAD``, set it to 0 when they fill the cores (no core is spare for the noise thread)."""
    if processes * threads >= _cores():
        os.environ.setdefault("FEDBAYES_DRAW_AHEAD", "0")


def run_ahead(jobs: Iterable[Callable[[], T]], enabled: bool = True) -> Iterator[T]:
    """Yield ``job()`` for each job in order; with ``enabled``, job i + 1 runs on the worker thread while the
    caller uses the result of job i (at most one job ahead, none beyond the last).  An exception raised by a job
    is raised here, at its turn.  Inline (``enabled=False``) the jobs run when their result is asked for."""
    it = iter(jobs)
    if not enabled:
        for job in it:
            yield job()
        return
    pool = _worker()
    first = next(it, None)
    if first is None:
        return
    pending: Future[T] = pool.submit(first)
    try:
        for job in it:
            result = pending.result()
            pending = pool.submit(job)
            yield result
        yield pending.result()
    finally:
        # a consumer that stops early (an error, a max-steps break) leaves no draw running on its generator
        if not pending.cancel():
            pending.exception()
