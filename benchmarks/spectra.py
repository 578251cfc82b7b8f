"""Exact spectrum path (float64 Gram + eigvalsh, small end refined) against torch.linalg.svdvals.

    python benchmarks/spectra.py [--repeats 7]
    python benchmarks/spectra.py --batched [--device cuda]   # a record's same-shaped matrices: one by one or batched

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

from spectralscope.spectra import _gram_batch, matrix_spectrum, singular_values
from spectralscope.threads import one_blas_thread

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


#: (shape, how many) of a record's same-shaped matrices: the demo's largest model (width 96: q/k/v/o and the MLP's
#: two) and the overhead benchmark's transformer (width 128)
GROUPS = [((96, 96), 16), ((96, 384), 4), ((384, 96), 4), ((128, 128), 16), ((128, 512), 4), ((512, 128), 4)]


def _well_conditioned(shape, rng: np.random.Generator, device: str) -> torch.Tensor:
    """A matrix with σ in [0.7, 1.2], like a Newton–Schulz output or a Muon update: the Gram route needs no
    refinement, the case the batch takes."""
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    return torch.from_numpy((u * rng.uniform(0.7, 1.2, min(m, n))) @ v.T).float().to(device)


def batched_table(repeats: int, device: str) -> None:
    """One by one (`matrix_spectrum` per matrix) against one batched call (`spectra._gram_batch`: stacked Gram,
    batched eigvalsh), alternating, by the wall clock (synchronised on an accelerator)."""
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    print(f"{'group':>13} {'one by one ms':>14} {'batched ms':>11} {'batched/one':>12} {'(min–max)':>13} "
          f"{'max rel err':>12}")
    with one_blas_thread():
        for shape, count in GROUPS:
            mats = [_well_conditioned(shape, rng, device) for _ in range(count)]
            one = lambda mats=mats: [matrix_spectrum(m, 0) for m in mats]  # noqa: E731
            batch = lambda mats=mats: _gram_batch(mats)  # noqa: E731
            one(), batch()
            ratios, t_one, t_batch = [], [], []
            for i in range(repeats):
                a, b = (timed(one), timed(batch)) if i % 2 == 0 else reversed((timed(batch), timed(one)))
                ratios.append(b / a)
                t_one.append(a)
                t_batch.append(b)
            ref = [np.linalg.svd(m.double().cpu().numpy(), compute_uv=False) for m in mats]
            err = max(float(np.max(np.abs(sp.sigma.cpu().numpy() - r) / r)) for sp, r in zip(batch(), ref, strict=True))
            print(f"{count:>3}x{shape[0]:>4}x{shape[1]:<4} {1e3 * statistics.median(t_one):14.2f} "
                  f"{1e3 * statistics.median(t_batch):11.2f} {statistics.median(ratios):11.2f}x "
                  f"({min(ratios):.2f}–{max(ratios):.2f}) {err:12.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batched", action="store_true", help="a record's same-shaped matrices: one by one or batched")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.batched:
        print(f"device {args.device}, torch on {torch.get_num_threads()} threads, BLAS on 1 (as a record runs)")
        return batched_table(max(args.repeats, 21), args.device)
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
