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
Times are CPU seconds (time.process_time) on one thread, best of ``--repeats``; `benchmarks/gpu.py` runs the
same functions on CUDA (wall seconds between synchronisations).
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


def best(fn, repeats: int, device: str = "cpu") -> tuple[float, object]:
    """The fastest of ``repeats`` calls and the last result: CPU seconds (time.process_time) on the CPU, wall
    seconds between device synchronisations on an accelerator."""
    out, times = None, []
    cuda = device.startswith("cuda")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        else:
            t = time.process_time()
            out = fn()
            times.append(time.process_time() - t)
    return min(times), out


def peer(name: str):
    """Import a peer package, or None (with a note) where the bench extra is not installed."""
    try:
        return __import__(name)
    except ImportError:
        print(f"  ({name} not installed: pip install -e '.[bench]')")
        return None


def weight_spectra(shapes: list[tuple[int, int]], repeats: int, device: str = "cpu") -> None:
    ww = peer("weightwatcher.RMT_Util")
    svd_vals = ww.RMT_Util.svd_vals if ww is not None else None
    print("\n1. weight spectra (Gaussian W, float32): seconds, and max |σ − σ_numpy64|/σ_max (SLQ: over the 11 "
          "recorded quantiles, which lie inside their brackets)")
    print(f"{'shape':>12} {'ours':>9} {'route':>6} {'svdvals':>9} {'ww accurate':>12} {'ww fast':>9} "
          f"{'svdvals/ours':>13} {'ww acc/ours':>12} {'err ours':>9} {'err ww acc':>11} {'err ww fast':>12}")
    for m, n in shapes:
        w = (torch.randn(m, n, generator=torch.Generator().manual_seed(m * n)) / n**0.5).to(device)
        ref = np.linalg.svd(w.double().cpu().numpy(), compute_uv=False)
        method = choose_method(m, n)
        if method == "slq":
            t_ours, est = best(lambda w=w: slq(w), repeats, device)
            qs = np.quantile(ref, DEFAULT_QUANTILES)
            got = quantiles(representative_spectrum(est), list(DEFAULT_QUANTILES)).cpu().numpy()
            lo, hi = (x.cpu().numpy() for x in quantile_bracket(est, list(DEFAULT_QUANTILES)))
            assert ((lo <= qs) & (qs <= hi)).all()
            err_ours = float(np.max(np.abs(got - qs)) / ref[0])
        else:
            t_ours, sp = best(lambda w=w: matrix_spectrum(w), repeats, device)
            err_ours = float(np.max(np.abs(sp.sigma.cpu().numpy() - ref)) / ref[0])
        t_svd, _ = best(lambda w=w: torch.linalg.svdvals(w), repeats, device)
        row = f"{f'{m}x{n}':>12} {t_ours:9.3f} {method:>6} {t_svd:9.3f} "
        if svd_vals is None:
            print(row + f"{'–':>12} {'–':>9} {t_svd / t_ours:12.1f}x {'–':>12} {err_ours:9.1e}")
            continue
        w_np = w.cpu().numpy()  # WeightWatcher takes numpy arrays (its "fast" method uses torch on CUDA)
        t_wa, sv_a = best(lambda w_np=w_np: svd_vals(w_np, method="accurate"), repeats, device)
        t_wf, sv_f = best(lambda w_np=w_np: svd_vals(w_np, method="fast"), repeats, device)
        err_a = float(np.max(np.abs(np.sort(np.asarray(sv_a, dtype=np.float64))[::-1] - ref)) / ref[0])
        err_f = float(np.max(np.abs(np.sort(np.asarray(sv_f, dtype=np.float64))[::-1][: len(ref)] - ref)) / ref[0])
        print(row + f"{t_wa:12.3f} {t_wf:9.3f} {t_svd / t_ours:12.1f}x {t_wa / t_ours:11.1f}x "
              f"{err_ours:9.1e} {err_a:11.1e} {err_f:12.1e}")


def numpy_ranks(x: np.ndarray) -> tuple[float, float]:
    """The direct implementation: float64 covariance with n − 1, eigvalsh, soft and hard rank (SPEC §6)."""
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)), 0.0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum())), float(lam.sum() ** 2 / (lam**2).sum())


def activation_ranks(widths: list[int], repeats: int, tokens: int = 4096, device: str = "cpu") -> None:
    print(f"\n2. activation soft/hard rank, {tokens} tokens: seconds (numpy on the host)")
    print(f"{'width':>6} {'ours':>8} {'numpy':>8} {'numpy/ours':>11} {'|Δ soft rank|':>14} {'|Δ hard rank|':>14}")
    for d in widths:
        g = torch.Generator().manual_seed(d)
        # correlated features with a decaying spectrum, like a layer input
        x = torch.randn(tokens, d, generator=g) @ (torch.randn(d, d, generator=g) * torch.arange(1, d + 1) ** -0.7)
        x_dev = x.to(device)

        def ours(x=x_dev, d=d):
            st = CovarianceStats.zeros(d, x.device)
            st.add(x)
            out = activation_metrics(covariance_eigenvalues(st))
            return float(out["act_soft_rank"]), float(out["act_hard_rank"])

        t_ours, (soft, hard) = best(ours, repeats, device)
        x_np = x.numpy()
        t_np, (soft_np, hard_np) = best(lambda x_np=x_np: numpy_ranks(x_np), repeats)
        print(f"{d:6d} {t_ours:8.3f} {t_np:8.3f} {t_np / t_ours:10.2f}x "
              f"{abs(soft - soft_np):14.1e} {abs(hard - hard_np):14.1e}")


def curvature(model: torch.nn.Module, make_opts, data: torch.Tensor, repeats: int, device: str = "cpu",
              label: str = "") -> None:
    """Our sharpness probe (as the recorder runs it, after a real optimizer step, timed inside the instrument)
    against PyHessian's top eigenvalue, both in float32 on ``device`` on the batch ``data`` (batch, ctx + 1)."""
    pyhessian = peer("pyhessian")
    model = model.to(device)
    data = data.to(device)
    x, y = data[:, :-1], data[:, 1:]

    def loss_fn(mdl, b):
        return F.cross_entropy(mdl(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())

    probe_model = copy.deepcopy(model)
    opts = make_opts(probe_model)
    sharp = ss.Sharpness(loss_fn, data, every=1)
    times, nds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rec = ss.watch(opts[0], probe_model, f"{tmp}/p.zarr", every=10**9, activations=None, overhead=None, sharpness=sharp,
                       background=False)
        inner = sharp.finisher.finish  # the probe of one step, on the training thread (background=False)

        def timed(taken):
            t, (out, _) = best(lambda: inner(taken), 1, device)
            times.append(t)
            nds.append(float(out["nds"]))
            return out, []

        sharp.finisher.finish = timed
        for _ in range(repeats):
            loss_fn(probe_model, data).backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        rec.close()
    t_ours = min(times)
    print(f"\n3. curvature probe, {label}: seconds")
    if pyhessian is None:
        print(f"{'ours: nds probe':>16}\n{t_ours:16.2f}")
        return

    def top_eigenvalue():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # double backward
            h = pyhessian.hessian(copy.deepcopy(model).train(),
                                  lambda out, tgt: F.cross_entropy(out.flatten(0, 1), tgt.flatten()),
                                  data=(x, y), cuda=device.startswith("cuda"))
            return h.eigenvalues(top_n=1)[0][0]

    t_ph, lam = best(top_eigenvalue, repeats, device)
    print(f"{'ours: nds probe':>16} {'PyHessian top eig':>18} {'PyHessian/ours':>15} {'nds (ours)':>11} "
          f"{'λ_max (PyHessian)':>18}")
    print(f"{t_ours:16.2f} {t_ph:18.2f} {t_ph / t_ours:14.1f}x {nds[-1]:11.4g} {lam:18.4g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", action="store_true", help="add 4096x11008 (the SLQ route; needs ~2 GB and minutes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = [(256, 256), (768, 768), (768, 3072), (2048, 2048)] + ([(4096, 11008)] if args.big else [])
    weight_spectra(shapes, args.repeats)
    activation_ranks([128, 512, 768], args.repeats)
    torch.manual_seed(0)
    curvature(GPT(VOCAB, 128, 4, 128), optimizers, next(token_batches(32, 128)), args.repeats,
              label="GPT width 128 depth 4 (benchmarks/overhead.py), batch 32x128")


if __name__ == "__main__":
    main()
