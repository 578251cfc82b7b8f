"""The demo's training, one run at a time against several side by side, by wall clock.

    python benchmarks/demo_jobs.py [--repeats 2] [--steps 300] [--jobs N] [--optimizers muon adamw normuon]

Each row trains the demo's whole sweep (`spectralscope.demo.train_all`: its models, data, seeds and every
instrument, as `spectralscope demo` does): ``1 job`` trains the runs one after another in this process at torch's
default thread count; ``N jobs`` (default: one per usable core) trains N runs at once, each in a spawned process on
cores // N torch threads. The rows run in turn, then in the reverse order (``--repeats`` passes in all), so that a
drift of the machine's speed falls on both alike; each row gives its median wall time, its ratio to one job's, and
the share of the machine's cores busy (from /proc/stat).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from demo_cost import busy_share, jiffies  # the script's own folder is on the path
from tqdm.auto import tqdm

from spectralscope.corpus import load_corpus
from spectralscope.demo import DemoConfig, plan_jobs, train_all, usable_cores


def train(cfg: DemoConfig, corpus) -> tuple[float, float, int, int]:
    """(wall seconds, share of the cores busy, jobs, threads each) of training ``cfg``'s sweep once."""
    t0, before = time.perf_counter(), jiffies()
    _, jobs, threads = train_all(cfg, corpus, tqdm(disable=True))
    return time.perf_counter() - t0, busy_share(before, jiffies()), jobs, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="passes over the rows, alternating their order")
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument("--jobs", type=int, default=None, help="the side-by-side row's jobs (default: one per core)")
    ap.add_argument("--optimizers", nargs="+", default=None, help="default: the demo's")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="default: the demo's")
    args = ap.parse_args()
    # the runs' alerts are the demo's business (its critical ones log at ERROR)
    logging.getLogger("spectralscope").setLevel(logging.CRITICAL)
    base = DemoConfig(steps=args.steps)
    kw = dict(steps=args.steps, optimizers=args.optimizers or base.optimizers, widths=args.widths or base.widths)
    runs = len(kw["optimizers"]) * len(set(kw["widths"]))
    jobs = plan_jobs(args.jobs, runs)[0]
    if jobs == 1:
        raise SystemExit(f"one usable core or run ({usable_cores()} cores, {runs} runs): nothing to set side by side")
    corpus = load_corpus(base.data)
    print(f"the demo's sweep: {' '.join(kw['optimizers'])} × widths {kw['widths']} × {args.steps} steps, every "
          f"instrument; {usable_cores()} usable cores, torch's default {torch.get_num_threads()} threads; wall clock, "
          f"{args.repeats} passes alternating the order of the rows")
    rows = {1: [], jobs: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for n in (list(rows) if rep % 2 == 0 else list(rows)[::-1]):
                rows[n].append(train(DemoConfig(out=str(Path(tmp) / f"j{n}"), jobs=n, **kw), corpus))
    one = statistics.median(w for w, *_ in rows[1])
    print(f"{'training':<34} {'wall s':>7} {'× 1 job':>8} {'cores busy':>11}")
    for n, got in rows.items():
        wall = statistics.median(w for w, *_ in got)
        busy = statistics.median(b for _, b, *_ in got)
        threads = got[0][3]
        label = f"{n} job{'s' if n > 1 else ''}, torch on {threads} thread{'s' if threads > 1 else ''}" + \
            (" each" if n > 1 else "")
        print(f"{label:<34} {wall:7.1f} {wall / one:8.2f} {100 * busy:10.0f}%")


if __name__ == "__main__":
    main()
