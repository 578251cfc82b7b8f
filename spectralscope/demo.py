"""`spectralscope demo`: sweeps of small GPTs trained with Muon, AdamW and NorMuon on the same data and seeds,
every instrument recorded, then the spectral scaling laws per optimizer, the comparisons of `compare`, the
Newton–Schulz recommendation and `report.html` — the optimizer comparisons of the papers, on a laptop.

Two sweeps: ``width`` (the model width, FFN = 4× width) and ``ffn`` (the FFN width at a fixed model width, as
the spectral-scaling-laws protocol sweeps it).
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import recorder
from .buckets import frequency_buckets
from .corpus import load_corpus
from .gpt import GPT, GPTConfig
from .hooks.activations import ActivationSpectra
from .hooks.attention import AttentionLogits
from .hooks.gradients import GradientSpectra
from .hooks.sharpness import Sharpness
from .hooks.weights import WeightSpectra
from .normuon import NorMuon
from .store import open_run
from .threads import usable_cores

#: The optimizer of the hidden matrices and its learning rate, per demo name; embeddings, head and norms always
#: take AdamW at ``REST_LR``. The rates are the best held-out loss of a sweep at width 64, 300 steps, 2 seeds
#: (`benchmarks/learning_rates.py`; the table is in docs/findings.md).
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "muon": (torch.optim.Muon, dict(lr=0.02, momentum=0.95, weight_decay=0.0)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)),
    "normuon": (NorMuon, dict(lr=0.02, momentum=0.95, beta2=0.95, weight_decay=0.0)),
}
REST_LR = 3e-3
SWEEPS = ("width", "ffn")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    optimizers: list[str] = field(default_factory=lambda: ["muon", "adamw", "normuon"])
    sweep: str = "width"
    widths: list[int] = field(default_factory=lambda: [32, 48, 64, 96])
    width: int = 64  # the model width of the ffn sweep
    ffn: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # FFN width / model width, for the ffn sweep
    depth: int = 4
    steps: int = 300
    batch: int = 16
    ctx: int = 64
    data: str = "text"
    imbalance: float = 1.0
    target_size: float | None = None
    seed: int = 0
    lrs: dict[str, float] = field(default_factory=dict)  # overrides of OPTIMIZERS' learning rates
    jobs: int | None = None  # runs trained at once, each in a process of its own; None: `plan_jobs` decides

    def check(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(f"--optimizers takes some of {', '.join(OPTIMIZERS)}; got {' '.join(self.optimizers)}")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"--optimizers names one twice: {' '.join(self.optimizers)}")
        if self.sweep not in SWEEPS:
            raise ValueError(f"--sweep must be width or ffn, got {self.sweep!r}")
        sizes = self.widths if self.sweep == "width" else self.ffn
        if len(set(sizes)) < 3:
            raise ValueError(f"--{'widths' if self.sweep == 'width' else 'ffn'} needs at least 3 sizes to fit a "
                             f"power law, got {sizes}")
        if min(sizes) < 1:
            raise ValueError(f"sizes must be positive, got {sizes}")
        if self.steps < 20:
            raise ValueError(f"--steps must be at least 20, got {self.steps}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}")

    def points(self) -> list[tuple[int, int]]:
        """(model width, FFN ratio) of each model of the sweep, smallest first."""
        if self.sweep == "width":
            return [(w, 4) for w in sorted(set(self.widths))]
        return [(self.width, r) for r in sorted(set(self.ffn))]

    def lr(self, name: str) -> float:
        return float(self.lrs.get(name, OPTIMIZERS[name][1]["lr"]))


#: the optimizer records' cadence, with the recording budget off: the fits need every one of them
OPTIMIZER_EVERY = 10


def build(cfg: DemoConfig, name: str, width: int, ffn_ratio: int, vocab: int
          ) -> tuple[GPT, torch.optim.Optimizer, torch.optim.Optimizer]:
    """The model of one sweep point (seeded by ``cfg.seed``, so every optimizer starts from the same weights), the
    optimizer ``name`` on its hidden matrices and AdamW on the rest."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab=vocab, width=width, depth=cfg.depth, heads=max(1, width // 16), ctx=cfg.ctx,
                          mlp_ratio=ffn_ratio))
    hidden = model.hidden_matrices()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    cls, kw = OPTIMIZERS[name]
    main = cls(hidden, **{**kw, "lr": cfg.lr(name)})
    return model, main, torch.optim.AdamW(rest, lr=REST_LR, weight_decay=0.0)


def instruments(cfg: DemoConfig, corpus) -> dict[str, Any]:
    """The demo's instruments (`watch`'s keyword arguments besides the optimizer cadence): activations 12 times a
    run, per token-frequency bucket; per-sample gradients, the per-layer sharpness probe, weight spectra and
    attention logits 6 times."""
    probe = corpus.batch(cfg.batch, cfg.ctx, torch.Generator().manual_seed(cfg.seed + 1))
    cadence = max(1, cfg.steps // 6)
    return dict(
        # HEAD/MID/TAIL by the corpus's character frequencies (`buckets.frequency_buckets`' default cut)
        activations=ActivationSpectra(every=max(1, cfg.steps // 12), max_tokens=2048,
                                      buckets=frequency_buckets(corpus.ids.numpy(), corpus.vocab)),
        gradients=GradientSpectra(every=cadence, max_samples=cfg.batch),
        # a named function: the probe can run in the worker; per layer for the within/cross split
        sharpness=Sharpness(GPT.loss, probe, every=cadence, per_layer=True),
        weights=WeightSpectra(every=cadence),
        attention=AttentionLogits(every=cadence),
    )


def train_step(model: GPT, optimizers: Sequence[torch.optim.Optimizer], batch: torch.Tensor) -> torch.Tensor:
    """One training step on ``batch``: the loss, its gradients, each optimizer's step; returns the loss."""
    loss = model.loss(batch)
    loss.backward()
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad()
    return loss


def run_stem(cfg: DemoConfig, width: int, ffn_ratio: int) -> str:
    """The name of a sweep point's run: ``w96`` (width sweep) or ``ffn256`` (FFN sweep)."""
    return f"w{width}" if cfg.sweep == "width" else f"ffn{ffn_ratio * width}"


def train_one(cfg: DemoConfig, name: str, width: int, ffn_ratio: int, corpus, progress: Any) -> Path:
    """Train one sweep point with optimizer ``name``, recording every instrument on its hidden matrices; each step
    is told to ``progress`` (a tqdm bar, or anything with its ``update`` and ``set_postfix``)."""
    model, main, rest = build(cfg, name, width, ffn_ratio, corpus.vocab)
    gen = torch.Generator().manual_seed(cfg.seed)
    path = Path(cfg.out) / name / f"{run_stem(cfg, width, ffn_ratio)}.zarr"
    meta = {"optimizer": name, "lr": cfg.lr(name), "sweep": cfg.sweep, "width": width, "ffn_width": ffn_ratio * width,
            "depth": cfg.depth, "data": cfg.data, "imbalance": cfg.imbalance, "seed": cfg.seed}
    with recorder.watch(main, model, path, every=OPTIMIZER_EVERY, overwrite=True, overhead=None, meta=meta,
                        **instruments(cfg, corpus)) as rec:
        for _ in range(cfg.steps):
            loss = train_step(model, (main, rest), corpus.batch(cfg.batch, cfg.ctx, gen))
            rec.log(loss=loss)
            progress.update(1)
            progress.set_postfix(opt=name, width=width, ffn=ffn_ratio * width, loss=f"{loss.item():.3f}")
    return path


#: the memory a job takes by default planning: its process and its recorder's worker process (≈ 0.55 GiB each
#: resident with torch loaded, some of it shared libraries)
JOB_MEMORY = 1 << 30


def available_memory() -> int | None:
    """Bytes of memory available to new processes (/proc/meminfo's MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_jobs(jobs: int | None, runs: int) -> tuple[int, int]:
    """(runs trained at once, torch threads in each): ``jobs``, or by default one per usable core while each has
    `JOB_MEMORY` of the available memory; never more than ``runs``. One job trains in this process at torch's own
    thread count; more each take cores // jobs threads. Why: the demo's models are small, so a second thread
    speeds a step up far less than twice, and two runs side by side on one thread each finish the sweep sooner
    (docs/benchmarks.md)."""
    cores = usable_cores()
    if jobs is None:
        free = available_memory()
        jobs = cores if free is None else min(cores, free // JOB_MEMORY)
    n = max(1, min(jobs, runs))
    return (1, torch.get_num_threads()) if n == 1 else (n, max(1, cores // n))


class _Stopped(Exception):
    """The demo stops (interrupted, or another job failed): a job ends its run, closing it, and starts no other."""


class _Progress:
    """A job process's stand-in for the demo's progress bar: its steps and postfix go to the parent's queue, and a
    step raises `_Stopped` once the parent has set ``stop``."""

    def __init__(self, queue: Any, stop: Any) -> None:
        self.queue, self.stop = queue, stop

    def update(self, n: int = 1) -> None:
        self.queue.put(("update", n))
        if self.stop.is_set():
            raise _Stopped

    def set_postfix(self, **values: Any) -> None:
        self.queue.put(("postfix", os.getpid(), values))


_job: dict[str, Any] = {}  # a job process's queue, stop event, corpus and the run it trains now


def _name_the_run(record: logging.LogRecord) -> bool:
    """Begin a job's log line with the run it came from ("muon w96: …"): several runs are training at once."""
    record.msg, record.args = f"{_job.get('run', '?')}: {record.getMessage()}", None
    return True


def _start_job(queue: Any, stop: Any, threads: int, levels: dict[str, int], corpus: Any) -> None:
    """Set up a job process: torch's threads, and its log records (Python warnings among them) sent to the parent
    at the parent's levels, each naming its run, for the parent to print above its progress bar. Ctrl-C is the
    parent's to handle: it sets ``stop``, and the job closes its run at its next step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    handler = logging.handlers.QueueHandler(queue)
    handler.addFilter(_name_the_run)
    logging.getLogger().handlers = [handler]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    logging.captureWarnings(True)
    _job.update(queue=queue, stop=stop, corpus=corpus)


def _train_job(task: tuple[DemoConfig, str, int, int]) -> tuple[tuple[str, int, int], str | None]:
    """Train one run in a job process: ((name, width, ratio), its path), or None for the path once stopped."""
    cfg, name, width, ratio = task
    if _job["stop"].is_set():
        return (name, width, ratio), None
    _job["run"] = f"{name} {run_stem(cfg, width, ratio)}"
    path = train_one(cfg, name, width, ratio, _job["corpus"], _Progress(_job["queue"], _job["stop"]))
    return (name, width, ratio), str(path)


def _forward(queue: Any, bar: tqdm) -> None:
    """Until None comes: the job processes' log records to this process's loggers, their steps and each one's
    run and loss to ``bar``."""
    running: dict[int, str] = {}  # per job process, its run and loss: the bar shows every job's
    while (item := queue.get()) is not None:
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        elif item[0] == "update":
            bar.update(item[1])
        else:
            running[item[1]] = " ".join(f"{k}={v}" for k, v in item[2].items())
            bar.set_postfix_str(" | ".join(running.values()), refresh=False)


def train_all(cfg: DemoConfig, corpus, bar: tqdm) -> tuple[list[str], int, int]:
    """Train every (optimizer, sweep point) of ``cfg``: (the run paths in the order of ``cfg.optimizers`` and
    ``cfg.points()``, runs trained at once, torch threads in each; `plan_jobs`). With more than one job, each run
    trains in a spawned process of a pool, the largest first, so that no job is left alone with a large run at
    the end; the runs are seeded as in this process and their warnings are printed here. When a run fails or
    Ctrl-C comes, the other jobs close their runs at their next step and the error is raised here; a second
    Ctrl-C kills them."""
    tasks = [(name, w, r) for name in cfg.optimizers for w, r in cfg.points()]
    jobs, threads = plan_jobs(cfg.jobs, len(tasks))
    if jobs == 1:
        return [str(train_one(cfg, *t, corpus, bar)) for t in tasks], 1, threads
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and locks mid-use
    queue, stop = ctx.Queue(), ctx.Event()
    listener = threading.Thread(target=_forward, args=(queue, bar), name="spectralscope-demo-jobs", daemon=True)
    listener.start()
    levels = {"": logging.getLogger().level,
              "spectralscope": logging.getLogger("spectralscope").getEffectiveLevel()}
    largest_first = sorted(tasks, key=lambda t: -t[1] ** 2 * (4 + 2 * t[2]))  # ∝ the parameters of a block
    pool = ctx.Pool(jobs, _start_job, (queue, stop, threads, levels, corpus))
    paths: dict[tuple[str, int, int], str | None] = {}
    try:
        try:
            for task, path in pool.imap_unordered(_train_job, [(cfg, *t) for t in largest_first]):
                paths[task] = path
        except BaseException:
            stop.set()
            raise
        finally:
            pool.close()
            pool.join()  # the jobs exit by themselves, after their last records and steps are in the queue
    except BaseException:
        pool.terminate()
        raise
    finally:
        queue.put(None)
        listener.join()
    return [str(paths[t]) for t in tasks], jobs, threads


def backtest_line(runs: Mapping[str, Any], optimizers: list[str]) -> str:
    """One line: per optimizer, refitting the momentum σ quantiles without the largest run and predicting it."""
    from .fit import backtest

    said = []
    for name in optimizers:
        mine = {r: t for r, t in runs.items() if Path(r).parent.name == name}
        try:
            t = backtest(mine, "momentum_sv")
        except ValueError:
            continue
        folds = t.groupby("quantile")["fold"].median()
        q = {lv: folds[min(folds.index, key=lambda x, lv=lv: abs(x - lv))] for lv in (0.1, 0.5, 0.9)}
        said.append(f"{name} ×{q[0.1]:.2f}/×{q[0.5]:.2f}/×{q[0.9]:.2f}, {100 * t.attrs['coverage']:.0f}% inside")
    return ("backtest (momentum σ refitted without the largest model, predicting it; median error at q 0.1/0.5/0.9, share "
            "inside the 95% prediction interval): " + ("; ".join(said) or "not enough sizes"))


def health_line(runs: Mapping[str, Any]) -> str:
    """The alerts the health rules raised in the demo's runs (paths → opened trees), per optimizer: how many of
    each severity, by rule."""
    from collections import Counter

    from .doctor import alerts

    per: dict[str, Counter] = {}
    for r, tree in runs.items():
        frame, _ = alerts(tree)
        c = per.setdefault(Path(r).parent.name, Counter())
        c.update(f"{s} {rule}" for s, rule in zip(frame["severity"], frame["rule"], strict=True))
    said = "; ".join(f"{o}: " + (", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "none")
                     for o, c in per.items())
    return f"health alerts (spectralscope doctor RUN for each, with what to do): {said}"


def _console_loggers() -> list[logging.Logger]:
    """The loggers that print spectralscope's warnings and health alerts to the console, for tqdm to print them
    above its progress bar instead of through it: the root logger where it has a console handler, spectralscope's
    own where no handler is set up at all (Python's last-resort handler prints its warnings), else none."""
    root = logging.getLogger()
    if any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
           for h in root.handlers):
        return [root]
    return [] if root.handlers else [logging.getLogger("spectralscope")]


def _jobs_said(jobs: int, threads: int) -> str:
    torch_threads = f"torch on {threads} thread{'s' if threads > 1 else ''}"
    return torch_threads if jobs == 1 else f"{jobs} runs at a time, {torch_threads} each"


def run_demo(cfg: DemoConfig) -> str:
    """Train the sweep for each optimizer, compare, write the CSV tables and report.html, and return the summary."""
    from .compare import comparison, summary_text
    from .report import write_report

    cfg.check()
    start = time.time()
    corpus = load_corpus(cfg.data, cfg.imbalance)
    t0 = time.time()
    points = cfg.points()
    total = cfg.steps * len(points) * len(cfg.optimizers)
    with logging_redirect_tqdm(_console_loggers(), tqdm), tqdm(total=total, desc="training", unit="step") as bar:
        runs, jobs, threads = train_all(cfg, corpus, bar)
    trained = time.time() - t0
    size = "width" if cfg.sweep == "width" else "ffn_width"
    # read once, into memory, for the comparison, the backtest and the health line: the demo's runs are small, and
    # the fits would otherwise read each variable chunk by chunk again for every metric
    opened = {r: open_run(r).load() for r in runs}
    result = comparison(opened, swept=size, target_size=cfg.target_size)
    out = Path(cfg.out)
    written = result.write_csv(out)
    report = write_report(result, out / "report.html")
    swept = f"widths {[w for w, _ in points]}" if cfg.sweep == "width" else \
        f"FFN widths {[w * r for w, r in points]} at width {cfg.width}"
    lrs = ", ".join(f"{n} lr {cfg.lr(n):g}" for n in cfg.optimizers)
    return "\n".join([
        f"trained {' '.join(cfg.optimizers)} × {swept} × {cfg.steps} steps in {trained:.0f} s "
        f"({lrs}; AdamW lr {REST_LR:g} on embeddings, head and norms); runs in {cfg.out}/<optimizer>/",
        "",
        summary_text(result),
        "",
        backtest_line(opened, cfg.optimizers),
        health_line(opened),
        "",
        f"full tables: {', '.join(p.name for p in written)} in {cfg.out}/; plots: {report}",
        f"demo done in {time.time() - start:.0f} s wall time (training {trained:.0f} s; {_jobs_said(jobs, threads)})",
    ])
