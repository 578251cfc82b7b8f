"""`heavy_tail.weight_alpha` against WeightWatcher's own fit, on the same eigenvalues: agreement and speed.

    python benchmarks/weight_alpha.py [--repeats 7]

For each shape, a random heavy-tailed matrix (Student-t entries) and a Gaussian one: λ = σ² in float64 (numpy's
SVD, shared), then our `tail_fit` and WeightWatcher's `WWFit` (what ``WeightWatcher.analyze`` calls by default)
on the same ascending λ, alternating (A B, then B A); the table gives the largest |Δα| and the median of the
per-pair time ratios with its min–max, timed with time.perf_counter() at torch's and BLAS's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = [(128, 256), (512, 512), (768, 3072), (2048, 2048)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=None, help="e.g. 64x128,256x256 (default: the table's)")
    args = ap.parse_args()
    import logging

    from weightwatcher.WW_powerlaw import WWFit

    from spectralscope.heavy_tail import tail_fit

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    print("| matrix | eigenvalues | α ours | α WeightWatcher | max abs diff | time ours / WW, median (min–max) |")
    print("|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for shape in shapes:
        for kind in ("student-t 2.5", "gaussian"):
            w = rng.standard_t(2.5, shape) if kind.startswith("student") else rng.standard_normal(shape)
            lam = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
            ratios, diff, a_ours, a_ww = [], 0.0, np.nan, np.nan
            for r in range(args.repeats):
                times = {}
                for who in (("ours", "ww") if r % 2 == 0 else ("ww", "ours")):
                    t = time.perf_counter()
                    a = tail_fit(lam)[0] if who == "ours" else WWFit(lam).alpha
                    times[who] = time.perf_counter() - t
                    a_ours, a_ww = (a, a_ww) if who == "ours" else (a_ours, a)
                diff = max(diff, abs(a_ours - a_ww))
                ratios.append(times["ours"] / times["ww"])
            print(f"| {kind} {shape[0]}×{shape[1]} | {lam.size} | {a_ours:.6f} | {a_ww:.6f} | {diff:.1e} | "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
