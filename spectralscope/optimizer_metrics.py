"""The optimizer-side metrics of one watched matrix (SPEC §6), each family one pure function.

Notation: W ∈ R^{m×n} (rows = output neurons), r = min(m, n), σ descending singular values,
q(·) the linear-interpolation quantile at the recorded levels. Every function returns a dict of float64
tensors on the input's device, keyed by the store's variable names; input with any NaN/Inf entry gives
NaN for every metric of the family. ``spectrum`` computes σ and the Gram diagonal (default `gram_spectrum`;
any exact route gives the same values to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .newton_schulz import NSConfig, newton_schulz, ns_threshold
from .spectra import (
    DEFAULT_QUANTILES,
    as_matrix,
    entropy_rank,
    gram_spectrum,
    quantiles,
    spectral_norm,
    top_singular_value,
)

_NAN = float("nan")

#: σ descending and the Gram diagonal of a matrix, as `gram_spectrum` returns them (the first two items of
#: whatever it returns): the recorder passes `matrix_spectrum` with the layer's route hint instead.
SpectrumFn = Callable[[Tensor], tuple[Tensor, ...]]


def _unit_scale(x: Tensor) -> Tensor:
    """x/‖x‖ is NaN for a zero, infinite or NaN scale: normalised quantities have no meaning there."""
    return torch.where(torch.isfinite(x) & (x > 0), x, torch.full_like(x, _NAN))


def momentum_metrics(m: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES, ns_config: NSConfig | None = None,
                     floor: float = 0.5, spectrum: SpectrumFn = gram_spectrum) -> dict[str, Tensor]:
    """Spectrum of the matrix M that the optimizer orthogonalises.

    ``momentum_norm`` = ‖M‖_F; ``momentum_sv`` = q(σ(M̃)) with M̃ = M/‖M‖_F;
    ``ns_fail_frac`` = #{i : σ_i(M̃) < ns_threshold(k, coefficients, floor)} / r (only with ``ns_config``).
    A zero M has no direction: M̃ and everything derived from it are NaN.
    """
    sigma, diag = spectrum(m)[:2]
    norm = diag.sum().sqrt()  # ‖M‖_F² = tr(G)
    sig_n = sigma / _unit_scale(norm)
    out = {"momentum_norm": norm, "momentum_sv": quantiles(sig_n, qs)}
    if ns_config is not None:
        thr = ns_threshold(ns_config.steps, ns_config.coefficients, floor)
        frac = (sig_n < thr).to(torch.float64).mean()
        out["ns_fail_frac"] = torch.where(torch.isnan(sig_n[0]), torch.full_like(frac, _NAN), frac)
    return out


def newton_schulz_metrics(o: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES,
                          spectrum: SpectrumFn = gram_spectrum) -> dict[str, Tensor]:
    """Residuals of the NS output O against an orthogonal matrix.

    ``ns_out_sv`` = q(σ(O)); ``ns_polar_err`` = sqrt(mean_i (σ_i(O) − 1)²) (= ‖O − UVᵀ‖_F/√r);
    ``ns_orth_err`` = ‖O·Oᵀ − I_r‖_F / √r with O·Oᵀ taken on the smaller side, computed from its
    eigenvalues: ‖G − I‖_F² = Σ_i (σ_i² − 1)² for the symmetric G = O·Oᵀ.
    """
    sigma = spectrum(o)[0]
    return {
        "ns_out_sv": quantiles(sigma, qs),
        "ns_polar_err": (sigma - 1.0).square().mean().sqrt(),
        "ns_orth_err": (sigma.square() - 1.0).square().mean().sqrt(),
    }


def update_metrics(dw: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES,
                   spectrum: SpectrumFn = gram_spectrum) -> dict[str, Tensor]:
    """Statistics of the realised step ΔW = W_after − W_before.

    ``update_rms`` = sqrt(mean ΔW²); ``update_sv`` = q(σ(ΔW)) (unnormalised: q=1 is ‖ΔW‖₂);
    ``update_erank`` = exp(−Σ p_i ln p_i), p_i = σ_i²/Σσ_j²;
    with row norms ρ_j = ‖ΔW_j,:‖₂: ``neuron_norm`` = q(ρ / mean ρ), ``neuron_cv`` = std(ρ)/mean(ρ)
    (population std, ddof = 0). Normalised quantities are NaN for a zero step.
    """
    mat = as_matrix(dw)
    sigma, diag = spectrum(mat)[:2]
    if mat.shape[0] <= mat.shape[1]:
        rho = diag.clamp_min(0.0).sqrt()  # the Gram matrix is ΔW·ΔWᵀ: its diagonal holds ρ²
    else:
        rho = torch.linalg.vector_norm(mat.to(torch.float64), dim=1)  # NaN/inf rows make mean(ρ) a NaN scale
    mean = _unit_scale(rho.mean())
    return {
        "update_rms": (diag.sum() / mat.numel()).sqrt(),
        "update_sv": quantiles(sigma, qs),
        "update_erank": entropy_rank(sigma.square()),
        "neuron_norm": quantiles(rho / mean, qs),
        "neuron_cv": rho.std(correction=0) / mean,
    }


#: The self-check within M's leading subspace keeps the singular directions with σ_i ≥ this × ‖M‖_F: below it a
#: bf16 NS output is rounding noise (about two bf16 ulps of the normalised M).
SUBSPACE_FLOOR = 1e-2


def direction_cosine(applied: Tensor, implied: Tensor, within: Tensor | None = None,
                     floor: float = SUBSPACE_FLOOR) -> dict[str, Tensor]:
    """``ns_consistency`` = ⟨A, D⟩ / (‖A‖_F·‖D‖_F) in float64: A the step the optimizer applied (W_before·decay −
    W_after, weight decay removed), D the direction its adapter implies (NS_k of the recorded momentum, as the
    optimizer transforms it). 1 when the recorded momentum reproduces the update; NaN for a zero A or D.

    With ``within`` = M (for an NS that rounds stochastically, whose output cannot be reproduced bit for bit),
    both are first taken into M's leading singular subspace, A ← U_kᵀ·A·V_k and D ← U_kᵀ·D·V_k, with U_k, V_k the
    singular vectors of M whose σ_i ≥ ``floor``·‖M‖_F (from the float64 Gram of the smaller side): where M is
    below the rounding noise, NS's output is that noise amplified, in the applied step and in any
    recomputation alike, and says nothing about M."""
    a, d = as_matrix(applied).to(torch.float64), as_matrix(implied).to(torch.float64)
    if within is not None:
        m = as_matrix(within).to(torch.float64)
        wide = m.shape[0] <= m.shape[1]
        evals, evecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
        sigma = evals.clamp(min=0).sqrt()
        keep = sigma >= floor * torch.linalg.vector_norm(m)
        small, sig = evecs[:, keep], sigma[keep]
        other = (m.T @ small if wide else m @ small) / sig  # the matching singular vectors of the other side
        u, v = (small, other) if wide else (other, small)
        a, d = u.T @ a @ v, u.T @ d @ v
    scale = _unit_scale(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(d))
    return {"ns_consistency": (a * d).sum() / scale}


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
    "direction_cosine",
    "momentum_metrics",
    "newton_schulz",
    "newton_schulz_metrics",
    "update_metrics",
    "weight_metrics",
]
