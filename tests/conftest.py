from __future__ import annotations

import numpy as np
import pytest
import torch


def prescribed(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """U·diag(s)·Vᵀ in float64 with Haar-random orthonormal U (m×r) and V (n×r), r = len(s)."""
    rng = np.random.default_rng(seed)
    r = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (u * s) @ v.T


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def np_quantile(x: np.ndarray, qs) -> np.ndarray:
    return np.quantile(np.asarray(x, dtype=np.float64), list(qs), method="linear")


def in_group(rank: int, body, world: int, init: str, *args) -> None:
    """``torch.multiprocessing.spawn`` target: ``body(rank, world, *args)`` inside a gloo group of ``world``
    processes, then leave the group and end the process without interpreter shutdown.

    Why the abrupt end: gloo's worker threads free a finished collective's tensors just after signalling
    completion. FSDP2's own all-gathers leave tensors whose Python objects such a thread must then free
    under the GIL; if the interpreter is finalizing at that moment the thread dies inside a C++ destructor
    and the process aborts with "terminate called without an active exception" (seen in CI, about one run
    of this file in ten here; pytorch/pytorch#179291). Our own collectives wait for gloo to let go
    (``distributed._collective``); torch's cannot be made to. A body that raises still fails the spawn."""
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def process_of(rec):
    """The recorder's worker-process client (`worker.WorkerProcess`), or None: the runner has none (any more)."""
    return getattr(rec.runner, "process", None)


def thread_of(rec):
    """The recorder's measuring thread, or None when no record was finished on one."""
    from spectralscope.runners import ThreadRunner

    runner = rec.runner
    threads = [r for r in (runner, getattr(runner, "fallback", None)) if isinstance(r, ThreadRunner)]
    return threads[0]._thread if threads else None


@pytest.fixture(scope="session")
def optimizer_sweep(tmp_path_factory) -> list[str]:
    """A tiny demo sweep: Muon, AdamW and NorMuon × widths 16, 24, 32, one block, 20 steps (run paths)."""
    from tqdm.auto import tqdm

    from spectralscope.corpus import load_corpus
    from spectralscope.demo import DemoConfig, train_one

    out = tmp_path_factory.mktemp("sweep")
    cfg = DemoConfig(out=str(out), widths=[16, 24, 32], depth=1, steps=20, batch=8, ctx=32)
    corpus = load_corpus("pcfg")
    return [str(train_one(cfg, o, w, 4, corpus, tqdm(disable=True)))
            for o in ("muon", "adamw", "normuon") for w in (16, 24, 32)]


@pytest.fixture(scope="session")
def sweep_comparison(optimizer_sweep):
    """`compare.comparison` of the tiny sweep, read and fitted once for every test that only reads it."""
    from spectralscope.compare import comparison

    return comparison(optimizer_sweep)
