"""Overhead of recording at defaults on a small transformer trained with Muon.

    python benchmarks/overhead.py [--pairs 12] [--block 10] [--group 5] [--width 128] [--depth 4] [--batch 32] [--every 10]
    python benchmarks/overhead.py --demo [--all-instruments]     # the demo's largest model (its cadence)
    python benchmarks/overhead.py --inline                       # records measured on the training thread

Two identical models train side by side in one process, one plain and one under `ss.watch` at defaults
(optimizer spectra every 10 steps, activation spectra every 50). Short blocks of `--block` steps (default
10: one optimizer record each) alternate A B, B A, … on one thread, each timed (see below for the clock);
`--group` consecutive pairs (default 5, i.e. 50 steps: every group
holds the same records, activations included) make one ratio watched/plain. Short alternation keeps the
machine's drift (±15% between identical blocks here) out of the ratios. The table gives the median ratio
with its spread, the ratio of the totals, and the cost of the records per group in training steps; a last
line gives the direct account (`Account`): the recorder's own CPU time on the training thread and on the
writer's threads over the same steps, as a share of the plain run's time — a measurement of the work
itself, free of the run-to-run noise of a difference of totals.

At defaults (``background="auto"``: on the CPU a worker process, `spectralscope.worker`) the records are
measured and written by a child process from copies taken after the step, so the blocks are timed by the
wall clock — the training loop's slowdown when a core is free for the worker (torch runs on one thread
here, the machine has two); process_time would not see the worker process at all. The account then adds
the worker process's CPU (from /proc), which the training loop does not wait for. `--inline` watches with
``background=False`` (everything on the training thread, timed by time.process_time(), which also counts
the writer's threads, when torch runs on one thread; by the wall clock when it runs on more, since the process
clock then sums every torch thread's CPU, spin-waits included, and reads a record that holds training up for its
whole time at about 1/threads of that); `--thread` measures on a worker thread (what a GPU gets), by the wall
clock.
"""

from __future__ import annotations

import os
import sys


def _threads_argument(argv: list[str]) -> int | None:
    """``--threads N`` read before numpy is imported: its BLAS pool takes its size from the environment then."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


THREADS = _threads_argument(sys.argv)
if THREADS is not None:  # the old setting (--threads 1): SciPy's BLAS on as many threads as torch below
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(THREADS)

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import spectralscope as ss  # noqa: E402
from spectralscope.worker import stat_cpu_seconds  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.ModuleDict({n: nn.Linear(d, d, bias=False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d, bias=False), "c_proj": nn.Linear(4 * d, d, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (self.attn[n](h).view(b, t, self.heads, -1).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn["o_proj"](y)
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, depth: int, ctx: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, max(1, d // 32)) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def optimizers(model: nn.Module):
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("h.")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and n.startswith("h."))]
    return torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)


def make_block(model, opts, batches, clock=time.process_time, lent: list[int] | None = None):
    """A function training ``n`` steps and returning their time by ``clock``; ``lent``: counts the blocks that begin
    with torch on fewer threads than its default (a core still lent to the worker process by the other model)."""
    threads = torch.get_num_threads()

    def run(n: int) -> float:
        if lent is not None and torch.get_num_threads() != threads:
            lent[0] += 1
        t = clock()
        for _ in range(n):
            x = next(batches)
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        return clock() - t

    return run


VOCAB = 256


def model_arguments(ap: argparse.ArgumentParser, pairs: int) -> None:
    """The options shared by the benchmarks that train this transformer."""
    ap.add_argument("--pairs", type=int, default=pairs)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)


def token_batches(batch: int, ctx: int):
    """An endless stream of random token batches (batch, ctx + 1) from a fixed seed."""
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randint(0, VOCAB, (batch, ctx + 1), generator=g)


def settle_budget(rec, run_b, cap: int) -> int:
    """Train the watched model alone until its budget has settled (no change of the stretch over two decision
    spans, and a whole window at the settled stretch), at most ``cap`` steps: the first windows run at the user's
    cadence, which a long run leaves behind. Returns the steps taken."""
    done = 0
    while done < cap:
        span = 2 * rec._base_every[0] * rec.budget.stretch
        changes = len(rec.budget.changes)
        run_b(2 * span)
        done += 2 * span
        if len(rec.budget.changes) == changes and rec.budget.settled_time > 0:
            break
    return done


def paired_ratios(run_a, run_b, pairs: int, block: int, group: int) -> tuple[list[float], list[float], list[float]]:
    """Alternate short blocks A B, B A, … of ``block`` steps; sum them in groups of ``group`` pairs (so each
    group holds the same records) and return the per-group ratios B/A and the A and B group times."""
    ratios, ta, tb = [], [], []
    k = 0
    for _ in range(pairs):
        a = b = 0.0
        for _ in range(group):
            if k % 2 == 0:
                a += run_a(block)
                b += run_b(block)
            else:
                b += run_b(block)
                a += run_a(block)
            k += 1
        ratios.append(b / a)
        ta.append(a)
        tb.append(b)
    return ratios, ta, tb


def child_process(rec):
    """The recorder's worker process (`spectralscope.worker.WorkerProcess`), None when it has none."""
    return getattr(rec.runner, "process", None)


class Account:
    """The recorder's own CPU time, counted where it is spent rather than as a difference of two noisy totals:
    main-thread time (time.thread_time) inside the recorder's work — the optimizer record, each instrument's
    hooks and records, the hand-off to the writer — plus every other thread's CPU (the writer, zarr's I/O
    and codec threads), which only the watched run uses. What it cannot see: the records' footprint on the
    training code around them (cache, allocator), which the paired ratios include."""

    def __init__(self, rec) -> None:
        self.main = 0.0
        self._rec = rec
        # what the step hooks call: the optimizer record's snapshot and inputs, the hand-over of every record to
        # its runner (measured there inline; copied for a worker), the row's attributes, each instrument's work
        self._wrap(rec.record, "before")
        self._wrap(rec.record, "after")
        self._wrap(rec.runner, "submit")
        self._wrap(rec.writer, "update_attrs")
        self._wrap(rec, "_emit")  # rows coming back (a worker thread's are not counted here)
        for inst in rec.instruments:
            for name in ("_add", "take", "before_step"):
                if hasattr(inst, name):
                    self._wrap(inst, name)
        if any(isinstance(inst, ss.GradientSpectra) for inst in rec.instruments):
            from spectralscope.hooks import gradients  # its Gram is taken in a backward hook, by this function

            self._wrap(gradients, "per_sample_gram")

    def _wrap(self, obj, name: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return inner(*args, **kwargs)  # a worker's time is among the other threads'
            t = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.main += time.thread_time() - t

        setattr(obj, name, timed)

    def _child(self) -> float:
        """CPU seconds of the recorder's worker process (background=True on the CPU), 0 without one."""
        proc = child_process(self._rec)
        return 0.0 if proc is None else proc.cpu_seconds()

    @staticmethod
    def _threads() -> dict[int, float]:
        """CPU seconds of each Python thread other than the main one, by native id: the writer, zarr's and the
        worker's reader. torch's intra-op threads (not Python threads) train both runs and are left out."""
        cpu = {}
        for t in threading.enumerate():
            if t is threading.main_thread() or t.native_id is None:
                continue
            seconds = stat_cpu_seconds(f"/proc/self/task/{t.native_id}/stat")
            if seconds is not None:  # None: it ended
                cpu[t.native_id] = seconds
        return cpu

    def start(self) -> None:
        self.main = 0.0
        self._threads0, self._child0 = self._threads(), self._child()

    def stop(self) -> tuple[float, float, float]:
        """(main-thread seconds inside the recorder, other Python threads' seconds, worker process seconds) since
        `start`."""
        others = sum(cpu - self._threads0.get(tid, 0.0) for tid, cpu in self._threads().items())
        return self.main, others, self._child() - self._child0


def demo_setup(args: argparse.Namespace):
    """The demo's largest model (`spectralscope.demo`: GPT width 96, depth 4, ctx 64, batch 16 of its
    bundled corpus) with its optimizers (Muon on the hidden matrices, AdamW on the rest, no weight decay),
    and the demo's instrument cadence for its default 300 steps."""
    from spectralscope.corpus import load_corpus
    from spectralscope.demo import DemoConfig
    from spectralscope.gpt import GPT as DemoGPT
    from spectralscope.gpt import GPTConfig

    cfg = DemoConfig()
    width = max(cfg.widths)
    corpus = load_corpus(cfg.data)
    base = DemoGPT(GPTConfig(vocab=corpus.vocab, width=width, depth=cfg.depth, heads=max(1, width // 16), ctx=cfg.ctx))

    def opts(model):
        hidden = model.hidden_matrices()
        rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
        return (torch.optim.Muon(hidden, lr=0.02, momentum=0.95, weight_decay=0.0),
                torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0))

    def batches(seed: int):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield corpus.batch(cfg.batch, cfg.ctx, gen)

    probe = corpus.batch(cfg.batch, cfg.ctx, torch.Generator().manual_seed(cfg.seed + 1))
    cadence = max(1, cfg.steps // 6)
    instruments = {
        "activations": ss.ActivationSpectra(every=max(1, cfg.steps // 12), max_tokens=2048),
        "gradients": ss.GradientSpectra(every=cadence, max_samples=cfg.batch),
        "sharpness": ss.Sharpness(DemoGPT.loss, probe, every=cadence),  # as the demo: picklable
    }
    desc = (f"demo GPT width {width}, depth {cfg.depth}, batch {cfg.batch}x{cfg.ctx} tokens")
    return base, opts, batches, instruments, desc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, pairs=12)
    ap.add_argument("--demo", action="store_true", help="the demo's largest model instead of this transformer")
    ap.add_argument("--all-instruments", action="store_true",
                    help="with --demo: every instrument at the demo's cadence (activations every 25 steps, "
                         "per-sample gradients and sharpness every 50)")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--block", type=int, default=10, help="steps per A or B block (default: one optimizer record)")
    ap.add_argument("--group", type=int, default=5, help="pairs summed per ratio (default: 50 steps, one activation record)")
    ap.add_argument("--no-activations", action="store_true", help="watch with activations=None")
    ap.add_argument("--control", action="store_true", help="A/A control: B is not watched (the harness's own bias)")
    ap.add_argument("--inline", action="store_true",
                    help="watch with background=False (records measured and written on the training thread)")
    ap.add_argument("--thread", action="store_true", help="watch with background='thread' (records on a worker thread)")
    ap.add_argument("--lend-core", action="store_true",
                    help="watch with lend_core=True (training on one torch thread fewer while the worker process "
                         "measures)")
    ap.add_argument("--clock", choices=("process", "wall"), default=None,
                    help="time blocks by process CPU time (default with --inline at one torch thread) or by the "
                         "wall clock (default otherwise)")
    ap.add_argument("--overhead", type=float, default=None,
                    help="watch with this overhead budget (e.g. 0.02, watch's default); without it the budget is off "
                         "(the cadence is the user's); the stretch it settled on is printed")
    ap.add_argument("--settle", type=int, default=3000,
                    help="with --overhead: at most this many steps of the watched model alone before timing, for its "
                         "budget to settle (default 3000)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's (and BLAS's) thread count; default: torch's own default, as users train")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.all_instruments and not args.demo:
        ap.error("--all-instruments needs --demo")
    if args.inline and args.thread:
        ap.error("--inline and --thread exclude each other")
    if args.lend_core and (args.inline or args.thread):
        ap.error("--lend-core is about the worker process: not with --inline or --thread")
    args.clock = args.clock or ("process" if args.inline and torch.get_num_threads() == 1 else "wall")
    mode = ("inline" if args.inline else "on a worker thread" if args.thread else
            "in a worker process" + (", a core lent to it" if args.lend_core else ""))
    if args.demo:
        base, make_opts, batches, instruments, desc = demo_setup(args)
        stream_a, stream_b = batches(1), batches(1)
    else:
        base = GPT(VOCAB, args.width, args.depth, args.ctx)
        make_opts, instruments = optimizers, {}
        desc = f"GPT width {args.width}, depth {args.depth}, batch {args.batch}x{args.ctx} tokens"
        stream_a, stream_b = token_batches(args.batch, args.ctx), token_batches(args.batch, args.ctx)
    # Both models are copies of one initialisation, made the same way: an A/A run of this harness with the
    # original model as A showed a +1.3–1.9% bias from where the tensors of a fresh model and a copy live.
    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    del base
    opts_a, opts_b = make_opts(plain), make_opts(watched)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    lent = [0]  # plain blocks begun while the watched model's loan of a core was still out
    run_a = make_block(plain, opts_a, stream_a, clock, lent)
    run_b = make_block(watched, opts_b, stream_b, clock)
    steps = args.block * args.group
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"activations": None} if args.no_activations else {}
        if args.all_instruments:
            extra = instruments
        if args.inline or args.thread:
            extra["background"] = False if args.inline else "thread"
        extra["overhead"] = args.overhead
        if args.lend_core:
            extra["lend_core"] = True
        rec = None if args.control else ss.watch(opts_b[0], watched, f"{tmp}/bench.zarr", every=args.every, **extra)
        if rec is not None and child_process(rec) is not None:
            child_process(rec).wait_ready(120)  # records wait for no one while it starts: they are measured inline
        account = Account(rec) if rec is not None else None
        run_a(steps), run_b(steps)  # warm-up, and the watched run starts its next group at a record
        settled = settle_budget(rec, run_b, args.settle) if rec is not None and rec.budget is not None else 0
        if account is not None:
            account.start()
        ratios, ta, tb = paired_ratios(run_a, run_b, args.pairs, args.block, args.group)
        main_s, others_s, child_s = account.stop() if account is not None else (0.0, 0.0, 0.0)
        n_layers, budget = 0, None
        if rec is not None:
            rec.close()
            n_layers, budget = len(rec.layers), rec.overhead_report()
    n_params = sum(p.numel() for p in plain.parameters())
    step = statistics.median(ta) / steps
    q = statistics.quantiles(ratios, n=4)
    what = ("every instrument at the demo's cadence" if args.all_instruments
            else f"activations {'off' if args.no_activations else 'every 50'}")
    print(f"model: {desc}, {n_params / 1e6:.2f}M parameters; "
          + ("CONTROL: B not watched; " if args.control else f"{n_layers} watched matrices; ")
          + f"optimizer record every {args.every} steps {mode}, {what}; "
          + f"{args.clock} clock; torch on {torch.get_num_threads()} thread(s)"
          + ("" if args.threads else " (its default)") + "; "
          f"{args.pairs} ratios, each over {args.group} alternating pairs of {args.block}-step blocks")
    print(f"{'plain step':>11} {'watched/plain':>14} {'IQR':>15} {'min–max':>15} {'sum B/sum A':>12} "
          f"{'records per ' + str(steps) + ' steps':>22}")
    overhead = statistics.median(ratios) - 1
    print(f"{1e3 * step:9.1f}ms {100 * overhead:+13.2f}% {100 * (q[0] - 1):+6.2f}…{100 * (q[2] - 1):+.2f}% "
          f"{100 * (min(ratios) - 1):+6.2f}…{100 * (max(ratios) - 1):+.2f}% {100 * (sum(tb) / sum(ta) - 1):+11.2f}% "
          f"{overhead * steps:17.2f} steps")
    if lent[0]:
        print(f"WARNING: {lent[0]} plain blocks began with a core still lent to the worker process: they ran slower")
    if budget is not None:
        print(f"overhead budget {100 * budget['budget']:.1f}%: the recorder's own account {100 * budget['achieved']:.2f}% "
              f"of training time (since the cadence settled {budget['settled_share']}); cadence x{budget['stretch']} "
              f"{budget['cadence']}, changed at {budget['changes']}; timed after {settled} steps of settling "
              "(with records this sparse, sum B/sum A is the figure: a median of short ratios misses them)")
    if not args.control:
        plain = sum(ta)
        child = "" if args.inline or args.thread else f" + worker process {100 * child_s / plain:.2f}%"
        print(f"direct account over the same {args.pairs * steps} watched steps: recorder work on the training thread "
              f"{100 * main_s / plain:.2f}% + writer and zarr threads {100 * others_s / plain:.2f}%{child} "
              f"= {100 * (main_s + others_s + child_s) / plain:.2f}% of the plain run's time (CPU)")


if __name__ == "__main__":
    main()
