from __future__ import annotations

import glob
import os
import signal
import threading

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
    assert proc.proc.returncode == 0
