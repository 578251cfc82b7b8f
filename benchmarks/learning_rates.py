"""The demo's learning rates: a sweep per optimizer of the hidden matrices, on the demo's model.

    python benchmarks/learning_rates.py [--width 64] [--steps 300] [--seeds 0 1]

Each (optimizer, lr) trains the demo's GPT (``spectralscope.demo.build``: the optimizer on the hidden matrices,
AdamW at the demo's rate on the rest) on the demo's data, without recording, and is scored by the held-out loss:
the mean next-character loss on 8 fixed batches the training never draws (a separate generator), after the last
step. The table prints the score per seed and their mean; the demo uses, per optimizer, the lr of the lowest mean.
"""

from __future__ import annotations

import argparse
import time

import torch

from spectralscope.corpus import load_corpus
from spectralscope.demo import DemoConfig, build

GRID = {"muon": [0.01, 0.02, 0.04], "adamw": [1e-3, 3e-3, 1e-2, 3e-2], "normuon": [0.01, 0.02, 0.04]}


def held_out(model, corpus, cfg: DemoConfig) -> float:
    gen = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        return float(torch.stack([model.loss(corpus.batch(cfg.batch, cfg.ctx, gen)) for _ in range(8)]).mean())


def train(cfg: DemoConfig, name: str, corpus, seed: int) -> float:
    cfg.seed = seed
    model, main, rest = build(cfg, name, cfg.width, 4, corpus.vocab)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        model.loss(corpus.batch(cfg.batch, cfg.ctx, gen)).backward()
        main.step()
        rest.step()
        main.zero_grad()
        rest.zero_grad()
    return held_out(model, corpus, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--data", default="text")
    ap.add_argument("--optimizers", nargs="+", default=list(GRID), choices=list(GRID))
    args = ap.parse_args()
    corpus = load_corpus(args.data)
    print(f"demo GPT width {args.width}, depth 4, {args.steps} steps, data {args.data}, torch "
          f"{torch.get_num_threads()} threads; held-out loss after the last step")
    print(f"| optimizer | lr | {' | '.join(f'seed {s}' for s in args.seeds)} | mean |")
    print(f"|---|---:|{'---:|' * len(args.seeds)}---:|")
    start = time.time()
    for name in args.optimizers:
        grid = GRID[name]
        best = None
        for lr in grid:
            cfg = DemoConfig(width=args.width, steps=args.steps, data=args.data, lrs={name: lr})
            scores = [train(cfg, name, corpus, s) for s in args.seeds]
            mean = sum(scores) / len(scores)
            best = min(best or (mean, lr), (mean, lr))
            print(f"| {name} | {lr:g} | {' | '.join(f'{s:.4f}' for s in scores)} | {mean:.4f} |", flush=True)
        print(f"| **{name}: best lr {best[1]:g}** | | {'| ' * len(args.seeds)}|", flush=True)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
