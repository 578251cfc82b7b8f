"""Why `watch(background=True)` measures in a worker process on the CPU: what a busy worker does to training.

    python benchmarks/contention.py [--blocks 7]

1. A loop of small torch operations (a 64×96 by 96×96 matmul, the size of the demo model's) timed alone
   and while another thread runs, without pause: `time.sleep`, pure Python, SciPy's LAPACK `dsytrd` and
   BLAS `dsyrk` (f2py wrappers that keep the interpreter lock), a NumPy matmul and `torch.linalg.eigvalsh`
   (which release it).
2. The demo's largest model training (its steps timed by the wall clock) alone, then while optimizer
   records of its own matrices are measured without pause on a thread, then in a process.

Each figure is the median of ``--blocks`` timed blocks; torch and BLAS on one thread each, so the second
core of this machine is free for the worker.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.linalg import blas, lapack  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402

import spectralscope as ss
from spectralscope.runners.thread import clone_tensors  # noqa: E402


def _busy(kind: str, stop: threading.Event) -> None:
    g = np.random.default_rng(0).random((128, 128))
    g = g @ g.T
    a = np.random.default_rng(1).random((128, 512))
    gt = torch.from_numpy(g)
    while not stop.is_set():
        if kind == "time.sleep(1 ms)":
            time.sleep(0.001)
        elif kind == "pure Python":
            sum(range(1000))
        elif kind == "scipy dsytrd 128":
            lapack.dsytrd(np.asfortranarray(g), lower=1)
        elif kind == "scipy dsyrk 128x512":
            blas.dsyrk(1.0, a, lower=1)
        elif kind == "numpy matmul 128x512":
            a @ a.T
        elif kind == "torch eigvalsh 128":
            torch.linalg.eigvalsh(gt)


def small_ops(blocks: int) -> None:
    x, w = torch.randn(64, 96), torch.randn(96, 96)

    def loop() -> float:
        t = time.perf_counter()
        for _ in range(2000):
            x @ w
        return time.perf_counter() - t

    alone = statistics.median(loop() for _ in range(blocks))
    print(f"1. 2,000 small matmuls: {1e3 * alone:.1f} ms alone")
    print(f"{'beside a thread running':>24} {'slowdown':>9}")
    for kind in ("time.sleep(1 ms)", "pure Python", "scipy dsytrd 128", "scipy dsyrk 128x512",
                 "numpy matmul 128x512", "torch eigvalsh 128"):
        stop = threading.Event()
        th = threading.Thread(target=_busy, args=(kind, stop))
        th.start()
        time.sleep(0.05)
        t = statistics.median(loop() for _ in range(blocks))
        stop.set()
        th.join()
        print(f"{kind:>24} {t / alone:8.2f}x")


def _demo():
    base, make_opts, batches, _, _ = overhead.demo_setup(argparse.Namespace())
    return base, make_opts(base), batches


def _measure_forever(stop, ready) -> None:
    """Optimizer records of the demo model's own matrices, measured back to back until ``stop``."""
    torch.set_num_threads(1)
    model, opts, batches = _demo()
    run = overhead.make_block(model, opts, batches(3))
    with tempfile.TemporaryDirectory() as tmp:
        rec = ss.watch(opts[0], model, f"{tmp}/x.zarr", every=1, activations=None, background=False, overhead=None)
        run(1)
        before = {id(lay.param): lay.param.detach().clone() for lay in rec.layers}
        run(1)
        rec.record._before = before  # W_before of the inputs: the weights one step back, so ΔW is a real update
        inputs = clone_tensors(rec.record.take(0))
        rec.close()
        ready.set()
        while not stop.is_set():
            rec.record.measurer.finish(inputs)


def training(blocks: int) -> None:
    model, opts, batches = _demo()
    run = overhead.make_block(model, opts, batches(1), time.perf_counter)
    run(20)

    def step() -> float:
        return statistics.median(run(10) / 10 for _ in range(blocks))

    print("\n2. the demo's largest model, wall-clock ms per training step")
    print(f"{'while records are measured':>28} {'alone':>8} {'beside':>8} {'slowdown':>9}")
    for where in ("thread", "process"):
        alone = step()
        if where == "thread":
            stop, ready = threading.Event(), threading.Event()
            worker = threading.Thread(target=_measure_forever, args=(stop, ready))
        else:
            ctx = mp.get_context("spawn")
            stop, ready = ctx.Event(), ctx.Event()
            worker = ctx.Process(target=_measure_forever, args=(stop, ready))
        worker.start()
        ready.wait()
        beside = step()
        stop.set()
        worker.join()
        print(f"{'on a ' + where:>28} {1e3 * alone:7.1f} {1e3 * beside:8.1f} {beside / alone:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    small_ops(args.blocks)
    training(args.blocks)


if __name__ == "__main__":
    main()
