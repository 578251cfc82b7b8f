"""Real runs for the dashboard tests: tiny GPTs trained with Muon under `ss.watch` with every instrument,
plus the broken stores a runs folder may hold. Also a script: `python tests/dashboard_runs.py live PATH STOP`
records a run until the file STOP exists (the live run of the browser test)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import zarr

import spectralscope as ss
from spectralscope.gpt import GPT, GPTConfig

VOCAB = 32


def _batch(g: torch.Generator, n: int = 8, ctx: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, ctx + 1), generator=g)


def start_run(path: Path, width: int, every: int = 2, flush_seconds: float = 5.0, seed: int = 0, **options):
    """A tiny GPT (depth 2) under `watch` with optimizer spectra, activations, gradients and sharpness
    (``options`` go to `watch` too); returns (recorder, step function)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab=VOCAB, width=width, depth=2, heads=2, ctx=16))
    hidden = model.hidden_matrices()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    muon, adam = torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    probe = _batch(g)
    rec = ss.watch(muon, model, path, overhead=None, every=every, meta={"width": width}, flush_seconds=flush_seconds,
                   activations=ss.ActivationSpectra(every=2 * every, max_tokens=256),
                   gradients=ss.GradientSpectra(every=2 * every, max_samples=8),
                   sharpness=ss.Sharpness(lambda m, b: m.loss(b), probe, every=3 * every, per_layer=True),
                   **options)

    def step() -> None:
        loss = model.loss(_batch(g))
        loss.backward()
        for opt in (muon, adam):
            opt.step()
            opt.zero_grad(set_to_none=True)
        rec.log(loss=loss)

    return rec, step


def finished_run(path: Path, width: int, steps: int = 16, **options) -> Path:
    rec, step = start_run(path, width, **options)
    for _ in range(steps):
        step()
    rec.close()
    return path


def broken_stores(root: Path) -> dict[str, str]:
    """A corrupt store, a Zarr group that is not a run, a .zarr folder without metadata, a run of another
    schema; returns {relative path: the word its problem message contains}."""
    (root / "corrupt.zarr").mkdir()
    (root / "corrupt.zarr" / "zarr.json").write_text("{ this is not json")
    zarr.open_group(str(root / "plain.zarr"), mode="w").attrs["hello"] = "world"
    (root / "empty.zarr").mkdir()
    other = zarr.open_group(str(root / "future.zarr"), mode="w")
    other.attrs.put({"spectralscope": {"schema": 99, "version": "9.9"}, "name": "future"})
    return {"corrupt.zarr": "corrupt", "plain.zarr": "not a spectralscope run", "empty.zarr": "no zarr.json",
            "future.zarr": "schema 99"}


def live(path: str, stopfile: str) -> None:
    rec, step = start_run(Path(path), width=16, every=1, flush_seconds=0.3)
    n = 0
    while not os.path.exists(stopfile) and n < 5000:
        step()
        n += 1
        time.sleep(0.05)
    rec.close()
    print(json.dumps({"steps": n}))


if __name__ == "__main__":
    if sys.argv[1] == "live":
        live(sys.argv[2], sys.argv[3])
