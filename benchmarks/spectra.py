"""Exact spectrum path (float64 Gram + eigvalsh, small end refined) against torch.linalg.svdvals.

    python benchmarks/spectra.py [--repeats 7]

For each shape and each input (a Gaussian matrix, and one with a prescribed spectrum spread log-uniformly
over 1 … 1e-6), both methods run on the same float32 matrix in alternating order (A B, then B A), timed
with time.process_time() on one thread; the table gives the median of the per-pair time ratios with its
min–max spread, and the largest relative error of each method on every σ with σ/σ_max ≥ 1e-6 against
numpy's float64 SVD of the same matrix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from spectralscope.spectra import singular_values

SHAPES = [(256, 256), (768, 768), (768, 3072), (2048, 2048)]


def _matrix(shape, kind: str, rng: np.random.Generator) -> torch.Tensor:
    m, n = shape
    if kind == "gaussian":
        return torch.from_numpy(rng.standard_normal(shape)).float()
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.geomspace(1.0, 1e-6, r)
    return torch.from_numpy((u * s) @ v.T).float()


def _time(fn, x) -> float:
    t = time.process_time()
    fn(x)
    return time.process_time() - t


def _max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    keep = ref / ref[0] >= 1e-6
    return float(np.max(np.abs(got[keep] - ref[keep]) / ref[keep]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    ours = lambda x: singular_values(x)  # noqa: E731
    theirs = lambda x: torch.linalg.svdvals(x)  # noqa: E731
    print(f"{'shape':>11} {'input':>9} {'ours ms':>9} {'svdvals ms':>10} {'speed-up':>9} {'(min–max)':>13}"
          f" {'ours max rel err':>17} {'svdvals f32 err':>16} {'ours f64-svd err':>17}")
    for shape in SHAPES:
        for kind in ("gaussian", "decaying"):
            x = _matrix(shape, kind, rng)
            ref = np.linalg.svd(x.double().numpy(), compute_uv=False)
            ratios, t_ours, t_theirs = [], [], []
            for i in range(args.repeats):
                if i % 2 == 0:
                    a, b = _time(ours, x), _time(theirs, x)
                else:
                    b, a = _time(theirs, x), _time(ours, x)
                ratios.append(b / a)
                t_ours.append(a)
                t_theirs.append(b)
            err = _max_rel_err(singular_values(x).numpy(), ref)
            err_f32 = _max_rel_err(torch.linalg.svdvals(x).double().numpy(), ref)
            err_svd64 = _max_rel_err(singular_values(x, method="svd").numpy(), ref)
            print(f"{shape[0]:>5}x{shape[1]:<5} {kind:>9} {1e3 * statistics.median(t_ours):9.1f} "
                  f"{1e3 * statistics.median(t_theirs):10.1f} {statistics.median(ratios):8.2f}x "
                  f"({min(ratios):.2f}–{max(ratios):.2f}) {err:17.1e} {err_f32:16.1e} {err_svd64:17.1e}", flush=True)


if __name__ == "__main__":
    main()
