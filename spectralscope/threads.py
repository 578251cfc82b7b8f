"""The threads a record runs on, chosen on purpose rather than left to whichever pools happen to be loaded.

A record's linear algebra runs partly in torch (its intra-op pool, sized by ``torch.set_num_threads``) and partly
in SciPy's LAPACK and BLAS (OpenBLAS's own pool, sized by ``OPENBLAS_NUM_THREADS`` or the core count). Left to
their defaults on a machine with few cores, the two pools take turns on the same cores, and each one's threads
spin while the other works: a record on the training thread cost about four times as much at torch's default
two threads as at one (docs/benchmarks.md). So a record finished in the training process, and the activation
hooks' sums taken inside its forward pass, hold the BLAS pools to one thread (`one_blas_thread`); the worker
process runs on one thread at the lowest priority (`WORKER_NICE`), so that a training run using every core keeps
them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
