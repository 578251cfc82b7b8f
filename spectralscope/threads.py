"""The threads a record runs on, chosen on purpose rather than left to whichever pools happen to be loaded.

A record's linear algebra runs partly in torch (its intra-op pool, sized by ``torch.set_num_threads``) and partly
in SciPy's LAPACK and BLAS (OpenBLAS's own pool, sized by ``OPENBLAS_NUM_THREADS`` or the core count). Left to
their defaults on a machine with few cores, the two pools take turns on the same cores, and each one's threads
spin while the other works: a record on the training thread cost about four times as much at torch's default
two threads as at one (docs/benchmarks.md). So a record finished in the training process, and the activation
hooks' sums taken inside its forward pass, hold the BLAS pools to one thread (`one_blas_thread`); the worker
process runs on one thread at the lowest priority (`WORKER_NICE`), so that a training run using every core keeps
them.

That priority alone starves the worker process when torch's threads take every core: they spin between parallel
regions, the child gets almost no CPU, falls behind, and training ends up waiting for it with a core idle. With
``watch(..., lend_core=True)``, a record handed to the child while it still measures an earlier one (it did not
keep up on the cycles left to it) makes training lend it a core (`lend_core`): torch's pool gives one thread up,
and takes it back at the first optimizer hook after the child has nothing in flight (`reclaim_core`). A training
step at one thread fewer is slower by far less than the record it makes room for; a child that keeps up is lent
nothing, since a step at one thread fewer would cost more than it saves (docs/benchmarks.md). It is not the
default because torch orders its float32 sums by its thread count: the steps trained on fewer threads make the run
another training, no longer bit for bit the unwatched one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: the worker process's nice level: the lowest priority, so that it takes only the cycles training leaves
WORKER_NICE = 19

_held = False  # a block of the main thread holds the limit (only the main thread sets it)
_controller: Any = None


def _blas_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries a record uses, numpy's and SciPy's (made once: finding them walks
    the loaded libraries)."""
    global _controller
    if _controller is None:
        import scipy.linalg  # noqa: F401  (loads the LAPACK a record uses, so that the view holds it)
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """On the main thread (where training, and so an inline record, runs), hold every loaded BLAS pool (SciPy's
    and numpy's OpenBLAS, MKL) to one thread while the block runs, and give back the sizes it had; the
    outermost block sets and lifts the limit. Elsewhere it does nothing: OpenBLAS does not always take a size
    set from another thread than the one that set the last (a limit set there could stay), and records off the
    main thread run on an accelerator or a worker. torch's own intra-op pool is left as the user set it. A BLAS
    pool that cannot be limited is left as it is: the record is slower, never lost."""
    global _held
    if _held or threading.current_thread() is not threading.main_thread():
        yield  # nested in the main thread's block, which lifts the limit; or off the main thread
        return
    try:
        limiter = _blas_controller().limit(limits=1, user_api="blas")
    except Exception:  # no threadpoolctl view of this process's libraries: run as they are
        limiter = None
    _held = True
    try:
        yield
    finally:
        _held = False
        if limiter is not None:
            limiter.restore_original_limits()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else the core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: (the user's thread count, the count lent down to, the thread that lent) while a core is lent, else None
_loan: tuple[int, int, int] | None = None
_openmp: bool | None = None


def _settable() -> bool:
    """Whether torch's intra-op pool can be resized at any time: its OpenMP backend can; the native pool warns and
    keeps its size once parallel work has started."""
    global _openmp
    if _openmp is None:
        try:
            _openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
        except Exception:
            _openmp = False
    return _openmp


def lend_core() -> None:
    """Called on the training thread as a record goes to a worker process that is behind: when torch's threads
    take every usable core (n ≥ cores, n > 1), run torch on min(n, cores) − 1 threads until `reclaim_core`, so that the child
    measures on a core of its own. Nothing changes with a core to spare, when a core is already lent, or with a
    pool that cannot be resized."""
    global _loan
    if _loan is not None or not _settable():
        return
    n, cores = torch.get_num_threads(), usable_cores()
    fewer = max(1, min(n, cores) - 1)
    if n < cores or fewer >= n:
        return
    torch.set_num_threads(fewer)
    _loan = (n, fewer, threading.get_ident())


def reclaim_core(busy: bool) -> None:
    """Called on the training thread at each optimizer hook: once the worker process is not ``busy``, give torch
    back the threads it had before `lend_core`. If the user resized torch's pool meanwhile, their size stays. Off
    the thread that lent, nothing happens: torch's pool size is that thread's own setting."""
    global _loan
    loan = _loan
    if loan is None or busy or threading.get_ident() != loan[2]:
        return
    _loan = None
    if torch.get_num_threads() == loan[1]:
        torch.set_num_threads(loan[0])


def training_threads() -> int:
    """torch's intra-op thread count as the user set it: the count before the loan while a core is lent."""
    loan, n = _loan, torch.get_num_threads()
    return loan[0] if loan is not None and n == loan[1] else n
