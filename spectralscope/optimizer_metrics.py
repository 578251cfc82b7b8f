"""The optimizer-side metrics of one watched matrix (SPEC §6), each family one pure function.

Notation: W ∈ R^{m×n} (rows = output neurons), r = min(m, n), σ descending singular values,
q(·) the linear-interpolation quantile at the recorded levels. Every function returns a dict of float64
tensors on the input's device, keyed by the store's variable names; input with any NaN/Inf entry gives
NaN for every metric of the family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .newton_schulz import NSConfig, newton_schulz, ns_threshold
from .spectra import (
    DEFAULT_QUANTILES,
    as_matrix,
    entropy_rank,
    gram,
    quantiles,
    singular_values,
    spectral_norm,
    top_singular_value,
)

_NAN = float("nan")


def _scalar(x: float | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _all_nan(names: dict[str, bool], nq: int, device: torch.device) -> dict[str, Tensor]:
    """NaN for every metric: a matrix with NaN/Inf entries has no meaningful spectrum or norm."""
    return {k: torch.full((nq,) if q else (), _NAN, dtype=torch.float64, device=device) for k, q in names.items()}


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def momentum_metrics(m: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES, ns_config: NSConfig | None = None,
                     floor: float = 0.5) -> dict[str, Tensor]:
    """Spectrum of the matrix M that the optimizer orthogonalises.

    ``momentum_norm`` = ‖M‖_F; ``momentum_sv`` = q(σ(M̃)) with M̃ = M/‖M‖_F;
    ``ns_fail_frac`` = #{i : σ_i(M̃) < ns_threshold(k, coefficients, floor)} / r (only with ``ns_config``).
    A zero M has no direction: M̃ and everything derived from it are NaN.
    """
    mat = as_matrix(m)
    dev = mat.device
    if not _finite(mat):
        names = {"momentum_norm": False, "momentum_sv": True}
        return _all_nan(names | ({"ns_fail_frac": False} if ns_config else {}), len(qs), dev)
    norm = torch.linalg.matrix_norm(mat.to(torch.float64))
    sigma = singular_values(mat, assume_finite=True)
    finite_pos = bool(torch.isfinite(norm)) and float(norm) > 0
    sig_n = sigma / norm if finite_pos else torch.full_like(sigma, _NAN)
    out = {"momentum_norm": norm, "momentum_sv": quantiles(sig_n, qs)}
    if ns_config is not None:
        thr = ns_threshold(ns_config.steps, ns_config.coefficients, floor)
        frac = (sig_n < thr).to(torch.float64).mean() if finite_pos else _scalar(_NAN, dev)
        out["ns_fail_frac"] = frac
    return out


def newton_schulz_metrics(o: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, Tensor]:
    """Residuals of the NS output O against an orthogonal matrix.

    ``ns_out_sv`` = q(σ(O)); ``ns_polar_err`` = sqrt(mean_i (σ_i(O) − 1)²) (= ‖O − UVᵀ‖_F/√r);
    ``ns_orth_err`` = ‖O·Oᵀ − I_r‖_F / √r with O·Oᵀ taken on the smaller side.
    """
    mat = as_matrix(o)
    if not _finite(mat):
        return _all_nan({"ns_out_sv": True, "ns_polar_err": False, "ns_orth_err": False}, len(qs), mat.device)
    r = min(mat.shape)
    g = gram(mat, full=False)  # lower triangle: G is symmetric
    sigma = singular_values(mat, g=g, assume_finite=True)
    # ‖G − I‖_F² = Σ_i (G_ii − 1)² + 2·Σ_{i>j} G_ij²
    off = torch.tril(g, -1)
    orth = ((torch.diagonal(g) - 1.0).square().sum() + 2.0 * off.square().sum()).sqrt()
    return {
        "ns_out_sv": quantiles(sigma, qs),
        "ns_polar_err": ((sigma - 1.0) ** 2).mean().sqrt(),
        "ns_orth_err": orth / r**0.5,
    }


def update_metrics(dw: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, Tensor]:
    """Statistics of the realised step ΔW = W_after − W_before.

    ``update_rms`` = sqrt(mean ΔW²); ``update_sv`` = q(σ(ΔW)) (unnormalised: q=1 is ‖ΔW‖₂);
    ``update_erank`` = exp(−Σ p_i ln p_i), p_i = σ_i²/Σσ_j²;
    with row norms ρ_j = ‖ΔW_j,:‖₂: ``neuron_norm`` = q(ρ / mean ρ), ``neuron_cv`` = std(ρ)/mean(ρ)
    (population std, ddof = 0). Normalised quantities are NaN for a zero step.
    """
    mat = as_matrix(dw).to(torch.float64)
    if not _finite(mat):
        names = {"update_rms": False, "update_sv": True, "update_erank": False, "neuron_norm": True, "neuron_cv": False}
        return _all_nan(names, len(qs), mat.device)
    sigma = singular_values(mat, assume_finite=True)
    rho = torch.linalg.vector_norm(mat, dim=1)
    mean = rho.mean()
    ok = bool(torch.isfinite(mean)) and float(mean) > 0
    ratio = rho / mean if ok else torch.full_like(rho, _NAN)
    return {
        "update_rms": mat.square().mean().sqrt(),
        "update_sv": quantiles(sigma, qs),
        "update_erank": entropy_rank(sigma.square()),
        "neuron_norm": quantiles(ratio, qs),
        "neuron_cv": rho.std(correction=0) / mean if ok else _scalar(_NAN, mat.device),
    }


#: Up to this smaller side σ_1(W) is computed exactly (one eigenvalue of the Gram matrix costs less than
#: the matrix–vector products of power iteration); above it, warm-started power iteration.
EXACT_TOP_MAX = 512


def weight_metrics(w: Tensor, v0: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """``weight_spectral_norm`` = σ_1(W): exact for min(m, n) ≤ ``EXACT_TOP_MAX``, else by power iteration
    warm-started from ``v0`` (to 1e-6 relative change). Returns the metrics and the singular-vector
    estimate to pass back as ``v0`` next time (None on the exact path)."""
    if min(as_matrix(w).shape) <= EXACT_TOP_MAX:
        return {"weight_spectral_norm": top_singular_value(w)}, None
    s1, v = spectral_norm(w, v0)
    return {"weight_spectral_norm": s1}, v


__all__ = [
    "momentum_metrics",
    "newton_schulz",
    "newton_schulz_metrics",
    "update_metrics",
    "weight_metrics",
]
