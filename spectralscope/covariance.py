"""Activation covariance spectra as pure functions (SPEC §6 "Activations").

A record accumulates the sufficient statistics (n, Σx, Σxxᵀ) of the token vectors x ∈ R^d in float64,
so several forward passes (gradient accumulation) and several processes (an all-reduce under DDP) combine
by addition; the spectrum is taken once, from the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import blas
from torch import Tensor

from .spectra import eigvalsh, entropy_rank, participation_rank

#: Tokens are converted to float64 this many bytes at a time: a whole (tokens, d) float64 copy (16 MiB at
#: 4,096 × 512) would land on fresh pages at every record, whose page faults cost a good part of the
#: arithmetic.
BLOCK_BYTES = 1 << 20


@dataclass
class CovarianceStats:
    """n tokens, s = Σx (d,), ss = Σxxᵀ (d, d), all float64. Only the lower triangle of ss is kept up to
    date (the upper one may be stale): `covariance` reads that triangle alone."""

    n: Tensor
    s: Tensor
    ss: Tensor

    @staticmethod
    def zeros(d: int, device: torch.device | str = "cpu") -> CovarianceStats:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return CovarianceStats(z, torch.zeros(d, dtype=torch.float64, device=device),
                               torch.zeros(d, d, dtype=torch.float64, device=device))

    def reset(self) -> None:
        """Back to zero tokens, in place (a record reuses its buffers rather than fresh pages)."""
        self.n.zero_()
        self.s.zero_()
        self.ss.zero_()

    def add(self, x: Tensor) -> None:
        """Accumulate the rows of x (tokens, d): n += tokens, s += Σx, tril(ss) += tril(xᵀx), in float64,
        converting `BLOCK_BYTES` of rows at a time and adding each block's product into ss in place."""
        x = x.detach()
        rows = max(1, BLOCK_BYTES // (8 * max(1, x.shape[1])))
        self.n += x.shape[0]
        for start in range(0, x.shape[0], rows):
            x64 = x[start : start + rows].to(torch.float64)
            self.s += x64.sum(0)
            _add_gram(self.ss, x64)


def _add_gram(ss: Tensor, x: Tensor) -> None:
    """ss += xᵀx in place, lower triangle at least: BLAS dsyrk (half a matmul's flops) on the CPU, with the
    C-ordered ss seen as the Fortran-ordered transpose whose upper triangle is ss's lower one."""
    if ss.device.type != "cpu":
        ss.addmm_(x.T, x)
        return
    acc = ss.numpy().T  # a view: dsyrk writes into ss itself
    a = np.ascontiguousarray(x.numpy()).T  # (d, tokens), Fortran-ordered without a copy
    out = blas.dsyrk(1.0, a, beta=1.0, c=acc, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(out, acc):  # SciPy copies a c it cannot use in place; keep the sum either way
        acc[...] = out


def token_matrix(x: Tensor) -> Tensor:
    """The input of a linear layer flattened to (tokens, d): every leading dimension is a token index."""
    return x.reshape(-1, x.shape[-1])


def covariance(stats: CovarianceStats) -> Tensor:
    """C = (Σxxᵀ − n·μμᵀ)/(n − 1) with μ = Σx/n: the centred covariance with n − 1. NaN for n < 2."""
    n = float(stats.n)
    d = stats.s.shape[0]
    if n < 2:
        return torch.full((d, d), float("nan"), dtype=torch.float64, device=stats.s.device)
    mu = stats.s / n
    ss = torch.tril(stats.ss) + torch.tril(stats.ss, -1).T
    return (ss - n * torch.outer(mu, mu)) / (n - 1)


def covariance_eigenvalues(stats: CovarianceStats) -> Tensor:
    """λ = eigvalsh(C), descending, clipped at 0; NaN when C is not finite or n < 2."""
    c = covariance(stats)
    if not bool(torch.isfinite(c).all()):
        return torch.full((c.shape[0],), float("nan"), dtype=torch.float64, device=c.device)
    return eigvalsh(c).flip(0).clamp_min(0.0)


def tail_window(d: int) -> tuple[int, int]:
    """Ranks [max(2, ⌈0.04·d⌉), ⌈0.2·d⌉] (1-based, inclusive) over which the tail exponent is fitted."""
    return max(2, math.ceil(0.04 * d)), math.ceil(0.2 * d)


def tail_alpha(lam: Tensor) -> Tensor:
    """α = −slope of the least-squares line of ln λ_i on ln i over the ranks of `tail_window`,
    using the ranks there with λ_i > 0; NaN when fewer than 5 such ranks."""
    lo, hi = tail_window(lam.shape[0])
    idx = torch.arange(lo, hi + 1, dtype=torch.float64, device=lam.device)
    vals = lam[lo - 1 : hi].to(torch.float64)
    keep = vals > 0
    if int(keep.sum()) < 5:
        return torch.tensor(float("nan"), dtype=torch.float64, device=lam.device)
    x, y = idx[keep].log(), vals[keep].log()
    xc = x - x.mean()
    return -(xc * (y - y.mean())).sum() / xc.square().sum()


def activation_metrics(lam: Tensor) -> dict[str, Tensor]:
    """From the descending covariance eigenvalues λ (length d):
    ``act_eig`` = λ; ``act_soft_rank`` = exp(−Σ p ln p), p = λ/Σλ; ``act_hard_rank`` = (Σλ)²/Σλ²;
    ``act_tail_alpha`` = `tail_alpha`; ``act_top10_share`` = Σ_{i≤10} λ_i / Σλ."""
    lam = lam.to(torch.float64)
    total = lam.sum()
    top10 = lam[:10].sum() / total if float(total) > 0 else torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "act_eig": lam,
        "act_soft_rank": entropy_rank(lam),
        "act_hard_rank": participation_rank(lam),
        "act_tail_alpha": tail_alpha(lam),
        "act_top10_share": top10,
    }
