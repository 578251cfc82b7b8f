"""Where a record is finished: the runners behind ``watch(background=...)``.

A record is taken on the training thread (an instrument's ``take``) and handed to the recorder's runner with
``submit(group, step, payload, finisher, live)``; the runner calls ``finisher.finish(payload) -> (row,
problems)`` somewhere and gives the result to the recorder's sink ``(group, step, row, problems, stored)``
(``stored``: the row is in the store already, appended by the worker process). ``tick()`` is called on the
training thread at every optimizer hook (the worker process's runner takes back the core it lent there).
``flush()`` returns once every record submitted so far is finished, handed over and, where another process
writes, committed; ``close()`` also stops what the runner started. Record order, copies, loss accounting and
kill safety are the runner's:

- `InlineRunner` (``background=False``): on the training thread, at once;
- `ThreadRunner` (``"thread"``; ``True`` on an accelerator): a worker thread with its own CUDA streams;
- `ProcessRunner` (``"process"``; ``"auto"`` and ``True`` on the CPU): the shared worker process, which appends
  the rows of the groups it measures to the store itself; while it starts, records are finished inline, and
  when it is gone, by its fallback (inline for ``"auto"``, a thread otherwise).

`make_runner` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .inline import InlineRunner
from .process import ProcessRunner
from .thread import ThreadRunner

#: (group, step, row or None, problems, stored): what a runner hands back for every finished record
Sink = Callable[[str, int, Any, list, bool], None]


class Runner(Protocol):
    def submit(self, group: str, step: int, payload: Any, finisher: Any, live: bool = False) -> None: ...

    def finishes_elsewhere(self, group: str, finisher: Any) -> bool: ...

    def tick(self) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def make_runner(background: bool | str, *, on_cpu: bool, distributed: bool, inline_only: bool, sink: Sink,
                ledger: Any, devices: set, writer: Any, specs: Mapping[str, Any], finishers: Mapping[str, Any],
                storage_options: Mapping[str, Any] | None, name: str, lend_core: bool = False) -> Runner:
    """The runner for ``watch(background=...)``: ``inline_only`` (FSDP2's gathers, a rank that does not write)
    and False → inline; "auto" → the worker process on the CPU outside torch.distributed (inline while it
    starts and once it is gone), else inline; True → the worker process on the CPU (a thread when it cannot be
    had or dies), a thread elsewhere; "thread" → a thread; "process" → the worker process (warned when it
    cannot be had). ``lend_core``: training lends the worker process a core while it measures
    (`threads.lend_core`)."""
    inline = InlineRunner(sink, ledger)
    if inline_only or background is False:
        return inline
    if background == "auto":
        if not on_cpu or distributed:
            return inline
        runner = ProcessRunner(sink, ledger, writer, specs, finishers, storage_options, fallback=inline,
                               inline=inline, required=False, lend_core=lend_core)
        return runner if runner.process is not None else inline
    thread = ThreadRunner(sink, ledger, devices, name)
    if background == "thread" or not on_cpu:
        return thread
    runner = ProcessRunner(sink, ledger, writer, specs, finishers, storage_options, fallback=thread, inline=inline,
                           required=background == "process", lend_core=lend_core)
    return runner if runner.process is not None else thread


__all__ = ["InlineRunner", "ProcessRunner", "Runner", "Sink", "ThreadRunner", "make_runner"]
