"""Cost of one activation record, one gradient-spectra record and one sharpness probe, in training steps.

    python benchmarks/instruments.py [--pairs 9] [--width 128] [--depth 4] [--batch 32] [--ctx 128]

The transformer of `benchmarks/overhead.py` trains plainly and, beside it, a copy under `ss.watch` with
only the instrument under test switched on, recording at every step. Single steps alternate A B, B A, …
on one thread, timed with time.process_time(); the cost of one record is the median over pairs of
(watched step − plain step) / plain step, with its min–max.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from overhead import GPT, VOCAB, make_block, model_arguments, optimizers, token_batches  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import spectralscope as ss  # noqa: E402

NEVER = 10**9  # the optimizer group is recorded at step 0 only, outside the timed steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, pairs=9)
    ap.add_argument("--only", default="", help="run the rows whose label contains this text")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = lambda: token_batches(args.batch, args.ctx)  # noqa: E731
    probe_batch = next(batches())

    def loss_fn(model, x):
        return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    cases = {
        "activation record (every=1, max_tokens=4096)": {"activations": ss.ActivationSpectra(every=1)},
        "gradient spectra record (every=1, max_samples=64)": {"activations": None, "gradients": ss.GradientSpectra(every=1)},
        "attention logits (every=1, max_queries=256)": {"activations": None,
                                                        "attention": ss.AttentionLogits(every=1)},
        "weight spectra (every=1)": {"activations": None, "weights": ss.WeightSpectra(every=1)},
        "sharpness probe (per_layer=False)": {"activations": None, "sharpness": ss.Sharpness(loss_fn, probe_batch, every=1)},
        "sharpness probe (per_layer=True)": {"activations": None,
                                             "sharpness": ss.Sharpness(loss_fn, probe_batch, every=1, per_layer=True)},
    }
    base = GPT(VOCAB, args.width, args.depth, args.ctx)
    print(f"model: GPT width {args.width}, depth {args.depth}, {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M "
          f"parameters, batch {args.batch}x{args.ctx} tokens; {args.pairs} pairs of single steps per row")
    print(f"{'instrument':<52} {'plain step':>11} {'one record':>12} {'min–max':>17}")
    for label, kw in cases.items():
        if args.only not in label:
            continue
        plain, watched = copy.deepcopy(base), copy.deepcopy(base)
        oa, ob = optimizers(plain), optimizers(watched)
        run_a, run_b = make_block(plain, oa, batches()), make_block(watched, ob, batches())
        with tempfile.TemporaryDirectory() as tmp:
            rec = ss.watch(ob[0], watched, f"{tmp}/i.zarr", every=NEVER, background=False,
                           overhead=None, **kw)  # each cost inline
            run_a(1), run_b(1)  # warm-up, and the optimizer group's one record at step 0
            costs, steps = [], []
            for i in range(args.pairs):
                if i % 2 == 0:
                    a, b = run_a(1), run_b(1)
                else:
                    b, a = run_b(1), run_a(1)
                costs.append((b - a) / a)
                steps.append(a)
            rec.close()
        print(f"{label:<52} {1e3 * statistics.median(steps):9.1f}ms {statistics.median(costs):9.2f} st "
              f"({min(costs):.2f}…{max(costs):.2f})", flush=True)


if __name__ == "__main__":
    main()
