"""Quickstart: train a small MLP-mixer-style model with torch.optim.Muon and record it.

    python examples/quickstart.py [--out runs/quickstart.zarr] [--steps 300]

The training loop is unchanged; one `ss.watch(...)` line records the optimizer's spectra.
Afterwards `spectralscope info` prints what was recorded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from torch import nn

import spectralscope as ss


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d, bias=False), "c_proj": nn.Linear(4 * d, d, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp["c_proj"](torch.relu(self.mlp["c_fc"](self.norm(x))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart.zarr")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    d, classes = args.width, 10
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(32, d, bias=False))
    model.add_module("h", nn.Sequential(*[Block(d) for _ in range(3)]))
    model.add_module("head", nn.Linear(d, classes, bias=False))
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("h.")]
    other = [p for n, p in model.named_parameters() if not (p.ndim == 2 and n.startswith("h."))]
    muon = torch.optim.Muon(hidden, lr=0.02, momentum=0.95)
    adamw = torch.optim.AdamW(other, lr=3e-3)
    teacher = torch.randn(32, classes)

    t0 = time.time()
    with ss.watch(muon, model, args.out, every=10, meta={"width": d}, overwrite=True) as rec:
        for step in range(args.steps):
            x = torch.randn(256, 32)
            y = (x @ teacher).argmax(1)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            muon.step()
            adamw.step()
            muon.zero_grad()
            adamw.zero_grad()
            rec.log(loss=loss)
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    print(f"trained {args.steps} steps in {time.time() - t0:.1f} s; recorded into {args.out}\n", flush=True)
    sys.exit(subprocess.call([sys.executable, "-m", "spectralscope.cli", "info", args.out]))


if __name__ == "__main__":
    main()
