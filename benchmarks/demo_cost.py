"""Where the demo's time goes: its largest sweep point trained plainly, with only the optimizer records, with every
instrument, and with every instrument but one, by wall clock at torch's default threads.

    python benchmarks/demo_cost.py [--repeats 2] [--optimizer muon] [--width 96] [--steps 300] [--threads N]
                                   [--only TEXT ...]

Each row is one whole run of the demo's largest model (`spectralscope.demo`: its data, seed, optimizers and
instruments, `spectralscope.demo.instruments`), watched as the demo watches it (optimizer records every 10 steps,
the recording budget off). The rows run in turn, then again in the reverse order (``--repeats`` passes in all),
so that a drift of the machine's speed falls on every row alike; each row gives its median wall time, its ratio to
the plain run's median, the share of both cores busy over the run (from /proc/stat: the machine's, training and
the worker process together), and the seconds training waited for room in the worker process's queue (a record
is handed over only while fewer than `worker.MAX_PENDING` are in flight). The rows marked *core lent* watch with
``lend_core=True``: training runs on one torch thread fewer while the worker process measures (`threads.lend_core`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import spectralscope as ss
from spectralscope import worker
from spectralscope.corpus import load_corpus
from spectralscope.demo import OPTIMIZER_EVERY, DemoConfig, build, instruments, train_step


def jiffies() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of the machine so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's cores busy between two `jiffies` readings."""
    return 1.0 - (after[1] - before[1]) / max(1, after[0] - before[0])


class _Waits:
    """Time the training thread spends in `WorkerProcess.submit` waiting for a free place in the queue."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._submit = worker.WorkerProcess.submit

    def __enter__(self) -> _Waits:
        outer, submit = self, self._submit

        def timed(proc, kind, step, payload):
            t = time.perf_counter()
            with proc._cond:
                while proc.alive and len(proc._pending) >= worker.MAX_PENDING:
                    proc._cond.wait()
            outer.seconds += time.perf_counter() - t
            return submit(proc, kind, step, payload)

        worker.WorkerProcess.submit = timed
        return self

    def __exit__(self, *exc) -> None:
        worker.WorkerProcess.submit = self._submit


def cases(cfg: DemoConfig, corpus) -> dict[str, tuple[Callable[[], dict | None], bool]]:
    """Row label → (a function making that row's `watch` keyword arguments, fresh instruments each time (None: not
    watched); whether training lends the worker process a core while it measures)."""
    every = lambda: instruments(cfg, corpus)  # noqa: E731

    def but(name: str) -> Callable[[], dict]:
        return lambda: {**every(), name: None}

    def flat_probe() -> dict:
        kw = every()
        probe = kw["sharpness"]
        return {**kw, "sharpness": ss.Sharpness(probe.loss_fn, probe.batch, every=probe.every, per_layer=False)}

    records = lambda: dict.fromkeys(every(), None)  # noqa: E731
    rows: dict[str, tuple[Callable[[], dict | None], bool]] = {
        "plain (not watched)": (lambda: None, False),
        "optimizer records only": (records, False),
        "optimizer records only, core lent": (records, True),
        "every instrument (the demo)": (every, False),
        "every instrument, core lent": (every, True)}
    rows.update({f"every instrument but {name}": (but(name), False) for name in every()})
    rows["every instrument, sharpness per_layer=False"] = (flat_probe, False)
    return rows


def run(cfg: DemoConfig, corpus, optimizer: str, width: int, kw: dict | None, path: Path,
        lend: bool = False) -> tuple[float, float, float]:
    """One run of the sweep point: (wall seconds, share of the cores busy, seconds waited for the worker); ``lend``:
    whether training lends the worker process a core while it measures."""
    model, main, rest = build(cfg, optimizer, width, 4, corpus.vocab)
    gen = torch.Generator().manual_seed(cfg.seed)
    watching = (contextlib.nullcontext() if kw is None else
                ss.watch(main, model, path, every=OPTIMIZER_EVERY, overwrite=True, overhead=None, lend_core=lend, **kw))
    waits = _Waits()
    t0, before = time.perf_counter(), jiffies()
    with waits, watching:
        for _ in range(cfg.steps):
            train_step(model, (main, rest), corpus.batch(cfg.batch, cfg.ctx, gen))
    return time.perf_counter() - t0, busy_share(before, jiffies()), waits.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="passes over the rows, alternating their order")
    ap.add_argument("--optimizer", default="muon", choices=("muon", "adamw", "normuon"))
    ap.add_argument("--width", type=int, default=None, help="default: the demo's largest width")
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's steps")
    ap.add_argument("--threads", type=int, default=None, help="torch's threads (default: its own default)")
    ap.add_argument("--only", nargs="*", default=[],
                    help="run the rows whose label contains one of these texts (and the plain one)")
    args = ap.parse_args()
    logging.getLogger("spectralscope").setLevel(logging.ERROR)  # the runs' health alerts are the demo's business
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig()
    if args.steps:
        cfg = DemoConfig(steps=args.steps)
    width = args.width or max(cfg.widths)
    corpus = load_corpus(cfg.data)
    rows = {k: v for k, v in cases(cfg, corpus).items() if k.startswith("plain") or not args.only
            or any(text in k for text in args.only)}
    print(f"the demo's {args.optimizer} run at width {width}: depth {cfg.depth}, {cfg.steps} steps of "
          f"{cfg.batch}x{cfg.ctx} tokens; torch on {torch.get_num_threads()} threads, wall clock, "
          f"{args.repeats} passes alternating the order of the rows")
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for label in (list(rows) if rep % 2 == 0 else list(rows)[::-1]):
                make, lend = rows[label]
                results[label].append(run(cfg, corpus, args.optimizer, width, make(), Path(tmp) / "run.zarr", lend))
    plain = statistics.median(w for w, _, _ in results["plain (not watched)"])
    print(f"{'watching':<46} {'wall s':>7} {'× plain':>8} {'cores busy':>11} {'waited s':>9}")
    for label, got in results.items():
        wall = statistics.median(w for w, _, _ in got)
        busy = statistics.median(b for _, b, _ in got)
        waited = statistics.median(s for _, _, s in got)
        print(f"{label:<46} {wall:7.1f} {wall / plain:8.2f} {100 * busy:10.0f}% {waited:9.1f}")


if __name__ == "__main__":
    main()
