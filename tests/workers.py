"""Processes that the store tests start, kill and read beside: `python tests/workers.py MODE PATH ...`.

write PATH STOPFILE   append rows whose values encode their step until STOPFILE exists (or 100k rows)
train PATH [FLUSH]    train a tiny model with Muon under `watch` (every=1, flush FLUSH s, default 0.02)
                      forever, printing `step S T` (T = time.monotonic()) after each step
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np


def expected(step, n_layers: int = 3, n_q: int = 4) -> dict[str, np.ndarray]:
    """The row the writer appends at ``step`` (an int, or an array of steps shaped (n, 1, 1)): every value
    is a function of the step, so any torn or misplaced row shows up as a mismatch."""
    grid = step + np.arange(n_layers)[:, None] / 10 + np.arange(n_q)[None, :] / 1000
    return {"a": grid, "b": grid[..., 0]}


def group_spec():
    from spectralscope.store import GroupSpec

    coords = {
        "layer": ("layer", np.array(["x", "y", "z"])),
        "quantile": ("quantile", np.array([0.1, 0.5, 0.9, 1.0])),
    }
    return GroupSpec("optimizer", coords, {"a": ("step", "layer", "quantile"), "b": ("step", "layer")})


def write(path: str, stopfile: str) -> None:
    from spectralscope.store import RunWriter

    w = RunWriter(path, [group_spec()], {"name": "torture", "model_size": 1}, flush_seconds=0.01,
                  initial_chunks=1)  # grow 256 → 512 → … : many resizes while the reader reads
    step = 0
    while not os.path.exists(stopfile) and step < 20_000:
        w.append("optimizer", step, expected(step))
        step += 1
        time.sleep(0.01 if step > 500 else 0.0)
    w.close()


def train(path: str, flush_seconds: str = "0.02") -> None:
    import torch

    import spectralscope as ss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    rec = ss.watch(opt, model, path, overhead=None, every=1, flush_seconds=float(flush_seconds))
    # the worker process (the default on the CPU) commits what it measured when this process dies: its pid
    # lets the killer wait for that before reading
    proc = getattr(rec.runner, "process", None)
    print("ready", proc.proc.pid if proc is not None else 0, flush=True)
    step = 0
    while True:
        loss = model(torch.randn(32, 16)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec.log(loss=loss)
        # the optimizer row of `step` is queued: report when (CLOCK_MONOTONIC is shared by all processes)
        print(f"step {step} {time.monotonic():.6f}", flush=True)
        step += 1


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"write": write, "train": train}[mode](*args)
