"""Overhead of recording at defaults on a small transformer trained with Muon.

    python benchmarks/overhead.py [--pairs 20] [--width 128] [--depth 4] [--batch 32] [--ctx 128] [--every 10]

Two identical models train side by side in one process, one plain and one under `ss.watch` at defaults
(optimizer spectra every 10 steps, activation spectra every 50). Blocks of `--block` steps (default 50,
so every block holds the same records) alternate A B, B A, … on one thread, each timed with
time.process_time() (which also counts the writer thread). The table gives the median over pairs of the
ratio watched/plain, with its spread, and the cost of the records per block in units of a training step.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # SciPy's BLAS on one thread, like torch below

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import spectralscope as ss  # noqa: E402


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


def make_block(model, opts, batches):
    def run(n: int) -> float:
        t = time.process_time()
        for _ in range(n):
            x = next(batches)
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        return time.process_time() - t

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, pairs=10)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--no-activations", action="store_true", help="watch with activations=None")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = GPT(VOCAB, args.width, args.depth, args.ctx)
    watched = copy.deepcopy(plain)
    opts_a, opts_b = optimizers(plain), optimizers(watched)
    run_a = make_block(plain, opts_a, token_batches(args.batch, args.ctx))
    run_b = make_block(watched, opts_b, token_batches(args.batch, args.ctx))
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"activations": None} if args.no_activations else {}
        rec = ss.watch(opts_b[0], watched, f"{tmp}/bench.zarr", every=args.every, **extra)
        run_a(args.block), run_b(args.block)  # warm-up
        ratios, ta, tb = [], [], []
        for i in range(args.pairs):
            if i % 2 == 0:
                a, b = run_a(args.block), run_b(args.block)
            else:
                b, a = run_b(args.block), run_a(args.block)
            ratios.append(b / a)
            ta.append(a)
            tb.append(b)
        rec.close()
        n_layers = len(rec.layers)
    n_params = sum(p.numel() for p in plain.parameters())
    step = statistics.median(ta) / args.block
    q = statistics.quantiles(ratios, n=4)
    print(f"model: GPT width {args.width}, depth {args.depth}, {n_params / 1e6:.2f}M parameters, "
          f"batch {args.batch}x{args.ctx} tokens; {n_layers} watched matrices; "
          f"optimizer record every {args.every} steps, activations {'off' if args.no_activations else 'every 50'}; "
          f"{args.pairs} pairs of {args.block}-step blocks")
    print(f"{'plain step':>11} {'watched/plain':>14} {'IQR':>15} {'min–max':>15} {'records per block':>18}")
    overhead = statistics.median(ratios) - 1
    print(f"{1e3 * step:9.1f}ms {100 * overhead:+13.2f}% {100 * (q[0] - 1):+6.2f}…{100 * (q[2] - 1):+.2f}% "
          f"{100 * (min(ratios) - 1):+6.2f}…{100 * (max(ratios) - 1):+.2f}% {overhead * args.block:15.2f} steps")


if __name__ == "__main__":
    main()
