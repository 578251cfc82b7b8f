"""The thread counts records run with: the BLAS pools held to one thread around a record finished in the training
process (and given back), the worker process at the lowest priority."""

from __future__ import annotations

import os
import threading

import pytest
import threadpoolctl
import torch
from conftest import process_of
from torch import nn

import spectralscope as ss
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
