"""The thread counts records run with: the BLAS pools held to one thread around a record finished in the training
process (and given back), the worker process at the lowest priority."""

from __future__ import annotations

import os
import threading
import time

import pytest
import threadpoolctl
import torch
from conftest import process_of
from torch import nn

import spectralscope as ss
from spectralscope import threads
from spectralscope.threads import WORKER_NICE, one_blas_thread


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """The user's setting: two BLAS threads (what OpenBLAS takes on this 2-core machine by default)."""
    if not _blas_threads():
        pytest.skip("no BLAS library threadpoolctl can see")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        yield


def test_one_blas_thread_holds_the_pools_and_gives_back_the_users_setting(two_blas_threads):
    assert set(_blas_threads()) == {2}
    with one_blas_thread():
        assert set(_blas_threads()) == {1}
        with one_blas_thread():  # nested: one limit
            assert set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {1}
    assert set(_blas_threads()) == {2}


def test_a_block_off_the_main_thread_leaves_the_pools_as_they_are(two_blas_threads):
    # OpenBLAS does not always take a size from another thread than the one that set the last: only the main
    # thread (training's, where inline records run) limits
    seen = []

    def other():
        with one_blas_thread():
            seen.append(_blas_threads())

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert [set(n) for n in seen] == [{2}] and set(_blas_threads()) == {2}


class _Spy(torch.optim.SGD):
    """SGD whose adapter's orthogonalisation notes the BLAS pools' size while the record is measured."""


SEEN: list[list[int]] = []


def _spy_orthogonalize(m, group):
    SEEN.append(_blas_threads())
    return ss.newton_schulz.newton_schulz(m, ss.NSConfig())


def test_a_record_on_the_training_thread_runs_on_one_blas_thread(tmp_path, two_blas_threads):
    ss.register_adapter(_Spy, momentum=lambda p, group, state: state.get("momentum_buffer"),
                        ns=lambda group: ss.NSConfig(), orthogonalize=_spy_orthogonalize)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = _Spy(model.parameters(), lr=0.1, momentum=0.9)
    SEEN.clear()
    with ss.watch(opt, model, tmp_path / "t.zarr", every=1, activations=None, background=False):
        for _ in range(3):
            model(torch.randn(5, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            assert set(_blas_threads()) == {2}  # training's own numpy keeps the user's setting between records
    assert SEEN and all(set(s) == {1} for s in SEEN)
    assert set(_blas_threads()) == {2}


def test_activations_summed_in_the_forward_pass_run_on_one_blas_thread(tmp_path, two_blas_threads, monkeypatch):
    # inline, the activation hooks add each input's xᵀx with SciPy's dsyrk inside training's forward pass: on two
    # BLAS threads, OpenBLAS's spinning pool slowed torch's own layers of that step about tenfold
    from spectralscope import covariance

    seen, add_gram = [], covariance._add_gram

    def spy(ss_, x):
        seen.append(_blas_threads())
        add_gram(ss_, x)

    monkeypatch.setattr(covariance, "_add_gram", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ss.watch(opt, model, tmp_path / "a.zarr", every=1, activations=ss.ActivationSpectra(every=1),
                  background=False) as rec:
        for _ in range(3):
            model(torch.randn(5, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            assert set(_blas_threads()) == {2}  # given back after each forward pass
    assert len(seen) >= 6 and all(set(s) == {1} for s in seen)
    assert rec.errors == {} or "act_eig" not in str(rec.errors)


def test_the_worker_process_runs_at_the_lowest_priority(tmp_path):
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ss.watch(opt, model, tmp_path / "n.zarr", every=1, activations=None) as rec:
        child = process_of(rec)
        assert child is not None and child.wait_ready(120)
        with open(f"/proc/{child.proc.pid}/stat") as f:
            nice = int(f.read().rsplit(")", 1)[1].split()[16])
    assert nice == max(WORKER_NICE, os.nice(0)) == 19


# ---- the core lent to the worker process ------------------------------------------------------------------


@pytest.fixture
def every_core():
    """torch on as many threads as there are usable cores (its default), given back after the test."""
    cores, before = threads.usable_cores(), torch.get_num_threads()
    if cores < 2:
        pytest.skip("one usable core: nothing to lend")
    torch.set_num_threads(cores)
    yield cores
    threads.reclaim_core(False)
    torch.set_num_threads(before)


def test_lend_core_gives_one_thread_up_and_reclaim_core_takes_it_back(every_core):
    threads.lend_core()
    assert torch.get_num_threads() == every_core - 1
    assert threads.training_threads() == every_core  # what the budget counts against: the user's setting
    threads.lend_core()  # lent already: no second core
    assert torch.get_num_threads() == every_core - 1
    threads.reclaim_core(busy=True)  # the child still measures
    assert torch.get_num_threads() == every_core - 1
    threads.reclaim_core(busy=False)
    assert torch.get_num_threads() == every_core == threads.training_threads()


def test_only_the_thread_that_lent_takes_the_core_back(every_core):
    # torch's pool size is a per-thread OpenMP setting: set from another thread it would not reach training's
    threads.lend_core()
    t = threading.Thread(target=threads.reclaim_core, args=(False,))
    t.start()
    t.join(10)
    assert torch.get_num_threads() == every_core - 1
    threads.reclaim_core(False)
    assert torch.get_num_threads() == every_core


def test_no_core_is_lent_when_one_is_free(every_core):
    torch.set_num_threads(every_core - 1)
    threads.lend_core()
    assert torch.get_num_threads() == every_core - 1
    threads.reclaim_core(False)
    assert torch.get_num_threads() == every_core - 1


def _train(model, opt, steps):
    for _ in range(steps):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()


class _SlowInTheWorker(torch.optim.SGD):
    """SGD whose record takes half a second a layer in the worker process (named functions: they travel there)."""


def _slow_orthogonalize(m, group):
    time.sleep(0.5)
    return ss.newton_schulz.newton_schulz(m, ss.NSConfig())


def _buffer(p, group, state):
    return state.get("momentum_buffer")


def _default_ns(group):
    return ss.NSConfig()


def _slow_run(tmp_path, name):
    ss.register_adapter(_SlowInTheWorker, momentum=_buffer, ns=_default_ns, orthogonalize=_slow_orthogonalize)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = _SlowInTheWorker(model.parameters(), lr=0.1, momentum=0.9)
    rec = ss.watch(opt, model, tmp_path / name, every=1, activations=None, overhead=None, lend_core=True)
    assert process_of(rec).wait_ready(120)
    return model, opt, rec


def test_training_lends_the_worker_process_a_core_once_it_falls_behind(tmp_path, every_core):
    model, opt, rec = _slow_run(tmp_path, "l.zarr")
    seen: list[int] = []
    opt.register_step_post_hook(lambda *a: seen.append(torch.get_num_threads()))  # after the recorder's hook
    with rec:
        _train(model, opt, 1)  # step 0: handed to an idle child, which keeps up: nothing lent
        assert seen == [every_core]
        _train(model, opt, 1)  # step 1: the child still measures step 0 (a second): a core is lent
        assert seen == [every_core, every_core - 1]
        rec.flush()  # the child has measured both
        _train(model, opt, 1)  # step 2: its first hook takes the core back, and the idle child keeps up
        assert seen == [every_core, every_core - 1, every_core]
        _train(model, opt, 1)  # step 3: behind again
        assert seen[-1] == every_core - 1
    assert torch.get_num_threads() == every_core  # closing takes it back
    assert list(ss.open_run(tmp_path / "l.zarr")["optimizer"]["step"].values) == [0, 1, 2, 3] and rec.errors == {}


def test_without_lend_core_no_core_is_lent(tmp_path, every_core):
    ss.register_adapter(_SlowInTheWorker, momentum=_buffer, ns=_default_ns, orthogonalize=_slow_orthogonalize)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = _SlowInTheWorker(model.parameters(), lr=0.1, momentum=0.9)
    with ss.watch(opt, model, tmp_path / "n.zarr", every=1, activations=None, overhead=None) as rec:
        assert process_of(rec).wait_ready(120)
        for _ in range(3):  # the child falls behind: still nothing lent
            _train(model, opt, 1)
            assert torch.get_num_threads() == every_core


def test_the_users_own_thread_count_set_during_a_loan_stays(tmp_path, every_core):
    model, opt, rec = _slow_run(tmp_path, "u.zarr")
    with rec:
        _train(model, opt, 2)  # step 1: lent
        assert torch.get_num_threads() == every_core - 1
        torch.set_num_threads(every_core + 1)  # the user's own choice, while the core is lent
        rec.flush()
        _train(model, opt, 1)  # step 2: not reset to the count before the loan
        assert torch.get_num_threads() == every_core + 1
        _train(model, opt, 1)  # step 3, behind: lent from the user's new count, down to one core fewer than all
        assert torch.get_num_threads() == every_core - 1
        rec.flush()
        _train(model, opt, 1)
        assert torch.get_num_threads() == every_core + 1
    assert torch.get_num_threads() == every_core + 1


def _gpt_params(tmp_path, watched: bool, fewer_at=(), **kw) -> list[torch.Tensor]:
    """A tiny GPT's parameters after 4 AdamW steps (torch on every core); ``fewer_at``: the steps trained on one
    thread fewer; ``watched``: under `watch` at its defaults with ``kw``, its worker process started first."""
    from spectralscope.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=64, width=16, depth=2, heads=2, ctx=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    cores = torch.get_num_threads()
    rec = ss.watch(opt, model, tmp_path / f"g{len(list(tmp_path.iterdir()))}.zarr", every=1, **kw) if watched else None
    if rec is not None:
        assert process_of(rec).wait_ready(120)
    for s in range(4):
        if s in fewer_at:
            torch.set_num_threads(cores - 1)
        model.loss(torch.randint(0, 64, (4, 17), generator=gen)).backward()
        torch.set_num_threads(cores)
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.close()
    return [p.detach().clone() for p in model.parameters()]


def test_a_watched_run_at_torchs_default_threads_trains_bit_for_bit_as_an_unwatched_one(tmp_path, every_core):
    # torch orders its float32 sums by its thread count: a step trained on fewer threads is another training. So
    # lending the worker process a core is not the default, and this would catch it if it became one.
    plain = _gpt_params(tmp_path, False)
    if all(torch.equal(a, b) for a, b in zip(plain, _gpt_params(tmp_path, False, fewer_at={1}), strict=True)):
        pytest.skip("this model trains the same on fewer threads here: the test could not see a core lent")
    watched = _gpt_params(tmp_path, True, activations=ss.ActivationSpectra(every=1), overhead=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
