"""Singular values and the statistics of a spectrum, as pure functions on tensors.

Everything here runs on the input's device, in float64, and never raises on bad values:
a matrix with NaN/Inf entries has a NaN spectrum. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

#: Quantile levels recorded by default (SPEC §5).
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)

#: Below this ratio σ_i/σ_1 the Gram route loses digits (its error is ≈ ε·(σ_1/σ_i)²), so those
#: singular values are recomputed from the matrix itself (see `singular_values`).
REFINE_BELOW = 2e-3


def as_matrix(w: Tensor) -> Tensor:
    """View a weight as a matrix (rows = output neurons): (out, in·k·k) for conv kernels, (1, n) for vectors."""
    if w.ndim == 2:
        return w
    if w.ndim < 2:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def gram(a: Tensor, full: bool = True) -> Tensor:
    """G = A Aᵀ (if rows ≤ cols) or AᵀA, in float64: the r×r Gram matrix of the smaller side, r = min(m, n).

    With ``full=False`` only the lower triangle is guaranteed (what the symmetric eigensolvers read)."""
    a = as_matrix(a).to(torch.float64)
    if a.device.type != "cpu":
        return a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    # On the CPU, BLAS syrk computes one triangle: half the flops of a matmul, and it reads the
    # row-major matrix through its transpose without a copy.
    x = a.numpy().T  # Fortran-ordered view, (n, m)
    lower = scipy.linalg.blas.dsyrk(1.0, x, trans=1 if a.shape[0] <= a.shape[1] else 0, lower=1)
    if full:
        lower = np.tril(lower) + np.tril(lower, -1).T
    return torch.from_numpy(lower)


def _eigvalsh(g: Tensor) -> Tensor:
    """Eigenvalues of a symmetric matrix, ascending (LAPACK syevd; SciPy's on the CPU, the faster binding)."""
    if g.device.type != "cpu":
        return torch.linalg.eigvalsh(g)
    return torch.from_numpy(scipy.linalg.eigh(g.numpy(), eigvals_only=True, driver="evd", check_finite=False))


def _smallest_eigenvectors(g: Tensor, k: int) -> Tensor:
    """Eigenvectors of the k smallest eigenvalues (only those are computed on the CPU: LAPACK syevr)."""
    if g.device.type != "cpu":
        return torch.linalg.eigh(g)[1][:, :k]
    _, v = scipy.linalg.eigh(g.numpy(), subset_by_index=[0, k - 1], driver="evr", check_finite=False)
    return torch.from_numpy(v)


def _nan(n: int, device: torch.device) -> Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float64, device=device)


def singular_values(
    a: Tensor,
    *,
    method: str = "gram",
    refine_below: float = REFINE_BELOW,
    g: Tensor | None = None,
    assume_finite: bool = False,
) -> Tensor:
    """σ(A), descending, float64, length r = min(m, n).

    ``method="gram"`` (default): λ = eigvalsh(G) with G the float64 Gram matrix of the smaller side,
    σ_i = sqrt(max(λ_i, 0)). Squaring costs accuracy at the small end (relative error ≈ ε·(σ_1/σ_i)²),
    so the singular values with σ_i/σ_1 < ``refine_below`` are recomputed as σ(A·V_s) in float64, where V_s
    are G's eigenvectors for those eigenvalues (Rayleigh–Ritz on the small subspace): their relative error
    becomes ≈ ε·σ_1/σ_i, as good as a direct SVD. ``method="svd"``: ``torch.linalg.svdvals`` in float64.

    ``g`` may pass ``gram(a)`` when the caller already has it, and ``assume_finite`` skips the NaN/Inf
    scan when the caller has done it. Non-finite input gives all NaN; an all-zero matrix gives zeros.
    """
    m = as_matrix(a)
    r = min(m.shape)
    if r == 0:
        return torch.empty(0, dtype=torch.float64, device=m.device)
    if not assume_finite and not bool(torch.isfinite(m).all()):
        return _nan(r, m.device)
    m64 = m.to(torch.float64)
    try:
        if method == "svd":
            return torch.linalg.svdvals(m64)
        if method != "gram":
            raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
        if g is None:
            g = gram(m64, full=False)
        lam = _eigvalsh(g).flip(0).clamp_min(0.0)
        sigma = lam.sqrt()
        top = sigma[0]
        if top == 0 or refine_below <= 0:
            return sigma
        small = sigma < refine_below * top
        k = int(small.sum())
        if k == 0:
            return sigma
        # The eigenvectors of the k smallest eigenvalues span the small singular subspace to within ε;
        # A restricted to it has exactly those singular values, now without the squared conditioning.
        vs = _smallest_eigenvectors(g, k)
        side = m64 @ vs if m64.shape[0] > m64.shape[1] else m64.T @ vs
        sigma[r - k :] = torch.linalg.svdvals(side)
        return sigma
    except (RuntimeError, np.linalg.LinAlgError, ValueError):
        # LAPACK convergence failure on pathological input: report NaN, never raise into training.
        return _nan(r, m.device)


def top_singular_value(a: Tensor) -> Tensor:
    """σ_1(A) exactly: sqrt of the largest eigenvalue of the float64 Gram matrix (on the CPU only that
    eigenvalue is computed, LAPACK syevr). NaN for non-finite input."""
    m = as_matrix(a)
    if m.numel() == 0 or not bool(torch.isfinite(m).all()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
    g = gram(m, full=False)
    r = g.shape[0]
    try:
        if g.device.type != "cpu":
            return torch.linalg.eigvalsh(g)[-1].clamp_min(0.0).sqrt()
        top = scipy.linalg.eigh(g.numpy(), eigvals_only=True, subset_by_index=[r - 1, r - 1], driver="evr",
                                check_finite=False)
        return torch.tensor(float(np.sqrt(max(top[0], 0.0))), dtype=torch.float64)
    except (RuntimeError, np.linalg.LinAlgError, ValueError):
        return torch.tensor(float("nan"), dtype=torch.float64, device=m.device)


def quantiles(values: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES) -> Tensor:
    """q(v) for each level in ``qs``, linear interpolation — the same as ``numpy.quantile(v, q, method="linear")``:
    with v sorted ascending and h = (n − 1)·q, q(v) = v[⌊h⌋] + (h − ⌊h⌋)·(v[⌊h⌋+1] − v[⌊h⌋]).

    NaN anywhere in ``values`` (or no values) gives NaN for every level.
    """
    q = torch.as_tensor(list(qs), dtype=torch.float64, device=values.device)
    v = values.to(torch.float64).reshape(-1)
    n = v.numel()
    if n == 0 or bool(torch.isnan(v).any()):
        return torch.full_like(q, float("nan"))
    v = torch.sort(v).values
    h = (n - 1) * q
    lo = h.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def entropy_rank(weights: Tensor) -> Tensor:
    """exp(−Σ p_i ln p_i) with p = w/Σw (0·ln 0 = 0): the effective number of non-zero weights.

    Applied to σ² it is the effective rank, to covariance eigenvalues the soft rank. NaN when Σw = 0
    or any weight is NaN.
    """
    w = weights.to(torch.float64).clamp_min(0.0)
    total = w.sum()
    p = w / total
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    out = torch.exp(-plogp.sum())
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def participation_rank(weights: Tensor) -> Tensor:
    """(Σ w)² / Σ w² — the participation ratio (the hard rank of a covariance spectrum). NaN when Σw² = 0."""
    w = weights.to(torch.float64).clamp_min(0.0)
    sq = (w * w).sum()
    out = w.sum() ** 2 / sq
    return torch.where(sq > 0, out, torch.full_like(out, float("nan")))


def spectral_norm(
    w: Tensor, v0: Tensor | None = None, *, tol: float = 1e-6, max_iter: int = 200, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """σ_1(W) by power iteration on WᵀW, returning (σ_1, v) with v the right singular vector estimate.

    The estimate ‖Wv‖ never exceeds σ_1 and increases monotonically; iteration stops when it changes by
    less than ``tol`` relatively. Pass the previous ``v`` as ``v0`` to warm-start (weights change slowly
    between records, so a handful of iterations suffice). The default start vector is drawn from a
    private generator, so the caller's random state is untouched. Non-finite W gives NaN.
    """
    m = as_matrix(w).to(torch.float64)
    n = m.shape[1]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
    if not bool(torch.isfinite(m).all()):
        return nan, torch.full((n,), float("nan"), dtype=torch.float64, device=m.device)
    if v0 is None or v0.shape != (n,) or not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0:
        gen = torch.Generator(device=m.device).manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=torch.float64, device=m.device)
    v = v0.to(device=m.device, dtype=torch.float64)
    v = v / v.norm()
    est = torch.zeros((), dtype=torch.float64, device=m.device)
    for _ in range(max_iter):
        u = m @ v
        new = u.norm()
        if new == 0:
            return new, v
        z = m.T @ (u / new)
        zn = z.norm()
        if zn == 0:
            return new, v
        v = z / zn
        if abs(float(new) - float(est)) <= tol * float(new):
            est = new
            break
        est = new
    return (m @ v).norm(), v
