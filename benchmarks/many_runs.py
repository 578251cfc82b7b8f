"""Settled values of many runs, read lazily: `fit_scaling` over a folder of N stores.

    python benchmarks/many_runs.py [--runs 1000] [--steps 512] [--layers 24] [--keep DIR]

Writes N runs with the real `RunWriter` (an optimizer group of ``--layers`` layers × 11 quantiles, ``--steps``
rows each; model sizes spread over two decades, values following a power law), then times
``ss.fit_scaling("DIR/*.zarr", metric="momentum_sv", quantile=0.5)`` with xarray's lazy indexing
(``chunks=None``, the default) and with dask arrays (``chunks={}``), and counts the bytes read from disk
(every `zarr.storage.LocalStore.get`) against the bytes the stores hold. Each reading runs in a fresh
process, so neither profits from the other's page cache of Python objects (the OS file cache stays warm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
VARS_Q = ("momentum_sv", "ns_out_sv", "update_sv", "neuron_norm")
VARS = ("momentum_norm", "ns_polar_err", "ns_orth_err", "ns_fail_frac", "update_rms", "update_erank", "neuron_cv",
        "weight_spectral_norm")


def write_runs(folder: Path, runs: int, steps: int, layers: int) -> None:
    from tqdm import tqdm

    from spectralscope.layers import layer_kind
    from spectralscope.store import GroupSpec, RunWriter

    names = [f"h.{i // 6}.{k}.weight" for i, k in
             zip(range(layers), ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.c_fc",
                                 "mlp.c_proj"] * layers, strict=False)]
    blocks = max(1, layers // 6)
    coords = {
        "layer": ("layer", np.array(names)),
        "kind": ("layer", np.array([layer_kind(n) for n in names])),
        "depth": ("layer", np.array([int(n.split(".")[1]) / max(1, blocks - 1) for n in names])),
        "quantile": ("quantile", np.array(QUANTILES)),
    }
    variables = {**{v: ("step", "layer", "quantile") for v in VARS_Q}, **{v: ("step", "layer") for v in VARS}}
    rng = np.random.default_rng(0)
    sizes = np.geomspace(1e5, 1e7, runs)
    for i in tqdm(range(runs), desc="writing runs", unit="run"):
        w = RunWriter(folder / f"run{i:04d}.zarr", [GroupSpec("optimizer", coords, variables)],
                      {"name": f"run{i}", "model_size": int(sizes[i]), "optimizer": {"class": "Muon", "ns_steps": 5}},
                      flush_seconds=3600)
        base = sizes[i] ** -0.25 * np.linspace(0.2, 1.0, len(QUANTILES))
        for s in range(steps):
            row = {v: base * (1 + 0.01 * rng.standard_normal((layers, len(QUANTILES)))) for v in VARS_Q}
            row.update({v: np.full(layers, float(s)) for v in VARS})
            w.append("optimizer", s, row)
        w.close()


def read_once(folder: str, chunks: str) -> dict:
    """In a fresh process: time fit_scaling over every run and count the bytes Zarr reads."""
    import resource

    import zarr.storage

    import spectralscope as ss

    counted = {"bytes": 0, "gets": 0}
    original = zarr.storage.LocalStore.get

    async def get(self, key, prototype=None, byte_range=None):
        buf = await original(self, key, prototype, byte_range)
        if buf is not None:
            counted["bytes"] += len(buf)
            counted["gets"] += 1
        return buf

    zarr.storage.LocalStore.get = get
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    fits = ss.fit_scaling(f"{folder}/*.zarr", metric="momentum_sv", quantile=0.5,
                          chunks=None if chunks == "none" else json.loads(chunks))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return {"wall": wall, "cpu": cpu, "bytes": counted["bytes"], "gets": counted["gets"], "rss_mb": rss / 1024,
            "groups": len(fits), "slope": float(np.median(fits["slope"])), "n_sizes": int(fits["n_sizes"].max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--keep", default=None, help="write the runs here (and reuse them if present)")
    ap.add_argument("--_read", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._read:
        print(json.dumps(read_once(*args._read)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.glob("*.zarr"))) != args.runs:
            t = time.perf_counter()
            write_runs(folder, args.runs, args.steps, args.layers)
            print(f"wrote {args.runs} runs in {time.perf_counter() - t:.0f} s")
        total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        results = {}
        for label, chunks in (("lazy (chunks=None)", "none"), ("dask (chunks={})", "{}")):
            out = subprocess.run([sys.executable, __file__, "--_read", str(folder), chunks], capture_output=True,
                                 text=True, check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.runs} runs × {args.steps} steps × {args.layers} layers × 11 quantiles; "
          f"stores hold {total / 1e6:.1f} MB; fit_scaling(metric='momentum_sv', quantile=0.5), window = last half")
    print(f"{'reading':<20} {'wall s':>7} {'cpu s':>7} {'ms/run':>7} {'MB read':>8} {'of stores':>9} {'reads':>7} "
          f"{'peak RSS +MB':>12} {'groups':>6} {'slope':>7}")
    for label, r in results.items():
        print(f"{label:<20} {r['wall']:7.1f} {r['cpu']:7.1f} {1e3 * r['wall'] / args.runs:7.1f} "
              f"{r['bytes'] / 1e6:8.1f} {100 * r['bytes'] / total:8.1f}% {r['gets']:7d} {r['rss_mb']:12.0f} "
              f"{r['groups']:6d} {r['slope']:7.3f}")


if __name__ == "__main__":
    main()
