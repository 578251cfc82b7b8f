"""`ProcessRunner`: records finished in the shared worker process (`spectralscope.worker`), which appends the
rows of the groups it finishes to the store itself.

The hand-over. At its first record for the child, the runner commits the groups the child finishes and
releases them (`RunWriter.release`); the child attaches a writer of its own to them (`RunWriter.attach`). From
then on their rows are appended there, also the rows finished elsewhere (an ``append`` job). If the child dies,
the groups are written here again from their committed rows (`RunWriter.adopt`), and the rows it had
confirmed but not committed are counted lost; later records go to the fallback runner.

Order and safety. While the child starts (≈ 1–2 s, importing torch) records are finished inline, not queued:
a run killed in its first seconds loses no more than inline. Records stay in step order across runners: a
record for the fallback thread waits for the child's earlier ones, and the reverse. A killed training process
loses only the ≤ 2 records in flight: the child commits every row it measured when its parent is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..threads import lend_core, reclaim_core
from ..worker import WorkerProcess, can_pickle

log = logging.getLogger("spectralscope")


@dataclass(frozen=True)
class Job:
    """What the child is asked to do for a recorder: ``finish`` a record of ``group``, ``append`` a row of
    ``group`` finished elsewhere, ``flush`` (commit) or ``close`` (commit, trim, stop writing) its groups."""

    action: str
    group: str | None = None


class SetupFailed(RuntimeError):
    """A recorder's setup cannot work in the child (its store cannot be opened there): every later job of that
    recorder would fail too, so the recorder is told to finish its records elsewhere (``fatal``)."""

    fatal = True


class RecorderJobs:
    """What the worker process does for one recorder (its pickled setup): finish each group's records with
    ``finishers[group]`` (`Measurer`, `ActivationFinisher`, `GradientFinisher`, `SharpnessProbe`: each
    ``finish(payload) -> (row, problems)``) and append the rows of the groups the recorder handed over to the
    run store (``store``: `RunWriter.attach`'s arguments), so the training process's interpreter spends no time
    in Zarr for them."""

    def __init__(self, finishers: Mapping[str, Any], store: dict[str, Any] | None = None) -> None:
        self.finishers = dict(finishers)
        self.store = store
        self.writer: Any = None

    def _writer(self) -> Any:
        if self.writer is None and self.store is not None:
            from ..store import RunWriter

            try:  # at the first job: after the recorder released the groups
                self.writer = RunWriter.attach(**self.store)
            except Exception as exc:
                raise SetupFailed(f"could not open {self.store['path']} ({type(exc).__name__}: {exc})") from exc
        return self.writer

    def __call__(self, job: Job, step: int, payload: Any) -> tuple[Any, list]:
        writer = self._writer()
        if job.action == "append":
            writer.append(job.group, step, payload)
            return None, []
        if job.action in ("flush", "close"):
            if writer is not None:
                getattr(writer, job.action)()
            return None, []
        row, problems = self.finishers[job.group].finish(payload)
        if writer is not None and row is not None:
            writer.append(job.group, step, row)
        return row, problems

    def abandon(self) -> None:
        """The training process is gone: commit what was measured (the run stays "running", as it was left)."""
        if self.writer is not None:
            self.writer.flush(timeout=60)

    def forget(self) -> None:
        """The recorder let go of the child: a store it did not close (a recorder that fell back elsewhere)
        is committed and closed, so no writer thread outlives it here."""
        if self.writer is not None:
            self.writer.close()


class ProcessRunner:
    """Finishes the records of the groups in ``finishers`` (those the child can import: a finisher of
    ``__main__`` or a lambda stays here) in the worker process; ``inline`` finishes them while the child starts,
    ``fallback`` once it is gone or cannot take a record. ``writer`` and ``specs`` ({group: GroupSpec}) are the
    run's, for the hand-over. ``required``: warn (not just log) when the child cannot be had. ``process`` is
    None when it cannot be had."""

    def __init__(self, sink: Any, ledger: Any, writer: Any, specs: Mapping[str, Any], finishers: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None, fallback: Any, inline: Any, required: bool,
                 lend_core: bool = False) -> None:
        self.sink, self.ledger, self.writer, self.specs = sink, ledger, writer, dict(specs)
        self.lend_core = lend_core
        self.fallback, self.inline = fallback, inline
        self._fallback_name = "inline" if fallback is inline else "on a worker thread"
        # groups the child appends to, with their committed rows when handed over and the rows it has confirmed
        # since (to count what a dying child takes with it)
        self.handed: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self.child_closed = False
        self._pack_failed = False
        self._lock = threading.RLock()
        self._elsewhere: set[str] = set()  # groups of the child's that a record was finished here for
        self.groups = self._portable(finishers)
        self.process = self._start(storage_options, required)
        if self.process is not None:  # rows finished here of a group the child writes go to it, as append jobs
            for runner in {id(fallback): fallback, id(inline): inline}.values():
                runner.sink = self._sink_here

    def _portable(self, finishers: Mapping[str, Any]) -> dict[str, Any]:
        """The finishers the child can load; the others' records are finished here, which costs training time:
        said at once, with the way out."""
        out = {}
        for group, fin in finishers.items():
            why = can_pickle(fin)
            if why is None:
                out[group] = fin
            else:  # a lambda or a function of __main__ (an adapter's, a loss): a fresh interpreter cannot load it
                log.warning("spectralscope: %s records are finished %s, not in a worker process, and that costs "
                            "training time: %s. Define the adapter's functions (or the loss) with def in a module "
                            "your script imports, not in __main__ and not as lambdas, to have them measured there",
                            group, self._fallback_name if getattr(fin, "threadable", True) else "on the training thread",
                            why)
        return out

    def _start(self, storage_options: Mapping[str, Any] | None, required: bool) -> WorkerProcess | None:
        store = None
        if hasattr(self.writer, "release"):  # the child appends these groups' rows itself
            store = {"path": self.writer.path, "groups": [self.specs[g] for g in self.groups],
                     "flush_seconds": self.writer.flush_seconds, "chunk_steps": self.writer.chunk,
                     "storage_options": dict(storage_options) if storage_options else None}
        setup = RecorderJobs(self.groups, store)
        why = can_pickle(setup)
        if why is None:
            try:
                return WorkerProcess(setup, self._answered, self._lost)
            except OSError as exc:
                why = f"{type(exc).__name__}: {exc}"
        (log.warning if required else log.info)("spectralscope: records are measured %s, not in a worker process "
                                                 "(%s)", self._fallback_name, why)
        return None

    # ---- the runner ---------------------------------------------------------------------------------
    def finishes_elsewhere(self, group: str, finisher: Any) -> bool:
        if self.process is not None and group in self.groups:
            return True
        return self.fallback.finishes_elsewhere(group, finisher)

    def submit(self, group: str, step: int, payload: Any, finisher: Any, live: bool = False) -> None:
        proc = self.process
        if proc is not None and proc.ready and group in self.groups:
            behind = proc.busy  # the cycles training leaves it did not finish the last record
            if self._to_child(Job("finish", group), step, payload):
                if self.lend_core and behind:  # it measures on a core of its own, training on the others
                    lend_core()
                return
        if self.process is not None and not self.process.ready and group in self.groups:  # starting: here, not queued
            self.inline.submit(group, step, payload, finisher, live)
        else:  # the child is gone, could not take this record, or does not take this group
            if self.process is not None and group in self.groups:
                self._elsewhere.add(group)
            self.fallback.submit(group, step, payload, finisher, live)

    def _to_child(self, job: Job, step: int, payload: Any) -> bool:
        """Send a job to the child; False when it is gone or cannot take this one (the caller finishes it
        another way)."""
        proc = self.process
        if job.group in self._elsewhere:  # records stay in step order: the thread's earlier ones first
            self.fallback.flush()
        try:
            self._hand_over()
            if proc.submit(job, step, payload):
                return True
        except Exception as exc:  # no room for the copies, a tensor moved off the CPU: this record elsewhere
            if not self._pack_failed:
                log.warning("spectralscope: could not hand the record of step %d to the worker process (%s: %s); "
                            "measured %s (warned once)", step, type(exc).__name__, exc, self._fallback_name)
            self._pack_failed = True
            proc.join()  # after the child's earlier records
            return False
        log.warning("spectralscope: %s; records are measured %s from now on", proc.why_dead, self._fallback_name)
        self.process = None
        proc.close()  # lets the child stop once no recorder uses it
        self._take_back()
        return False

    def tick(self) -> None:
        """At each optimizer hook, on the training thread: the core lent to the child comes back once it has
        nothing in flight (`threads.reclaim_core`)."""
        proc = self.process
        reclaim_core(proc is not None and proc.alive and proc.busy)

    def flush(self) -> None:
        self.fallback.flush()  # first: its rows may go through the child
        if self.process is not None:
            self._child_job("flush")

    def close(self) -> None:
        self.fallback.flush()
        if self.process is not None:
            self._child_job("close")
            self.process.close()
        if self.handed and not self.child_closed:
            self._take_back()  # the child died: its groups are trimmed and counted here
        self.fallback.close()
        reclaim_core(False)

    # ---- the groups the child writes ------------------------------------------------------------------
    def _hand_over(self) -> None:
        """Before the first record goes to the child: commit the groups it finishes and let it append to them
        from now on."""
        if self.handed or self.process is None or not hasattr(self.writer, "release"):
            return
        names = list(self.groups)
        with self._lock:
            self.handed = self.writer.release(names)
            self._confirmed = dict.fromkeys(names, 0)

    def _take_back(self) -> None:
        """The child is gone: write its groups here again, from their committed rows, and count the rows it had
        confirmed but not committed as lost."""
        with self._lock:
            handed, self.handed = self.handed, {}
            if not handed:
                return
            try:
                committed = self.writer.adopt([self.specs[g] for g in handed])
            except Exception as exc:  # the store is unreachable: those groups get no more rows
                self.ledger.failed("optimizer", "*", exc)
                return
            for group, n0 in handed.items():
                for _ in range(max(0, n0 + self._confirmed.get(group, 0) - committed[group])):
                    self.ledger.lost(group, "lost: measured, not yet committed when the measuring process died")

    def _sink_here(self, group: str, step: int, row: Any, problems: list, stored: bool) -> None:
        """A row finished in this process: to the child, for a group it writes and while it lives; else here."""
        with self._lock:
            handed = group in self.handed
        proc = self.process
        if row is not None and not stored and handed and proc is not None:
            try:
                if proc.submit(Job("append", group), step, row):
                    stored = True
            except Exception as exc:  # while it lives, the group is its alone to write: this row is lost
                self.ledger.failed("optimizer", "*", exc, step)
                row = None
        if row is not None and not stored and handed:
            self._take_back()  # it died
        self.sink(group, step, row, problems, stored)

    def _child_job(self, action: str) -> None:
        """Wait for the child's records; with "flush" or "close", have it commit (and trim) the groups it writes,
        and wait for that too."""
        proc = self.process
        if self.handed and proc.alive:
            try:
                proc.submit(Job(action), 0, None)
            except Exception as exc:
                self.ledger.failed("optimizer", "*", exc)
        proc.join()

    # ---- answers (on the worker process's answering thread) ---------------------------------------------
    def _answered(self, job: Job, step: int, row: Any, problems: list) -> None:
        if job.action == "close":
            self.child_closed = True
        if job.action in ("flush", "close"):
            return
        with self._lock:
            if job.group in self._confirmed:
                self._confirmed[job.group] += 1
            stored = job.group in self.handed
        if job.action == "finish":
            self.sink(job.group, step, row, problems, stored)

    def _lost(self, job: Job, step: int, why: str) -> None:
        if job.action not in ("flush", "close"):
            self.ledger.lost(job.group, why, step)
