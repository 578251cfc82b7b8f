"""The overhead budget: the policy on its own, then a run with a deliberately slow record."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

import spectralscope as ss
from spectralscope.budget import DEFAULT_OVERHEAD, MAX_STRETCH, MIN_WINDOW_SECONDS, Budget, next_stretch
from spectralscope.cli import info_text


def test_the_stretch_doubles_over_budget_and_relaxes_under_a_quarter_of_it():
    assert next_stretch(1, 0.05, 0.02) == 2 and next_stretch(8, 0.021, 0.02) == 16
    assert next_stretch(8, 0.019, 0.02) == 8 and next_stretch(8, 0.006, 0.02) == 8  # within: kept
    assert next_stretch(8, 0.004, 0.02) == 4 and next_stretch(1, 0.0, 0.02) == 1  # never below the user's
    assert next_stretch(8, 0.004, 0.02, run_share=0.03) == 8  # not while the run as a whole is over
    assert next_stretch(MAX_STRETCH, 1.0, 0.02) == MAX_STRETCH


def test_a_budget_accounts_its_windows():
    b = Budget(0.1)
    b.spend(0.3)
    assert b.decide(10, 1.0) == 2 and b.changes == [(10, 2)] and np.isnan(b.settled_share)
    b.spend(0.05)
    assert b.decide(20, 1.0) == 2 and b.settled_share == pytest.approx(0.05)
    assert b.share == pytest.approx(0.35 / 2)


def test_watch_checks_the_budget():
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, 1, -0.1, "0.02", True):
        with pytest.raises((TypeError, ValueError), match="overhead must be a share of training time in"):
            ss.watch(opt, model, "unused.zarr", overhead=bad)


class _Slow(torch.optim.SGD):
    """SGD whose record takes 10 ms a layer more than it should (its adapter's NS), on the training thread."""


def _slow_orthogonalize(m, group):
    time.sleep(0.01)
    return ss.newton_schulz.newton_schulz(m, ss.NSConfig())


def test_a_slow_record_is_stretched_until_recording_fits_the_budget(tmp_path):
    # wall-clock costs made of sleeps, so that a busy machine moves them little: a step of 5 ms, records of two
    # layers at 10 ms each every 2 steps. A window of 2·2·s steps holds 2 records: share ≈ 40 ms / (20·s ms), within
    # 0.1 from s = 32 on (≈ 0.06, more on a busy machine, where the records CPU work takes longer)
    ss.register_adapter(_Slow, momentum=lambda p, group, state: state.get("momentum_buffer"),
                        ns=lambda group: ss.NSConfig(), orthogonalize=_slow_orthogonalize)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = _Slow(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 8)
    budget, every = 0.1, 2
    with ss.watch(opt, model, tmp_path / "b.zarr", every=every, activations=ss.ActivationSpectra(every=4, max_tokens=32),
                  background=False, overhead=budget) as rec:
        # at least 1600 steps, then until a window has ended since the stretch last changed (on a busy machine the
        # last change comes later, and its windows, of at least a second, take longer): at most 6400
        for i in range(6400):
            time.sleep(0.005)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if i >= 1600 and i % 100 == 0 and isinstance(rec.overhead_report()["settled_share"], float):
                break
    tree = ss.open_run(rec.path)
    report = tree.attrs["overhead"]
    assert report["budget"] == budget and tree.attrs["every"] == every  # the user's cadence is kept as given
    stretch = report["stretch"]
    assert 16 <= stretch < MAX_STRETCH, report  # stretched (by more on a busy machine), and it settled
    assert report["cadence"] == {"optimizer": every * stretch, "activations": 4 * stretch}
    # every window since the last change was within the budget
    assert isinstance(report["settled_share"], float) and report["settled_share"] <= budget, report
    assert report["changes"] and report["changes"][-1][1] == stretch
    # the stored steps show the cadence: the user's every at first, the stretched one after the last change
    steps = tree["optimizer"]["step"].values
    last_change = report["changes"][-1][0]
    assert steps[0] == 0 and steps[1] == every
    after = steps[steps > last_change]
    assert len(after) >= 2 and set(np.diff(after)) == {every * stretch}, (steps, report)
    assert all(s % every == 0 for s in steps) and rec.errors == {}
    text = info_text(rec.path)
    assert "overhead   budget 10.00% of training time" in text and f"cadence x{stretch}" in text


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _busy_orthogonalize(m, group):
    _spin(0.01)  # CPU, not a sleep: what the budget counts of the worker process is its CPU time
    return ss.newton_schulz.newton_schulz(m, ss.NSConfig())


def _buffer(p, group, state):
    return state.get("momentum_buffer")


def _default_ns(group):
    return ss.NSConfig()


class _BusyInTheWorker(torch.optim.SGD):
    """SGD whose record costs 10 ms of CPU a layer in the worker process (named functions: it travels there)."""


def test_the_worker_processs_cpu_counts_when_training_takes_every_core(tmp_path, caplog):
    import os

    ss.register_adapter(_BusyInTheWorker, momentum=_buffer, ns=_default_ns, orthogonalize=_busy_orthogonalize)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # no core to spare: the worker's cycles are training's
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        opt = _BusyInTheWorker(model.parameters(), lr=0.01, momentum=0.9)
        with ss.watch(opt, model, tmp_path / "w.zarr", every=2, activations=None, overhead=0.1) as rec:
            assert rec.runner.process is not None and rec.runner.process.wait_ready(120)
            for _ in range(1600):
                time.sleep(0.005)  # the training thread is idle: only the worker's CPU can be over budget
                model(torch.randn(32, 8)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    report = ss.open_run(rec.path).attrs["overhead"]
    assert 16 <= report["stretch"] < MAX_STRETCH, report
    assert isinstance(report["settled_share"], float) and report["settled_share"] <= 0.1, report
    assert "measured in the training process" not in caplog.text and rec.errors == {}


def test_without_a_budget_the_cadence_is_the_users(tmp_path):
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ss.watch(opt, model, tmp_path / "n.zarr", every=3, activations=None, background=False, overhead=None) as rec:
        for _ in range(30):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    tree = ss.open_run(rec.path)
    assert "overhead" not in tree.attrs and list(tree["optimizer"]["step"].values) == list(range(0, 30, 3))


def test_the_default_is_a_two_percent_budget_whose_windows_last_a_second(tmp_path):
    # a record costs far more than 2% of these 1 ms steps, yet windows shorter than MIN_WINDOW_SECONDS decide nothing:
    # a run this short keeps the user's cadence
    assert DEFAULT_OVERHEAD == 0.02 and MIN_WINDOW_SECONDS == 1.0
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = time.perf_counter()
    with ss.watch(opt, model, tmp_path / "d.zarr", every=2, activations=None, background=False) as rec:
        for _ in range(40):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    if time.perf_counter() - start >= 2 * MIN_WINDOW_SECONDS:  # the first window starts at step 4: one could end
        pytest.skip("the machine was too slow for a run this short to stay under one window")
    report = ss.open_run(rec.path).attrs["overhead"]
    assert report["budget"] == DEFAULT_OVERHEAD and report["stretch"] == 1 and report["changes"] == []
    assert report["cadence"] == {"optimizer": 2} and report["achieved"] == "nan"  # no window has ended
    assert list(ss.open_run(rec.path)["optimizer"]["step"].values) == list(range(0, 40, 2))
