"""Per-sample gradient spectra of a linear layer without forming per-sample gradients (SPEC §6).

For N samples with inputs a_s ∈ R^{T×d_in} and output gradients δ_s ∈ R^{T×d_out} (T tokens; T = 1 for
(batch, features) inputs), sample s's weight gradient is G_s = Σ_t δ_{s,t} a_{s,t}ᵀ. The singular values
of the N × (d_out·d_in) matrix of rows vec(G_s) are sqrt(eigvalsh(K)) with the N×N Gram matrix

    K_{ss'} = ⟨G_s, G_{s'}⟩ = Σ_{t,t'} (δ_{s,t}·δ_{s',t'}) (a_{s,t}·a_{s',t'}),

computed in float64 by whichever of two exact routes costs fewer flops:

- token kernel: K from the (T×T) inner products of a and δ, a block of samples at a time (memory bounded
  by ``max_elements``): N²·T²·(d_in + d_out) multiply-adds, no per-sample gradient formed;
- per-sample gradients: G_s = δ_sᵀ a_s for all s, then K = [vec G][vec G]ᵀ: N·T·d_in·d_out + N²·d_in·d_out,
  used only while the N·d_in·d_out values fit in ``max_elements`` (for sequences, T² ≫ d_in·d_out/(d_in+d_out)
  makes this route 10–100× cheaper; SPEC §6 asks for the first route, this one is its memory-bounded
  shortcut).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spectra import entropy_rank


def sample_view(x: Tensor) -> Tensor:
    """(N, T, d) from (N, d) or (N, ..., d): the leading dimension is the sample, the rest are tokens."""
    if x.ndim == 1:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def per_sample_gram(a: Tensor, delta: Tensor, max_elements: int = 1 << 25) -> Tensor:
    """K_{ss'} = Σ_{t,t'} (δ_{s,t}·δ_{s',t'})(a_{s,t}·a_{s',t'}) in float64, shape (N, N)."""
    a = sample_view(a).to(torch.float64)
    d = sample_view(delta).to(torch.float64)
    if a.shape[:2] != d.shape[:2]:
        raise ValueError(f"inputs {tuple(a.shape)} and output gradients {tuple(d.shape)} disagree on (samples, tokens)")
    n, t = a.shape[0], a.shape[1]
    di, do = a.shape[2], d.shape[2]
    if t == 1:  # one token per sample: K = (A Aᵀ) ∘ (D Dᵀ)
        a2, d2 = a[:, 0], d[:, 0]
        return (a2 @ a2.T) * (d2 @ d2.T)
    kernel_cost = n * n * t * t * (di + do)
    direct_cost = n * t * di * do + n * n * di * do
    if direct_cost < kernel_cost and n * di * do <= max_elements:
        g = torch.einsum("sto,sti->soi", d, a).reshape(n, -1)
        return g @ g.T
    k = torch.empty(n, n, dtype=torch.float64, device=a.device)
    block = max(1, max_elements // max(1, n * t * t))
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        aa = torch.einsum("sti,rui->srtu", a, a[r0:r1])
        dd = torch.einsum("sti,rui->srtu", d, d[r0:r1])
        k[:, r0:r1] = (aa * dd).sum((2, 3))
    return k


def gradient_metrics(k: Tensor) -> dict[str, Tensor]:
    """``grad_sv`` = sqrt(max(eigvalsh(K), 0)) descending; ``grad_soft_rank`` = exp(−Σ p ln p), p = σ²/Σσ².
    NaN when K is not finite."""
    if not bool(torch.isfinite(k).all()):
        nan = torch.full((k.shape[0],), float("nan"), dtype=torch.float64, device=k.device)
        return {"grad_sv": nan, "grad_soft_rank": nan[0]}
    lam = torch.linalg.eigvalsh(k.to(torch.float64)).flip(0).clamp_min(0.0)
    return {"grad_sv": lam.sqrt(), "grad_soft_rank": entropy_rank(lam)}
