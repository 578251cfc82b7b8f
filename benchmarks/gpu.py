"""The overhead and peer ratios on CUDA, for a 124M-parameter GPT trained in bf16. Not part of CI.

    pip install -e ".[bench]"
    python benchmarks/gpu.py [--pairs 8] [--batch 8] [--repeats 3]
    python benchmarks/gpu.py --smoke          # tiny sizes on whatever device there is (checks the script)

1. Overhead: two copies of one GPT (width 768, depth 12, 12 heads, context 1024, vocabulary 25,000, untied
   head: 124M parameters) train side by side with Muon (hidden matrices) and AdamW (the rest) under
   torch.autocast(bfloat16); one is under `ss.watch`. Alternating blocks A B, B A, … of 10 steps, wall
   time between device synchronisations; ratios over 50-step groups (each holds the same records). Three
   times: at the defaults (optimizer record every 10 steps, activations every 50), at the defaults with
   ``background=True`` (records on a worker thread and its own CUDA stream: the training thread never waits
   for them), and with every instrument on at the demo's cadence (activations every 25, per-sample
   gradients and sharpness every 50).
2. The peer ratios of `benchmarks/peers.py` on the device: weight spectra of the GPT's shapes (768²,
   768×3072) and of larger layers against torch.linalg.svdvals and WeightWatcher; activation ranks against
   numpy; our sharpness probe against PyHessian's top eigenvalue on the 124M model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from overhead import paired_ratios
from peers import activation_ranks, curvature, weight_spectra
from spectra import batched_table

import spectralscope as ss
from spectralscope.gpt import GPT, GPTConfig


def optimizers(model: GPT):
    hidden = model.hidden_matrices()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return (torch.optim.Muon(hidden, lr=0.02, momentum=0.95, weight_decay=0.0),
            torch.optim.AdamW(rest, lr=3e-4, weight_decay=0.0))


def batches(vocab: int, batch: int, ctx: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, ctx + 1), generator=g).to(device, non_blocking=True)


def block_runner(model: GPT, opts, stream, device: str):
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16

    def run(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter() if cuda else time.process_time()
        for _ in range(n):
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype):
                loss = model.loss(next(stream))
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() if cuda else time.process_time()) - t

    return run


def overhead(cfg: GPTConfig, batch: int, pairs: int, device: str, all_instruments: bool,
             background: bool = False) -> None:
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    del base
    oa, ob = optimizers(plain), optimizers(watched)
    run_a = block_runner(plain, oa, batches(cfg.vocab, batch, cfg.ctx, device), device)
    run_b = block_runner(watched, ob, batches(cfg.vocab, batch, cfg.ctx, device), device)
    extra = {}
    if all_instruments:
        probe = next(batches(cfg.vocab, batch, cfg.ctx, device, seed=2))
        extra = {"activations": ss.ActivationSpectra(every=25, max_tokens=2048),
                 "gradients": ss.GradientSpectra(every=50, max_samples=batch),
                 "sharpness": ss.Sharpness(lambda m, b: m.loss(b), probe, every=50)}
    block, group = 10, 5
    with tempfile.TemporaryDirectory() as tmp:
        # the budget off: the cadence given, as the CPU targets are measured
        rec = ss.watch(ob[0], watched, f"{tmp}/gpu.zarr", background=background, overhead=None, **extra)
        run_a(block * group), run_b(block * group)  # warm-up (kernels, allocator); B starts a group at a record
        ratios, ta, _ = paired_ratios(run_a, run_b, pairs, block, group)
        rec.close()
    n_params = sum(p.numel() for p in plain.parameters())
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    what = "every instrument at the demo's cadence" if all_instruments else "defaults"
    what += ", optimizer records on a worker thread (background=True)" if background else ""
    print(f"\n1. overhead, {what}: GPT {n_params / 1e6:.0f}M parameters, width {cfg.width}, depth {cfg.depth}, "
          f"batch {batch}x{cfg.ctx}, bf16 autocast on {device}; {pairs} ratios of 50-step groups")
    print(f"{'plain step':>11} {'watched/plain':>14} {'IQR':>17}")
    print(f"{1e3 * statistics.median(ta) / (block * group):9.1f}ms {100 * (statistics.median(ratios) - 1):+13.2f}% "
          f"{100 * (q[0] - 1):+7.2f}…{100 * (q[2] - 1):+.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks that the script runs")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA device here: this benchmark is for a GPU (use --smoke to check the script on a CPU)")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}")
    if args.smoke:
        cfg, batch, pairs, repeats = GPTConfig(vocab=64, width=32, depth=2, heads=2, ctx=16), 4, 2, 1
        shapes, widths = [(64, 96)], [32]
    else:
        cfg, batch, pairs, repeats = GPTConfig(vocab=25_000, width=768, depth=12, heads=12, ctx=1024), args.batch, \
            args.pairs, args.repeats
        shapes, widths = [(768, 768), (768, 3072), (2048, 8192), (4096, 11008), (8192, 8192)], [768, 3072]
    torch.backends.cuda.matmul.allow_tf32 = False  # the spectra are float64 anyway; keep the peers honest
    overhead(cfg, batch, pairs, device, all_instruments=False)
    overhead(cfg, batch, pairs, device, all_instruments=False, background=True)
    overhead(cfg, batch, pairs, device, all_instruments=True)
    weight_spectra(shapes, repeats, device)
    print("\n2b. a record's same-shaped matrices, one by one or in one batched call (benchmarks/spectra.py --batched)")
    batched_table(3 if args.smoke else 21, device)
    activation_ranks(widths, repeats, device=device)
    torch.manual_seed(0)
    model = GPT(cfg)
    data = next(batches(cfg.vocab, batch, cfg.ctx, "cpu", seed=3))
    curvature(model, optimizers, data, repeats, device,
              label=f"GPT {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M, batch {batch}x{cfg.ctx}, float32")


if __name__ == "__main__":
    main()
