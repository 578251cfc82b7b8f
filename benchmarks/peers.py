"""spectralscope beside the tools researchers would otherwise use, in one run on the same inputs.

    pip install -e ".[bench]"          # weightwatcher and pyhessian (PyPI), for this script only
    python benchmarks/peers.py [--repeats 3] [--big]

1. Weight spectra: our exact route (`spectra.matrix_spectrum`) and, where the cost model picks it, the SLQ
   estimate (`estimate.slq`), against `torch.linalg.svdvals` and WeightWatcher's ESD routine
   (`weightwatcher.RMT_Util.svd_vals`, its "accurate" and "fast" methods; the ESD is their square), on
   Gaussian matrices of the shapes a GPT holds. Error: max |σ − σ_ref|/σ_max against numpy float64 SVD.
2. Activation soft and hard rank: `CovarianceStats` + `covariance_eigenvalues` + `activation_metrics`
   against a direct numpy implementation (np.cov in float64, np.linalg.eigvalsh, the two formulas) on
   4,096 tokens of width d.
3. Curvature: our normalised directional sharpness probe (one Hessian–vector product along the step,
   `ss.Sharpness`) against PyHessian's top Hessian eigenvalue (power iteration, its defaults maxIter=100,
   tol=1e-3) on the `benchmarks/overhead.py` transformer and one batch.
Times are CPU seconds (time.process_time) on one thread, best of ``--repeats``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from overhead import GPT, VOCAB, optimizers, token_batches  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import spectralscope as ss  # noqa: E402
from spectralscope.covariance import CovarianceStats, activation_metrics, covariance_eigenvalues  # noqa: E402
from spectralscope.estimate import choose_method, quantile_bracket, representative_spectrum, slq  # noqa: E402
from spectralscope.spectra import DEFAULT_QUANTILES, matrix_spectrum, quantiles  # noqa: E402


def best(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return min(times), out


def weight_spectra(shapes: list[tuple[int, int]], repeats: int) -> None:
    from weightwatcher.RMT_Util import svd_vals

    print("\n1. weight spectra (Gaussian W, float32): CPU seconds, and max |σ − σ_numpy64|/σ_max")
    print(f"{'shape':>12} {'ours':>9} {'route':>6} {'svdvals':>9} {'ww accurate':>12} {'ww fast':>9} "
          f"{'svdvals/ours':>13} {'ww acc/ours':>12} {'err ours':>9} {'err ww acc':>11} {'err ww fast':>12}")
    for m, n in shapes:
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n)) / n**0.5
        ref = np.linalg.svd(w.double().numpy(), compute_uv=False)
        method = choose_method(m, n)
        if method == "slq":
            t_ours, est = best(lambda w=w: slq(w), repeats)
            qs = np.quantile(ref, DEFAULT_QUANTILES)
            got = quantiles(representative_spectrum(est), list(DEFAULT_QUANTILES)).numpy()
            lo, hi = quantile_bracket(est, list(DEFAULT_QUANTILES))
            assert ((lo.numpy() <= qs) & (qs <= hi.numpy())).all()
            err_ours = float(np.max(np.abs(got - qs)) / ref[0])  # on the 11 recorded quantiles
        else:
            t_ours, sp = best(lambda w=w: matrix_spectrum(w), repeats)
            err_ours = float(np.max(np.abs(sp.sigma.numpy() - ref)) / ref[0])
        t_svd, _ = best(lambda w=w: torch.linalg.svdvals(w), repeats)
        w_np = w.numpy()
        t_wa, sv_a = best(lambda w_np=w_np: svd_vals(w_np, method="accurate"), repeats)
        t_wf, sv_f = best(lambda w_np=w_np: svd_vals(w_np, method="fast"), repeats)
        err_a = float(np.max(np.abs(np.sort(np.asarray(sv_a, dtype=np.float64))[::-1] - ref)) / ref[0])
        err_f = float(np.max(np.abs(np.sort(np.asarray(sv_f, dtype=np.float64))[::-1][: len(ref)] - ref)) / ref[0])
        print(f"{f'{m}x{n}':>12} {t_ours:9.3f} {method:>6} {t_svd:9.3f} {t_wa:12.3f} {t_wf:9.3f} "
              f"{t_svd / t_ours:12.1f}x {t_wa / t_ours:11.1f}x {err_ours:9.1e} {err_a:11.1e} {err_f:12.1e}")


def numpy_ranks(x: np.ndarray) -> tuple[float, float]:
    """The direct implementation: float64 covariance with n − 1, eigvalsh, soft and hard rank (SPEC §6)."""
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)), 0.0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


def activation_ranks(widths: list[int], repeats: int, tokens: int = 4096) -> None:
    print(f"\n2. activation soft/hard rank, {tokens} tokens: CPU seconds")
    print(f"{'width':>6} {'ours':>8} {'numpy':>8} {'numpy/ours':>11} {'|Δ soft rank|':>14} {'|Δ hard rank|':>14}")
    for d in widths:
        g = torch.Generator().manual_seed(d)
        # correlated features with a decaying spectrum, like a layer input
        x = torch.randn(tokens, d, generator=g) @ (torch.randn(d, d, generator=g) * torch.arange(1, d + 1) ** -0.7)

        def ours(x=x, d=d):
            st = CovarianceStats.zeros(d)
            st.add(x)
            out = activation_metrics(covariance_eigenvalues(st))
            return float(out["act_soft_rank"]), float(out["act_hard_rank"])

        t_ours, (soft, hard) = best(ours, repeats)
        x_np = x.numpy()
        t_np, (soft_np, hard_np) = best(lambda x_np=x_np: numpy_ranks(x_np), repeats)
        print(f"{d:6d} {t_ours:8.3f} {t_np:8.3f} {t_np / t_ours:10.2f}x "
              f"{abs(soft - soft_np):14.1e} {abs(hard - hard_np):14.1e}")


def curvature(width: int, depth: int, batch: int, ctx: int, repeats: int) -> None:
    from pyhessian import hessian

    torch.manual_seed(0)
    model = GPT(VOCAB, width, depth, ctx)
    data = next(token_batches(batch, ctx))
    x, y = data[:, :-1], data[:, 1:]

    def loss_fn(mdl, b):
        return F.cross_entropy(mdl(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())

    # ours: one probe as the recorder runs it, after one Muon/AdamW step, timed inside the instrument
    probe_model = copy.deepcopy(model)
    opts = optimizers(probe_model)
    sharp = ss.Sharpness(loss_fn, data, every=1)
    times, nds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rec = ss.watch(opts[0], probe_model, f"{tmp}/p.zarr", every=10**9, activations=None, sharpness=sharp)
        inner = sharp._probe

        def timed(before):
            t = time.process_time()
            out = inner(before)
            times.append(time.process_time() - t)
            nds.append(float(out["nds"]))
            return out

        sharp._probe = timed
        for _ in range(repeats):
            loss_fn(probe_model, data).backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        rec.close()
    t_ours = min(times)

    def top_eigenvalue():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # double backward
            h = hessian(copy.deepcopy(model).train(),
                        lambda out, tgt: F.cross_entropy(out.flatten(0, 1), tgt.flatten()),
                        data=(x, y), cuda=False)
            return h.eigenvalues(top_n=1)[0][0]

    t_ph, lam = best(top_eigenvalue, repeats)
    print(f"\n3. curvature probe, GPT width {width} depth {depth}, batch {batch}x{ctx}: CPU seconds")
    print(f"{'ours: nds probe':>16} {'PyHessian top eig':>18} {'PyHessian/ours':>15} {'nds (ours)':>11} "
          f"{'λ_max (PyHessian)':>18}")
    print(f"{t_ours:16.2f} {t_ph:18.2f} {t_ph / t_ours:14.1f}x {nds[-1]:11.4g} {lam:18.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="add 4096x16384 (the SLQ route; needs ~3 GB and minutes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = [(256, 256), (768, 768), (768, 3072), (2048, 2048)] + ([(4096, 16384)] if args.big else [])
    weight_spectra(shapes, args.repeats)
    activation_ranks([128, 512, 768], args.repeats)
    curvature(128, 4, 32, 128, args.repeats)


if __name__ == "__main__":
    main()
