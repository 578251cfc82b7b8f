"""Measuring in a worker process: ``watch(background=True)`` for parameters on the CPU.

A worker *thread* shares the interpreter lock with training. Each time a training step's small torch
operation returns, the training thread must take the lock back, and while the worker runs Python or a
LAPACK wrapper that keeps the lock (SciPy's ``dsytrd``/``dsyrk`` do), it waits up to the interpreter's
switch interval per operation: a thread measuring records slows a training loop of small operations down
several-fold, a process hardly at all (`benchmarks/contention.py`; the figures are in docs/benchmarks.md). So
on the CPU the records are finished by a child process (`serve`, in a fresh interpreter with one BLAS
thread), shared by every recorder of the training process, with the same finishers' state each recorder
would have used inline — the rows are bit for bit the inline ones. `spectralscope.runners.process` is the
recorder's side of it (the hand-over of the groups the child writes, `RecorderJobs`).

The training thread's part of a job is a copy: every CPU tensor in the job (M, W_after, W_before, the
activation rows, a sharpness probe's parameters and buffers) is copied into one shared-memory file
(``/dev/shm``, else the temp folder; its space is reserved up front, so a full tmpfs fails the job
instead of killing training with SIGBUS), and a small message naming the file and where each tensor lies
goes down a socket. The child maps the file, removes its name, measures, appends the row to the run store
itself (`RecorderJobs`: the recorder hands it the groups it measures, so the training process's
interpreter spends no time in Zarr for them), and sends back the row and the metrics that came out NaN.
At most ``MAX_PENDING`` jobs per recorder are in flight: a child that falls behind makes the training
thread wait rather than hold ever more copies. If the child dies, the jobs in flight are reported lost
and the recorders go on without it. The child stops ``IDLE_SECONDS`` after its last recorder closed; when
the training process goes away it measures the jobs already sent, commits every row and exits."""

from __future__ import annotations

import io
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from .threads import WORKER_NICE

log = logging.getLogger("spectralscope")

#: Jobs sent and not yet answered, at most (one being measured, one waiting).
MAX_PENDING = 2
_ALIGN = 64


def _shm_dir() -> str:
    d = "/dev/shm"
    return d if os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()


# ---- the training process's side ------------------------------------------------------------------
class _Packer(pickle.Pickler):
    """Pickles a job with every tensor replaced by its place in the shared file (filled in afterwards)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[tuple[int, torch.Tensor]] = []
        self.size = 0

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        if obj.device.type != "cpu":
            raise ValueError(f"a worker process measures CPU tensors only, got one on {obj.device}")
        t = obj.detach()
        offset = -(-self.size // _ALIGN) * _ALIGN
        self.tensors.append((offset, t))
        self.size = offset + t.numel() * t.element_size()
        return (offset, t.dtype, tuple(t.shape))


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = torch.Size(shape).numel() * dtype.itemsize
    return buf[offset:offset + n].view(dtype).view(shape)


def _write_shared(path: str, size: int, tensors: list[tuple[int, torch.Tensor]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # ENOSPC here, not SIGBUS at the first write into a full tmpfs
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    for offset, t in tensors:
        _view(buf, offset, t.dtype, tuple(t.shape)).copy_(t)
    del buf  # the mapping goes with the last view of it


def stat_cpu_seconds(path: str) -> float | None:
    """utime + stime in seconds from a /proc ``stat`` file (a process's or a thread's), None if it cannot be read
    (gone, or no /proc)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Child:
    """The worker process, shared by every recorder of this training process, and the thread that reads
    its answers and hands each to the recorder that sent the job."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # the child uses one core: the one training leaves idle
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what the parent imports, the child can
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from spectralscope.worker import serve; serve({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            theirs.close()
        self.pid = os.getpid()  # a forked copy of the training process must not use this child
        self.conn = Connection(ours.detach())
        self.ids = itertools.count()
        self.routes: dict[int, WorkerProcess] = {}  # job id → the client that sent it
        self.clients: set[WorkerProcess] = set()
        self.alive = True
        self.why_dead = ""
        self.ready = threading.Event()  # set when the child has imported what it measures with
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._idle: threading.Timer | None = None
        self._receiver = threading.Thread(target=self._receive, name="spectralscope-worker-answers", daemon=True)
        self._receiver.start()

    def send(self, msg: Any) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError) as exc:
                code = self.proc.poll()
                if code is None:
                    try:
                        code = self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        code = None
                self._died(f"exited with code {code}" if code is not None else f"stopped answering ({exc!r})")
                return
            if msg is None:  # the answer to `stop`
                return
            if msg == "ready":
                self.ready.set()
                continue
            job, row, problems, error, fatal = msg
            with self._lock:
                client = self.routes.pop(job, None)
            if client is not None:
                client._answer(job, row, problems, error, fatal)

    def _died(self, why: str) -> None:
        with self._lock:
            if not self.alive:
                return
            self.alive = False
            self.why_dead = f"the measuring process {why}"
            clients = list(self.clients)
            self.routes.clear()
        self.ready.set()  # nothing to wait for any more: the clients find out it is gone
        for client in clients:
            client._died(self.why_dead)

    def stop(self) -> None:
        """Tell the child to finish and wait for it (every client has detached)."""
        if self.alive:
            try:
                self.send(None)
            except OSError:
                pass
        self._receiver.join(timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.alive = False
        self.conn.close()


#: The shared worker process stops this long after its last recorder closed (a sweep's next run reuses it).
IDLE_SECONDS = 60.0
_CHILD: _Child | None = None
_CHILD_LOCK = threading.Lock()


def _attach(client: WorkerProcess) -> _Child:
    global _CHILD
    with _CHILD_LOCK:
        if _CHILD is None or not _CHILD.alive or _CHILD.pid != os.getpid():
            _CHILD = _Child()
        child = _CHILD
        if child._idle is not None:
            child._idle.cancel()
            child._idle = None
        with child._lock:
            child.clients.add(client)
        return child


def _detach(client: WorkerProcess) -> None:
    with _CHILD_LOCK:
        child = client.child
        with child._lock:
            child.clients.discard(client)
            idle = not child.clients
        if idle and child is _CHILD and child.alive:
            child._idle = threading.Timer(IDLE_SECONDS, _stop_if_idle, args=(child,))
            child._idle.daemon = True
            child._idle.start()


def _stop_if_idle(child: _Child) -> None:
    global _CHILD
    with _CHILD_LOCK:
        if child.clients or child is not _CHILD:
            return
        _CHILD = None
    child.stop()


def shutdown() -> None:
    """Stop the shared worker process now, if no recorder uses it (else it stops after the last one)."""
    global _CHILD
    with _CHILD_LOCK:
        child = _CHILD
        if child is None or child.clients:
            return
        if child._idle is not None:
            child._idle.cancel()
        _CHILD = None
    child.stop()


class WorkerProcess:
    """One recorder's use of the worker process (started by the first, shared by all recorders of this
    process). ``setup`` (pickled with the first job) is what the child measures this recorder's jobs with:
    a callable ``(kind, step, payload) -> (row, problems)`` such as `RecorderJobs`, or a dict {kind: function
    ``payload -> (row, problems)``}. ``on_result(kind, step, row, problems)`` is called on the answering
    thread for every answered job; ``on_lost(kind, step, why)`` for a job the child could not answer (it
    failed, or the child died)."""

    def __init__(self, setup: dict[Any, Any], on_result: Callable[..., None], on_lost: Callable[..., None]) -> None:
        self._setup: dict[Any, Any] | None = setup
        self._on_result, self._on_lost = on_result, on_lost
        self._dir = _shm_dir()
        self._pending: dict[int, tuple[Any, int, str]] = {}  # job id → (kind, step, file)
        # jobs whose answer or loss is being handed to the recorder: `join` waits for those callbacks too
        self._reporting: set[int] = set()
        self._cond = threading.Condition()
        self.alive = True
        self.why_dead = ""
        self.child = _attach(self)
        self.proc = self.child.proc
        self.cid = next(self.child.ids)

    @property
    def ready(self) -> bool:
        """Whether a job sent now would be measured without waiting for the child to start (≈ 1–2 s after the
        first recorder; True also once the child is gone, which `submit` then reports)."""
        return self.child.ready.is_set() or not self.alive

    @property
    def busy(self) -> bool:
        """Whether the worker process has a job in flight, this recorder's or another's."""
        return bool(self.child.routes)

    def cpu_seconds(self) -> float:
        """The child's CPU time so far (user + system, all its recorders' work), 0 where /proc cannot say."""
        return stat_cpu_seconds(f"/proc/{self.proc.pid}/stat") or 0.0

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until `ready`; False on timeout."""
        return self.child.ready.wait(timeout) or not self.alive

    # -- jobs --
    def submit(self, kind: Any, step: int, payload: Any) -> bool:
        """Copy ``payload``'s tensors into shared memory and send the job; False if the child is gone (the
        caller measures another way). Waits while ``MAX_PENDING`` jobs are in flight. Raises if the job
        cannot be packed (a tensor off the CPU, no space for the copies)."""
        with self._cond:
            while self.alive and len(self._pending) >= MAX_PENDING:
                self._cond.wait()
            if not self.alive:
                return False
        code = self.child.proc.poll()
        if code is not None:  # gone before its answering thread noticed: this job goes elsewhere, not lost
            self.child._died(f"exited with code {code}")
            self._died(self.child.why_dead)
            return False
        if self._setup is not None:
            # pickled with the first job, so the per-layer state it carries (refine hints, power-iteration
            # vectors) is that of the records measured inline while the child was starting
            blob = pickle.dumps(self._setup, protocol=pickle.HIGHEST_PROTOCOL)
            self._setup = None
            try:
                self.child.send(("setup", self.cid, blob))
            except OSError as exc:
                self.child._died(f"could not be reached ({exc})")
                self._died(self.child.why_dead)
                return False
        out = io.BytesIO()
        packer = _Packer(out)
        packer.dump(payload)
        job = next(self.child.ids)
        path = os.path.join(self._dir, f"spectralscope-{os.getpid()}-{self.cid}-{job}")
        if packer.size:
            _write_shared(path, packer.size, packer.tensors)
        with self._cond:
            self._pending[job] = (kind, step, path)
        with self.child._lock:
            self.child.routes[job] = self
        try:
            self.child.send(("job", self.cid, job, kind, step, path if packer.size else None, out.getvalue()))
        except OSError as exc:  # it never got this job: the caller measures it another way
            with self.child._lock:
                self.child.routes.pop(job, None)
            with self._cond:
                self._pending.pop(job, None)
                self._cond.notify_all()
            _unlink(path)
            self.child._died(f"could not be sent a job ({exc})")
            self._died(self.child.why_dead)
            return False
        if not self.child.alive:  # it died before this job was registered: nobody else will answer it
            self._died(self.child.why_dead)
        return True

    def join(self) -> None:
        """Wait until every job sent has been answered or lost, and the recorder told of it."""
        with self._cond:
            while self._pending or self._reporting:
                self._cond.wait()

    def close(self) -> None:
        """Wait for this recorder's jobs, then let the child forget it."""
        self.join()
        if self.alive:
            try:
                self.child.send(("forget", self.cid))
            except OSError:
                pass
        with self._cond:
            self.alive = False
            self.why_dead = self.why_dead or "closed"
        _detach(self)

    # -- answers (on the answering thread) --
    def _take(self, job: int) -> tuple[Any, int, str] | None:
        """Move ``job`` from pending to being reported (None if another thread already reports it)."""
        entry = self._pending.pop(job, None)
        if entry is not None:
            self._reporting.add(job)
        return entry

    def _reported(self, job: int) -> None:
        with self._cond:
            self._reporting.discard(job)
            self._cond.notify_all()

    def _answer(self, job: int, row: Any, problems: Any, error: str | None, fatal: bool) -> None:
        with self._cond:
            entry = self._take(job)
            if fatal:  # the child cannot measure for this recorder: later jobs go elsewhere
                self.alive = False
                self.why_dead = error or ""
        if entry is None:  # already reported lost by a thread that saw the child die
            return
        kind, step, path = entry
        _unlink(path)
        try:
            if error is not None:
                self._on_lost(kind, step, error)
            else:
                self._on_result(kind, step, row, problems)
        except Exception as exc:  # a failing callback must not stop the answers to later jobs
            log.warning("spectralscope: could not store a record of step %d (%s: %s)", step, type(exc).__name__, exc)
        finally:
            self._reported(job)

    def _died(self, why: str) -> None:
        with self._cond:
            if not self.alive and not self._pending:
                return
            self.alive = False
            self.why_dead = why
            lost = [(job, self._take(job)) for job in sorted(self._pending)]
            self._cond.notify_all()  # a submit waiting for room learns that the child is gone
        for job, (kind, step, path) in lost:
            _unlink(path)
            try:
                self._on_lost(kind, step, f"lost: {why}")
            except Exception as exc:
                log.warning("spectralscope: could not count a lost record of step %d (%s: %s)", step,
                            type(exc).__name__, exc)
            finally:
                self._reported(job)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, TypeError):
        pass


class _Portable(pickle.Pickler):
    """Refuses what exists only in the training process: a function or class defined in ``__main__``."""

    def reducer_override(self, obj: Any) -> Any:
        if callable(obj) and getattr(obj, "__module__", None) == "__main__" and not isinstance(obj, type(len)):
            raise pickle.PicklingError(f"{getattr(obj, '__qualname__', obj)} is defined in __main__")
        return NotImplemented


def portable_dumps(obj: Any) -> bytes:
    """``obj`` pickled, or `pickle.PicklingError` where the worker process could not load it (see `can_pickle`)."""
    out = io.BytesIO()
    _Portable(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return out.getvalue()


def portable_loads(blob: bytes) -> Any:
    """In the worker process: the object `portable_dumps` made, nested in a job of the training process that
    started it (the only source of pickles here; nothing read from a store or file is ever unpickled)."""
    return pickle.loads(blob)


def can_pickle(setup: Any) -> str | None:
    """None if a worker process could be given ``setup``, else why not: functions defined in ``__main__``
    (or not importable by name) exist only in the training process."""
    try:
        portable_dumps(setup)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def portable(exc: BaseException | None) -> BaseException | None:
    """``exc``, or where it cannot be unpickled elsewhere (a class defined in ``__main__``), a RuntimeError
    with the same text."""
    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ---- the child's side ----------------------------------------------------------------------------
class _Unpacker(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, buf: torch.Tensor | None) -> None:
        super().__init__(file)
        self.buf = buf

    def persistent_load(self, pid: Any) -> torch.Tensor:
        offset, dtype, shape = pid
        return _view(self.buf, offset, dtype, shape)


def _map(path: str | None) -> torch.Tensor | None:
    if path is None:
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
        _unlink(path)  # the memory lives while mapped; nothing is left behind if this process dies
    return torch.frombuffer(mm, dtype=torch.uint8)


def serve(fd: int) -> None:
    """The child's loop: keep each recorder's setup, answer jobs until told to stop or the parent goes away."""
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the parent decides, and when it is gone
    # this loop sees its socket close and commits what it measured
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:  # below training: on a machine whose cores training fills, it takes what training leaves
        os.nice(WORKER_NICE - os.nice(0))
    except OSError:
        pass
    conn = Connection(fd)
    setups: dict[int, Any] = {}
    try:
        conn.send("ready")  # the imports are done: jobs sent from now on are measured at once
    except OSError:  # the training process ended while this one was starting: nothing to do, nothing to say
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the training process is gone: keep what its recorders had measured
            for setup in setups.values():
                if hasattr(setup, "abandon"):
                    try:
                        setup.abandon()
                    except Exception as exc:  # its store is gone too: nobody is left to tell but the log
                        log.warning("spectralscope: the measuring process could not commit a store (%s)", exc)
            return
        if msg is None:
            try:
                conn.send(None)
            except OSError:
                pass
            return
        if msg[0] == "setup":
            try:
                setups[msg[1]] = pickle.loads(msg[2])
            except Exception as exc:  # answered with the recorder's first job
                setups[msg[1]] = f"could not load the recorder's setup ({type(exc).__name__}: {exc})"
            continue
        if msg[0] == "forget":
            setup = setups.pop(msg[1], None)
            if hasattr(setup, "forget"):
                try:
                    setup.forget()
                except Exception as exc:  # its store is gone: nothing more to keep
                    log.warning("spectralscope: the measuring process could not close a store (%s)", exc)
            continue
        _, cid, job, kind, step, path, blob = msg
        row = problems = error = None
        setup = setups.get(cid, "has no setup for this recorder")
        fatal = isinstance(setup, str)
        try:
            buf = _map(path)
            if fatal:
                raise RuntimeError(setup)
            payload = _Unpacker(io.BytesIO(blob), buf).load()
            with torch.no_grad():
                row, problems = setup(kind, step, payload) if callable(setup) else setup[kind](payload)
        except Exception as exc:
            error = f"failed ({type(exc).__name__}: {exc})"
            fatal = fatal or getattr(exc, "fatal", False)  # e.g. runners.process.SetupFailed: no later job can work
        payload = buf = None  # unmap before answering: the parent counts this job's memory as freed
        try:
            conn.send((job, row, problems, error, fatal))
        except OSError:  # the parent died with this job in flight: its row is kept, and so are the queued jobs'
            pass
