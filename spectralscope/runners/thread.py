"""`ThreadRunner`: records finished on a worker thread (``background="thread"``; ``True`` on an accelerator).

On a GPU the thread works on CUDA streams of its own, so the training thread never waits for a record's
device-to-host copies or LAPACK status checks: at submit, an event is recorded on the training stream after the
copies, and the thread's stream waits for it. On the CPU a thread shares the interpreter lock with training
(see `spectralscope.worker`): the worker process is the better runner there.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable
from typing import Any

import torch

from ..threads import one_blas_thread


def clone_tensors(payload: Any) -> Any:
    """``payload`` with every tensor in it (in lists, tuples, named tuples and dicts) replaced by a copy."""
    if isinstance(payload, torch.Tensor):
        return payload.detach().clone()
    if isinstance(payload, tuple) and hasattr(payload, "_fields"):
        return type(payload)(*(clone_tensors(v) for v in payload))
    if isinstance(payload, (list, tuple)):
        return type(payload)(clone_tensors(v) for v in payload)
    if isinstance(payload, dict):
        return {k: clone_tensors(v) for k, v in payload.items()}
    return payload


class ThreadRunner:
    """One worker thread, started at the first record, finishing records in the order they were submitted. The
    queue holds one record besides the one being finished: a thread that falls behind makes the training thread
    wait in `submit` rather than hold ever more copies. A ``live`` payload (tensors training changes in place)
    is copied at submit. A finisher that must not run beside training (``threadable = False``: the sharpness
    probe uses the live model) is run on the submitting thread, after the records before it."""

    def __init__(self, sink: Any, ledger: Any, devices: Iterable[torch.device], name: str) -> None:
        self.sink, self.ledger, self.name = sink, ledger, name
        self.devices = {torch.device(d) for d in devices}
        self._jobs: queue.Queue[tuple | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._streams: dict[torch.device, Any] = {}

    @property
    def started(self) -> bool:
        return self._thread is not None

    def finishes_elsewhere(self, group: str, finisher: Any) -> bool:
        return getattr(finisher, "threadable", True)

    def submit(self, group: str, step: int, payload: Any, finisher: Any, live: bool = False) -> None:
        if not getattr(finisher, "threadable", True):
            self.flush()  # records stay in step order
            self._finish(group, step, payload, finisher)
            return
        if live:
            with torch.no_grad():
                payload = clone_tensors(payload)
        ready = {}
        for dev in self.devices:  # the thread's stream waits for the copies made so far on the training stream
            if dev.type == "cuda":
                ready[dev] = torch.cuda.Event()
                ready[dev].record(torch.cuda.current_stream(dev))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"spectralscope-measure:{self.name}", daemon=True)
            self._thread.start()
        self._jobs.put((group, step, payload, finisher, ready))

    def _finish(self, group: str, step: int, payload: Any, finisher: Any) -> None:
        try:
            with torch.no_grad(), one_blas_thread():  # limits only on the training thread (see threads)
                row, problems = finisher.finish(payload)
        except Exception as exc:  # that record is lost, training goes on
            self.ledger.lost(group, f"failed ({type(exc).__name__}: {exc})", step)
            return
        self.sink(group, step, row, problems, False)

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                group, step, payload, finisher, ready = item
                with contextlib.ExitStack() as stack:
                    for dev, event in ready.items():
                        stream = self._streams.get(dev) or self._streams.setdefault(dev, torch.cuda.Stream(dev))
                        stream.wait_event(event)
                        stack.enter_context(torch.cuda.stream(stream))
                        # the copies were allocated on the training stream: nothing of ours may still read them
                        # when they are freed (after this job), even if the record failed half-way
                        stack.callback(stream.synchronize)
                    self._finish(group, step, payload, finisher)
            except Exception as exc:  # the sink itself failed: that record is lost
                self.ledger.lost(item[0] if item else "optimizer", f"failed ({type(exc).__name__}: {exc})")
            finally:
                item = payload = None  # the copies go now, not when the next job arrives
                self._jobs.task_done()

    def tick(self) -> None:
        pass

    def flush(self) -> None:
        if self._thread is not None:
            self._jobs.join()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.join()
            self._jobs.put(None)
            self._thread.join()
