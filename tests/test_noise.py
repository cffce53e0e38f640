"""Noise drawn ahead on a worker thread (fedbayes.noise): the same draws, in the same order, none beyond the plan."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from fedbayes.gaussian import DiagGaussian
from fedbayes.ivon import IVON
from fedbayes.noise import ahead_enabled, run_ahead, share_cores


def test_run_ahead_yields_in_order_on_the_worker_and_never_beyond_the_last_job() -> None:
    calls: list[int] = []
    threads: set[str] = set()

    def job(i: int):  # type: ignore[no-untyped-def]
        def f() -> int:
            calls.append(i)
            threads.add(threading.current_thread().name)
            return i * i
        return f

    assert list(run_ahead(job(i) for i in range(6))) == [0, 1, 4, 9, 16, 25]
    assert calls == list(range(6)) and threads == {t for t in threads if t.startswith("fedbayes-noise")}
    calls.clear()
    it = run_ahead(job(i) for i in range(6))
    assert next(it) == 0
    assert calls == [0, 1] or calls == [0]  # job 1 is submitted once job 0 is taken, never job 2
    it.close()  # an early stop waits for (or cancels) the pending job and submits nothing more
    assert calls in ([0], [0, 1])
    assert list(run_ahead([])) == []
    assert [f() for f in [job(3)]] == list(run_ahead([job(3)], enabled=False))


def test_run_ahead_raises_a_jobs_error_at_its_turn() -> None:
    def bad() -> int:
        raise FloatingPointError("job 2 failed")

    it = run_ahead([lambda: 1, lambda: 2, bad, lambda: 4])
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(FloatingPointError, match="job 2 failed"):
        next(it)


def test_ahead_on_a_cpu_with_a_spare_core_or_as_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedbayes.noise as noise

    monkeypatch.delenv("FEDBAYES_DRAW_AHEAD", raising=False)
    monkeypatch.setattr(noise, "_cores", lambda: 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ahead_enabled("cpu") and not ahead_enabled("cuda")
        torch.set_num_threads(2)  # torch's threads use every core: no spare one for the noise thread
        assert not ahead_enabled("cpu")
        monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", "1")
        assert ahead_enabled("cpu") and not ahead_enabled("cuda")
        monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", "0")
        torch.set_num_threads(1)
        assert not ahead_enabled("cpu")
        monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", "yes")
        with pytest.raises(ValueError, match="FEDBAYES_DRAW_AHEAD='yes'"):
            ahead_enabled("cpu")
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv("FEDBAYES_DRAW_AHEAD")
    share_cores(1)  # one one-thread worker leaves a core spare: nothing set
    assert "FEDBAYES_DRAW_AHEAD" not in os.environ
    share_cores(2)  # two fill both cores
    assert os.environ["FEDBAYES_DRAW_AHEAD"] == "0"
    monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", "1")
    share_cores(4)  # the user's choice stands
    assert os.environ["FEDBAYES_DRAW_AHEAD"] == "1"


def _train(plan: int | None, antithetic: bool, samples: int, steps: int = 7) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(5)
    # two parameter groups: one draw job covers every group, in group order
    ps = list(model.parameters())
    opt = IVON([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.05, ess=32.0, hess_init=0.3, beta2=0.99,
               mc_samples=samples, antithetic=antithetic, generator=gen)
    if plan is not None:
        opt.plan_draws(plan if plan >= 0 else steps * opt.draws_per_step())
        assert opt._ahead is not None  # the plan is taken (FEDBAYES_DRAW_AHEAD=1)
    for _ in range(steps):
        for _ in range(samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], gen.get_state()


@pytest.mark.parametrize("antithetic,samples", [(False, 1), (False, 3), (True, 3), (True, 2)])
def test_ivon_drawing_ahead_is_bit_identical_and_leaves_the_generator_where_inline_does(
        antithetic: bool, samples: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", "1")
    ref, ref_state = _train(None, antithetic, samples)
    for plan in (-1, 3):  # the exact plan; a plan shorter than the run (the rest is drawn inline)
        got, state = _train(plan, antithetic, samples)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
        assert torch.equal(state, ref_state)
    assert IVON([torch.nn.Parameter(torch.ones(2))], lr=0.1, ess=1.0, mc_samples=3,
                antithetic=True).draws_per_step() == 2


def _small_model_and_prior() -> tuple[torch.nn.Module, DiagGaussian]:
    """A 6-8-3 MLP and a zero-mean prior of precision 0.5 on its weights."""
    from fedbayes.models import build_model

    model = build_model("mlp", 6, 3, seed=0, hidden=(8,))
    named = {k: v.detach() for k, v in model.named_parameters()}
    prior = DiagGaussian.from_mean_prec({k: torch.zeros_like(v) for k, v in named.items()},
                                        {k: torch.full_like(v, 0.5) for k, v in named.items()})
    return model, prior


def test_train_local_same_numbers_with_and_without_drawing_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedbayes.ivon
    from fedbayes.local import LocalSettings, train_local

    planned: list[int] = []

    def spy(jobs, enabled=True):  # type: ignore[no-untyped-def]
        jobs = list(jobs)
        planned.append(len(jobs) if enabled else -1)
        return run_ahead(jobs, enabled)

    monkeypatch.setattr(fedbayes.ivon, "run_ahead", spy)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(4))
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", flag)
        model, prior = _small_model_and_prior()
        s = LocalSettings.model_validate({"mode": "ivon", "epochs": 3, "batch_size": 16, "lr": 0.05, "seed": 9,
                                          "hess_init": 0.2, "max_steps": 10, "mc_samples": 2})
        outs.append(train_local(model, prior, x, y, s))
    a, b = outs
    assert planned == [10 * 2]  # drawn ahead under "1" (max-steps 10 × 2 samples), plan refused under "0"
    assert all(torch.equal(a.mean[k], b.mean[k]) for k in a.mean)
    assert a.site is not None and b.site is not None
    assert all(torch.equal(a.site.eta[k], b.site.eta[k]) for k in a.site.eta)


def test_train_batched_same_numbers_with_and_without_drawing_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedbayes.batched
    from fedbayes.batched import train_batched
    from fedbayes.local import LocalSettings

    enabled: list[bool] = []

    def spy(jobs, on=True):  # type: ignore[no-untyped-def]
        enabled.append(on)
        return run_ahead(jobs, on)

    monkeypatch.setattr(fedbayes.batched, "run_ahead", spy)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (20, 50, 35)]
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FEDBAYES_DRAW_AHEAD", flag)
        model, prior = _small_model_and_prior()
        specs = [(prior, x, y, LocalSettings.model_validate(
            {"mode": "ivon", "epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 9 + i, "hess_init": 0.2,
             "mc_samples": 3, "antithetic": True}), None, None) for i, (x, y) in enumerate(data)]
        outs.append(train_batched(model, specs))
    assert enabled == [True, False]
    for a, b in zip(*outs, strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception)
        assert all(torch.equal(a.mean[k], b.mean[k]) for k in a.mean)
        assert a.site is not None and b.site is not None
        assert all(torch.equal(a.site.prec[k], b.site.prec[k]) for k in a.site.prec)


def test_a_forked_child_gets_a_worker_of_its_own() -> None:
    import multiprocessing as mp

    assert list(run_ahead([lambda: 1, lambda: 2])) == [1, 2]  # the parent's worker exists now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:  # the child's draws would hang on the parent's (absent) thread without a fresh one
        assert pool.apply_async(_draws_in_child).get(timeout=60) == [0, 1, 4]


def _draws_in_child() -> list[int]:
    return list(run_ahead([(lambda i=i: i * i) for i in range(3)]))
