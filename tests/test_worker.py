from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from spectralscope import worker


def _describe(payload: dict) -> tuple[dict, list]:
    """A child's job: every tensor of the payload back as float64 values, with its dtype and shape."""
    row = {name: t.to(torch.float64).numpy().copy() for name, t in payload["tensors"].items()}
    problems = [(name, str(t.dtype), str(tuple(t.shape))) for name, t in payload["tensors"].items()]
    row["extra"] = np.array([payload["extra"]["lr"]])
    return row, problems


def _fail_on_negative(payload: int) -> tuple[dict, list]:
    if payload < 0:
        raise ValueError(f"negative job {payload}")
    return {"x": np.array([payload])}, []


class _Finisher:
    """A finisher as the recorder's instruments have them: ``finish(payload) -> (row, problems)``."""

    def finish(self, payload: int) -> tuple[dict, list]:
        return _fail_on_negative(payload)


class _Answers:
    def __init__(self) -> None:
        self.results: list = []
        self.lost: list = []
        self.done = threading.Event()

    def result(self, kind, step, row, problems):
        self.results.append((kind, step, row, problems))

    def lose(self, kind, step, why):
        self.lost.append((kind, step, why))


def _leftovers() -> list[str]:
    return glob.glob(os.path.join(worker._shm_dir(), f"spectralscope-{os.getpid()}-*"))


def test_tensors_reach_the_child_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=gen)
    tensors = {
        "f32": base,
        "transposed": base.T,  # not contiguous
        "bf16": torch.randn(3, 9, generator=gen).to(torch.bfloat16),
        "f64": torch.randn(4, dtype=torch.float64, generator=gen),
        "int64": torch.arange(-5, 6),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
    }
    answers = _Answers()
    proc = worker.WorkerProcess({"describe": _describe}, answers.result, answers.lose)
    assert proc.submit("describe", 3, {"tensors": tensors, "extra": {"lr": 0.02}})
    proc.close()
    assert answers.lost == [] and len(answers.results) == 1
    kind, step, row, problems = answers.results[0]
    assert (kind, step) == ("describe", 3)
    for name, t in tensors.items():
        np.testing.assert_array_equal(row[name], t.detach().to(torch.float64).numpy(), err_msg=name)
    assert dict((n, (d, s)) for n, d, s in problems) == {
        n: (str(t.dtype), str(tuple(t.shape))) for n, t in tensors.items()}
    assert row["extra"][0] == 0.02
    worker.shutdown()
    assert proc.proc.returncode == 0 and _leftovers() == []


def test_a_failing_job_is_reported_and_the_next_ones_answered():
    answers = _Answers()
    proc = worker.WorkerProcess({"job": _fail_on_negative}, answers.result, answers.lose)
    for step, x in enumerate([1, -2, 3]):
        assert proc.submit("job", step, x)
    proc.close()
    assert [(s, int(r["x"][0])) for _, s, r, _ in answers.results] == [(0, 1), (2, 3)]
    assert answers.lost == [("job", 1, "failed (ValueError: negative job -2)")]


def test_a_killed_child_loses_only_the_jobs_in_flight_and_never_blocks():
    answers = _Answers()
    proc = worker.WorkerProcess({"job": _fail_on_negative}, answers.result, answers.lose)
    assert proc.submit("job", 0, 5)
    proc.join()
    os.kill(proc.proc.pid, signal.SIGSTOP)  # held: the next jobs wait in flight
    assert proc.submit("job", 1, 6)
    assert proc.submit("job", 2, 7)
    os.kill(proc.proc.pid, signal.SIGKILL)
    assert not proc.submit("job", 3, 8)  # waits for a free slot, then learns the child is gone
    proc.close()
    assert [s for _, s, _, _ in answers.results] == [0]
    assert [(s, why.startswith("lost: the measuring process exited with code -9")) for _, s, why in answers.lost] == [
        (1, True), (2, True)]
    assert not proc.alive and _leftovers() == []


def test_lost_jobs_are_counted_before_close_returns():
    # close() returns only once the recorder has been told of every job: a lost one's callback that takes a
    # while (a loaded machine) is still waited for, so a closed run never under-counts its errors
    answers = _Answers()

    def slow_lose(kind, step, why):
        time.sleep(0.3)
        answers.lose(kind, step, why)

    proc = worker.WorkerProcess({"job": _fail_on_negative}, answers.result, slow_lose)
    assert proc.submit("job", 0, 5)
    proc.join()
    os.kill(proc.proc.pid, signal.SIGSTOP)
    assert proc.submit("job", 1, 6) and proc.submit("job", 2, 7)
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.close()
    assert [s for _, s, _ in answers.lost] == [1, 2]


@pytest.mark.parametrize("linger", [0.0, 3.0])
def test_a_run_closed_at_once_or_ended_leaves_the_worker_process_quiet(tmp_path, linger):
    # a recorder closed right away (the child still starting, ≈ 1–2 s) and an interpreter that exits then,
    # or a bit later: the child finds its parent gone and ends without a word on the shared stderr
    script = tmp_path / "quick.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import torch
        from torch import nn
        import spectralscope as ss
        model = nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with ss.watch(opt, model, {str(tmp_path / "r.zarr")!r}, every=1) as rec:
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
        time.sleep({linger})
        print("done", flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "done\n"
    assert out.stderr == "", out.stderr


def test_functions_of_main_cannot_be_handed_over():
    def local(group):
        return None

    assert worker.can_pickle({"job": _fail_on_negative}) is None
    assert "local" in worker.can_pickle({"job": local})  # no name to import it by
    local.__module__, local.__qualname__ = "__main__", "local"
    assert "__main__" in worker.can_pickle({"job": local})
    proc = worker.WorkerProcess({"job": _fail_on_negative}, print, print)
    with pytest.raises(ValueError, match="CPU tensors only"):
        proc.submit("job", 0, torch.ones(2, device="meta"))
    proc.close()
    worker.shutdown()
    assert proc.proc.returncode == 0


def test_recorders_share_one_child_which_stops_when_idle(monkeypatch):
    monkeypatch.setattr(worker, "IDLE_SECONDS", 0.5)
    a, b = _Answers(), _Answers()
    first = worker.WorkerProcess({"job": _fail_on_negative}, a.result, a.lose)
    second = worker.WorkerProcess({"job": _describe}, b.result, b.lose)
    assert first.proc is second.proc  # one interpreter's start-up, not one per recorder
    assert first.submit("job", 0, 4) and second.submit("job", 0, {"tensors": {"w": torch.ones(2)}, "extra": {"lr": 1}})
    first.close()
    assert not first.alive and first.proc.poll() is None  # the other recorder still uses it
    assert second.submit("job", 1, {"tensors": {}, "extra": {"lr": 2}})
    second.close()
    assert [int(r["x"][0]) for _, _, r, _ in a.results] == [4]
    assert [int(r["extra"][0]) for _, _, r, _ in b.results] == [1, 2]
    assert second.proc.wait(timeout=30) == 0  # stopped after IDLE_SECONDS with no recorder left
    third = worker.WorkerProcess({"job": _fail_on_negative}, a.result, a.lose)
    assert third.proc is not first.proc and third.submit("job", 1, 5)  # a fresh one
    third.close()
    worker.shutdown()
    assert [int(r["x"][0]) for _, _, r, _ in a.results] == [4, 5] and third.proc.returncode == 0


def test_a_setup_the_child_cannot_import_is_reported_and_the_recorder_told(tmp_path, monkeypatch):
    a = _Answers()
    first = worker.WorkerProcess({"job": _fail_on_negative}, a.result, a.lose)  # the child starts now
    (tmp_path / "late_module.py").write_text("def job(payload):\n    return {}, []\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, not in the child started before
    from late_module import job

    b = _Answers()
    late = worker.WorkerProcess({"job": job}, b.result, b.lose)
    assert late.submit("job", 0, 1)
    late.join()
    assert b.results == [] and len(b.lost) == 1 and "could not load the recorder's setup" in b.lost[0][2]
    assert not late.alive and not late.submit("job", 1, 1)  # the recorder measures elsewhere from now on
    assert first.submit("job", 0, 3)  # the child itself is fine
    late.close()
    first.close()
    worker.shutdown()
    assert [int(r["x"][0]) for _, _, r, _ in a.results] == [3]


def test_a_store_the_child_cannot_open_sends_the_recorder_elsewhere(tmp_path):
    # the groups were handed over, but the child cannot open the run (here: it was removed): the job is
    # reported lost and the recorder told at once, instead of every later record failing the same way
    from spectralscope.store import GroupSpec

    spec = GroupSpec("optimizer", {}, {"x": ("step",)})
    store = {"path": str(tmp_path / "gone.zarr"), "groups": [spec], "flush_seconds": 5.0, "chunk_steps": 256,
             "storage_options": None}
    from spectralscope.runners.process import Job, RecorderJobs

    a = _Answers()
    proc = worker.WorkerProcess(RecorderJobs({"optimizer": _Finisher()}, store), a.result, a.lose)
    assert proc.submit(Job("finish", "optimizer"), 0, 1)
    proc.join()
    assert a.results == [] and len(a.lost) == 1
    assert "SetupFailed" in a.lost[0][2] and "gone.zarr" in a.lost[0][2]
    assert not proc.alive and not proc.submit(Job("finish", "optimizer"), 1, 1)
    proc.close()
