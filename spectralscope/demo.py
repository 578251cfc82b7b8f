"""`spectralscope demo`: a width sweep of small GPTs trained with Muon, every instrument recorded, then
the spectral scaling laws and the Newton–Schulz recommendation — "Spectral Scaling Laws of Muon" on a laptop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import recorder
from .corpus import load_corpus
from .fit import fit_scaling, recommend_ns_steps
from .gpt import GPT, GPTConfig
from .hooks.activations import ActivationSpectra
from .hooks.gradients import GradientSpectra
from .hooks.sharpness import Sharpness


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    widths: list[int] = field(default_factory=lambda: [32, 48, 64, 96])
    depth: int = 4
    steps: int = 300
    batch: int = 16
    ctx: int = 64
    data: str = "text"
    imbalance: float = 1.0
    target_size: float | None = None
    seed: int = 0


def train_one(cfg: DemoConfig, width: int, corpus, progress: tqdm) -> Path:
    """Train one width with Muon (hidden matrices) and AdamW (the rest), recording every instrument."""
    torch.manual_seed(cfg.seed)
    heads = max(1, width // 16)
    model = GPT(GPTConfig(vocab=corpus.vocab, width=width, depth=cfg.depth, heads=heads, ctx=cfg.ctx))
    hidden = model.hidden_matrices()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=0.02, momentum=0.95, weight_decay=0.0)
    adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = corpus.batch(cfg.batch, cfg.ctx, torch.Generator().manual_seed(cfg.seed + 1))
    cadence = max(1, cfg.steps // 6)
    path = Path(cfg.out) / f"w{width}.zarr"
    with recorder.watch(
        muon, model, path, every=10, overwrite=True, overhead=None,  # the fits need this cadence
        meta={"width": width, "depth": cfg.depth, "data": cfg.data, "imbalance": cfg.imbalance},
        activations=ActivationSpectra(every=max(1, cfg.steps // 12), max_tokens=2048),
        gradients=GradientSpectra(every=cadence, max_samples=cfg.batch),
        sharpness=Sharpness(GPT.loss, probe, every=cadence),  # a named function: the probe can run in the worker
    ) as rec:
        for _ in range(cfg.steps):
            loss = model.loss(corpus.batch(cfg.batch, cfg.ctx, gen))
            loss.backward()
            muon.step()
            adamw.step()
            muon.zero_grad()
            adamw.zero_grad()
            rec.log(loss=loss)
            progress.update(1)
            progress.set_postfix(width=width, loss=f"{loss.item():.3f}")
    return path


def run_demo(cfg: DemoConfig) -> str:
    """Train the sweep, fit, and return the printed report."""
    if len(cfg.widths) < 3:
        raise ValueError(f"--widths needs at least 3 sizes to fit a power law, got {cfg.widths}")
    if cfg.steps < 20:
        raise ValueError(f"--steps must be at least 20, got {cfg.steps}")
    start = time.time()
    corpus = load_corpus(cfg.data, cfg.imbalance)
    t0 = time.time()
    paths = []
    with tqdm(total=cfg.steps * len(cfg.widths), desc="training", unit="step") as bar:
        for w in sorted(cfg.widths):
            paths.append(train_one(cfg, w, corpus, bar))
    trained = time.time() - t0
    runs = [str(p) for p in paths]
    fits = fit_scaling(runs, metric="momentum_sv")
    fits = fits[fits["quantile"].isin([0.1, 0.5, 0.9])]
    hard = fit_scaling(runs, metric="act_hard_rank")
    sizes = [_size(p) for p in runs]
    target = cfg.target_size or 10 * max(sizes)
    rec = recommend_ns_steps(fits, target, quantile=0.5)

    def show(df) -> str:
        return df.drop(columns=["intercept"], errors="ignore").to_string(index=False, float_format=_fmt)
    return "\n".join([
        f"trained {len(runs)} widths {sorted(cfg.widths)} × {cfg.steps} steps in {trained:.0f} s; runs in {cfg.out}/",
        f"model sizes: {sizes}",
        "",
        "momentum singular-value quantiles (settled, second half) ~ size^slope, by layer kind and depth:",
        show(fits),
        "",
        "activation hard rank ~ size^slope:",
        show(hard),
        "",
        f"Newton–Schulz steps needed at {target:.3g} parameters (median singular value ≥ the 0.5 floor):",
        rec.to_string(index=False, float_format=_fmt),
        "",
        f"demo done in {time.time() - start:.0f} s wall time (training {trained:.0f} s; torch on "
        f"{torch.get_num_threads()} threads)",
    ])


def _size(path: str) -> int:
    from .store import open_run

    return int(open_run(path).attrs["model_size"])


def _fmt(x: float) -> str:
    return f"{x:.4g}"
