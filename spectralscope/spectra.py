"""Singular values and the statistics of a spectrum, as pure functions on tensors.

Everything here runs on the input's device, in float64, and never raises on bad values:
a matrix with NaN/Inf entries has a NaN spectrum. Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from scipy.linalg import blas, lapack
from torch import Tensor

from .schema import DEFAULT_QUANTILES

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
    lower = _syrk_lower(np.ascontiguousarray(a.numpy()))
    if full:
        lower = np.tril(lower) + np.tril(lower, -1).T
    return torch.from_numpy(lower)


# ---- CPU kernels: LAPACK through SciPy, on numpy arrays -------------------------------------------
# A symmetric eigenproblem is solved as G = Q·T·Qᵀ (dsytrd) and T's eigenvalues (dsterf); the small end of
# a spectrum reuses the same T and Q (dstemr eigenvectors of T, Q applied with dormqr), so no second
# reduction is needed. The workspace sizes are cached per order: the queries cost as much as small solves.


@lru_cache(maxsize=64)
def _sytrd_lwork(n: int) -> int:
    work, info = lapack.dsytrd_lwork(n, lower=1)
    return max(1, int(work)) if info == 0 else max(1, 64 * n)


def _tridiagonalize(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """G = Q·T·Qᵀ from G's lower triangle (consumed): T's diagonal d and off-diagonal e, and Q as Householder
    reflectors (LAPACK dsytrd, lower)."""
    c, d, e, tau, info = lapack.dsytrd(g, lower=1, lwork=_sytrd_lwork(g.shape[0]), overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrd info={info}")
    return c, d, e, tau


def _tridiagonal_eigvals(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """All eigenvalues of the symmetric tridiagonal (d, e), ascending (LAPACK dsterf, root-free QL/QR)."""
    lam, info = lapack.dsterf(d.copy(), e.copy())
    if info != 0:
        raise np.linalg.LinAlgError(f"dsterf info={info}")
    return lam


def eigvalsh(g: Tensor) -> Tensor:
    """Eigenvalues of the symmetric matrix G (its lower triangle is read), ascending, float64, on G's
    device. On the CPU: LAPACK dsytrd + dsterf, faster than torch.linalg.eigvalsh at these sizes.
    NaN/Inf in the lower triangle, or a LAPACK failure, gives all NaN."""
    g64 = g.detach().to(torch.float64)
    n = g64.shape[0]
    lower = torch.tril(g64)
    if not bool(torch.isfinite(lower).all()):
        return _nan(n, g64.device)
    try:
        if g64.device.type != "cpu" or n <= 1:
            return torch.linalg.eigvalsh(g64)
        _, d, e, _ = _tridiagonalize(np.array(g64.numpy(), order="F"))
        return torch.from_numpy(_tridiagonal_eigvals(d, e))
    except (RuntimeError, np.linalg.LinAlgError, ValueError):  # a LAPACK failure: no spectrum, no exception
        return _nan(n, g64.device)


def _smallest_eigvecs(c: np.ndarray, d: np.ndarray, e: np.ndarray, tau: np.ndarray, k: int) -> np.ndarray:
    """An orthonormal basis (n×k) of G's eigenvectors for its k smallest eigenvalues, from G's tridiagonal
    form: T's eigenvectors by MRRR (dstemr, numerically orthogonal even inside clusters), mapped back by
    the orthogonal Q (dormqr on the reflectors)."""
    n = d.shape[0]
    m, _, z, info = lapack.dstemr(d.copy(), np.append(e, 0.0), 2, 0.0, 0.0, 1, k, compute_v=1,
                                  lwork=18 * n, liwork=10 * n)
    if info != 0 or m != k:
        raise np.linalg.LinAlgError(f"dstemr info={info}, found {m} of {k}")
    z = np.asfortranarray(z[:, :k])
    # dsytrd (lower) stores H(i) = I − τ_i·v_i·v_iᵀ with v_i in column i below the subdiagonal, i.e. the QR
    # layout of G[1:, :n−1]; Q leaves the first coordinate alone.
    zq, _, info = lapack.dormqr("L", "N", c[1:, : n - 1], tau, z[1:], lwork=64 * max(1, k))
    if info != 0:
        raise np.linalg.LinAlgError(f"dormqr info={info}")
    z[1:] = zq
    return z


def _syrk_lower(a: np.ndarray) -> np.ndarray:
    """Lower triangle of A·Aᵀ (rows ≤ cols) or Aᵀ·A, A float64 C-ordered; BLAS dsyrk computes one triangle
    (half a matmul's flops) and reads the row-major matrix through its transpose without a copy."""
    return blas.dsyrk(1.0, a.T, trans=1 if a.shape[0] <= a.shape[1] else 0, lower=1)


def _direct_cpu(a: np.ndarray) -> np.ndarray:
    """σ(A) descending from A itself: bidiagonalisation and the bidiagonal's singular values (LAPACK dgesdd,
    no vectors); relative error ≈ ε·σ_1/σ_i, like the refined Gram route."""
    s, info = _gesdd_values(a)
    if info != 0:
        raise np.linalg.LinAlgError(f"dgesdd info={info}")
    return s


def _gesdd_values(a: np.ndarray) -> tuple[np.ndarray, int]:
    at = a.T if a.shape[0] < a.shape[1] else a  # tall, F-ordered view of a C-ordered array: no copy
    _, s, _, info = lapack.dgesdd(np.asfortranarray(at), compute_uv=0, overwrite_a=0)
    return s, info


class _LapackBackend:
    """The refined Gram spectrum's kernels on float64 C-ordered numpy arrays: BLAS dsyrk for the Gram matrix,
    one LAPACK reduction (dsytrd) shared by the eigenvalues (dsterf) and the small end's eigenvectors (dstemr,
    dormqr), dgesdd for the direct SVD. Failures raise ``LinAlgError``."""

    @staticmethod
    def gram(a):
        return _syrk_lower(a)

    @staticmethod
    def diagonal(g):
        return np.diagonal(g).copy()

    @staticmethod
    def finite(x) -> bool:
        return bool(np.isfinite(x).all())

    @staticmethod
    def nan(r: int, like):
        return np.full(r, np.nan)

    @staticmethod
    def sqrt0(x):
        return np.sqrt(np.maximum(x, 0.0))

    @staticmethod
    def eig(g):
        """σ = sqrt(max(λ, 0)) descending from G, and basis(k): an orthonormal basis of G's eigenvectors for
        its k smallest eigenvalues, from the same reduction."""
        c, d, e, tau = _tridiagonalize(g)
        sigma = np.sqrt(np.maximum(_tridiagonal_eigvals(d, e)[::-1], 0.0))
        return sigma, lambda k: _smallest_eigvecs(c, d, e, tau, k)

    @staticmethod
    def svdvals(x):
        return np.linalg.svd(x, compute_uv=False)

    @staticmethod
    def direct(a):
        return _direct_cpu(a)

    @staticmethod
    def sorted_desc(x):
        return -np.sort(-x)


class _TorchBackend:
    """The same kernels with torch.linalg, on the tensor's own device (one eigh gives values and vectors)."""

    @staticmethod
    def gram(a):
        return a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a

    @staticmethod
    def diagonal(g):
        return torch.diagonal(g).clone()

    @staticmethod
    def finite(x) -> bool:
        return bool(torch.isfinite(x).all())

    @staticmethod
    def nan(r: int, like):
        return _nan(r, like.device)

    @staticmethod
    def sqrt0(x):
        return x.clamp_min(0.0).sqrt()

    @staticmethod
    def eig(g):
        lam, vecs = torch.linalg.eigh(g)
        return lam.flip(0).clamp_min(0.0).sqrt(), lambda k: torch.linalg.qr(vecs[:, :k])[0]

    @staticmethod
    def svdvals(x):
        return torch.linalg.svdvals(x)

    @staticmethod
    def direct(a):
        return torch.linalg.svdvals(a)

    @staticmethod
    def sorted_desc(x):
        return x.sort(descending=True).values


def _refined_spectrum(a, refine_below: float, refine_max: int | None, be) -> tuple:
    """(σ descending, diag G) of a float64 matrix ``a`` by the refined Gram route (`gram_spectrum`), with the
    kernels of backend ``be`` (`_LapackBackend` on numpy arrays, `_TorchBackend` on tensors). More than
    ``refine_max`` singular values to refine: σ from a direct SVD instead."""
    r = min(a.shape)
    g = be.gram(a)
    diag = be.diagonal(g)
    if not be.finite(diag.sum()):
        if not be.finite(a):
            return be.nan(r, a), be.nan(r, a)
        # Finite entries whose squares overflow float64: the spectrum scales with A.
        scale = abs(a).max()
        sigma, diag = _refined_spectrum(a / scale, refine_below, refine_max, be)
        with np.errstate(over="ignore"):  # diag G itself is beyond float64: inf is its honest value
            return sigma * scale, diag * scale * scale
    if r == 1:
        return be.sqrt0(diag), diag
    sigma, basis = be.eig(g)
    top = sigma[0]
    if top == 0 or refine_below <= 0:
        return sigma, diag
    k = int((sigma < refine_below * top).sum())
    if k == 0:
        return sigma, diag
    if refine_max is not None and k > refine_max:
        return be.direct(a), diag
    # The eigenvectors of the k smallest eigenvalues span the small singular subspace to within ε;
    # A restricted to it has exactly those singular values, now without the squared conditioning.
    vs = basis(k)
    side = a @ vs if a.shape[0] > a.shape[1] else a.T @ vs
    sigma[r - k :] = be.svdvals(side)
    return be.sorted_desc(sigma), diag


def _cpu_spectrum(a: np.ndarray, refine_below: float, refine_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`_refined_spectrum` on a float64 C-ordered numpy array with LAPACK. Raises on LAPACK failure."""
    return _refined_spectrum(a, refine_below, refine_max, _LapackBackend)


def _torch_spectrum(a: Tensor, refine_below: float) -> tuple[Tensor, Tensor]:
    """`_refined_spectrum` on a float64 tensor with torch.linalg, on its device."""
    return _refined_spectrum(a, refine_below, None, _TorchBackend)


def _nan(n: int, device: torch.device) -> Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float64, device=device)


def gram_spectrum(a: Tensor, refine_below: float = REFINE_BELOW) -> tuple[Tensor, Tensor]:
    """σ(A) descending and diag(G), both float64 of length r = min(m, n), where G is the Gram matrix of the
    smaller side (A·Aᵀ when m ≤ n, so diag G holds the squared row norms; else AᵀA, squared column norms).

    λ = eigvalsh(G) in float64 (on the CPU: LAPACK dsytrd + dsterf), σ_i = sqrt(max(λ_i, 0)). Squaring costs
    accuracy at the small end (relative error ≈ ε·(σ_1/σ_i)²), so the σ_i with σ_i/σ_1 < ``refine_below``
    are recomputed as σ(A·V_s), V_s an orthonormal basis of G's eigenvectors for those eigenvalues
    (Rayleigh–Ritz on the small subspace): their relative error becomes ≈ ε·σ_1/σ_i, as good as a direct
    SVD. ‖A‖_F² = Σ diag G. Non-finite A gives NaN for both; LAPACK failure raises.
    """
    m = as_matrix(a)
    r = min(m.shape)
    if r == 0:
        empty = torch.empty(0, dtype=torch.float64, device=m.device)
        return empty, empty.clone()
    m64 = m.detach().to(torch.float64)
    if m64.device.type != "cpu":
        return _torch_spectrum(m64, refine_below)
    sigma, diag = _cpu_spectrum(np.ascontiguousarray(m64.numpy()), refine_below)
    return torch.from_numpy(np.ascontiguousarray(sigma)), torch.from_numpy(diag)


# ---- choosing a route per matrix ------------------------------------------------------------------
# Costs in flop-equivalents, calibrated with OpenBLAS/LAPACK on one core of the project's CPU (the rates of
# the Gram route, of dgesdd and the refinement's fixed cost; `benchmarks/spectra.py`). Only speed depends on
# them: every route is exact to ε·σ_1/σ_i.


def route_costs(m: int, n: int, k: int) -> tuple[float, float, float]:
    """(Gram route, refining k of its singular values, direct SVD) for an m×n matrix, in flop-equivalents:
    Gram r²·N + 4/3·r³ (r = min, N = max side); refinement 1.6e6 + 10·k·r·(r + N) (0 for k = 0);
    direct 1.4·(2·N·r² + 2·r³) when N ≥ 5/3·r (QR first), else 1.4·(4·N·r² − 4/3·r³)."""
    r, big = min(m, n), max(m, n)
    gram = r * r * big + 4 / 3 * r**3
    refine = 0.0 if k <= 0 else 1.6e6 + 10.0 * k * r * (r + big)
    direct = 1.4 * (2 * big * r * r + 2 * r**3 if 3 * big >= 5 * r else 4 * big * r * r - 4 / 3 * r**3)
    return gram, refine, direct


def refine_budget(m: int, n: int) -> int:
    """The most singular values worth refining on the Gram route before a direct SVD costs less."""
    r, big = min(m, n), max(m, n)
    _, _, direct = route_costs(m, n, 0)
    return max(0, int((direct - 1.6e6) // (10.0 * r * (r + big))))


class Spectrum(NamedTuple):
    """σ descending, diag of the smaller-side Gram matrix, the route taken ("gram" or "direct"), and k =
    #{σ_i < refine_below·σ_1}: the singular values the Gram route must refine (the next call's hint)."""

    sigma: Tensor
    diag: Tensor
    route: str
    k: int


def matrix_spectrum(a: Tensor, k_hint: int | None = None, refine_below: float = REFINE_BELOW) -> Spectrum:
    """σ(A) and diag(G) as `gram_spectrum` defines them, by whichever exact route `route_costs` says is
    cheaper, given ``k_hint`` (the k of this matrix's last spectrum; None: unknown, try the Gram route).
    The Gram route switches to the direct SVD by itself when it finds more than `refine_budget` values to
    refine. Off the CPU the Gram route (torch.linalg) is always used."""
    m = as_matrix(a)
    rows, cols = m.shape
    if m.device.type != "cpu" or min(rows, cols) <= 1:
        sigma, diag = gram_spectrum(m, refine_below)
        return Spectrum(sigma, diag, "gram", _count_small(sigma, refine_below))
    a64 = np.ascontiguousarray(m.detach().to(torch.float64).numpy())
    gram, refine, direct = route_costs(rows, cols, k_hint or 0)
    if k_hint is not None and gram + refine > direct:
        diag = np.einsum("ij,ij->i", a64, a64) if rows <= cols else np.einsum("ij,ij->j", a64, a64)
        if np.isfinite(diag.sum()):
            sigma = _direct_cpu(a64)
            return Spectrum(torch.from_numpy(sigma), torch.from_numpy(diag), "direct", _count_small(sigma, refine_below))
    budget = refine_budget(rows, cols)
    sig, diag = _cpu_spectrum(a64, refine_below, budget)
    k = _count_small(sig, refine_below)
    return Spectrum(torch.from_numpy(np.ascontiguousarray(sig)), torch.from_numpy(diag),
                    "direct" if k > budget else "gram", k)


def matrix_spectra(mats: Sequence[Tensor], k_hints: Sequence[int | None] | None = None,
                   refine_below: float = REFINE_BELOW) -> list[Spectrum]:
    """`matrix_spectrum` of each matrix (with the same hints and the same σ, diag G and k, to rounding), the
    same-shaped ones on an accelerator decomposed together: those of one shape, dtype and device whose last
    spectrum needed no refinement (hint 0) share one stacked float64 Gram matrix, one batched eigvalsh and one
    host sync, where one by one each would cost its kernel launches and syncs (`_gram_batch`). On the CPU every
    matrix takes `matrix_spectrum`: LAPACK's own work dominates there, and a batch measured no faster
    (`benchmarks/spectra.py`). A matrix that now needs refinement, or whose Gram diagonal is not finite, is redone
    on its own."""
    hints = list(k_hints) if k_hints is not None else [None] * len(mats)
    done: list[Spectrum | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, (a, k) in enumerate(zip(mats, hints, strict=True)):
        m = as_matrix(a)
        if k == 0 and min(m.shape) > 1 and m.device.type != "cpu":
            groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for idx in groups.values():
        if len(idx) > 1:
            for i, sp in zip(idx, _gram_batch([as_matrix(mats[i]) for i in idx], refine_below), strict=True):
                done[i] = sp
    return [sp if sp is not None else matrix_spectrum(a, k, refine_below)
            for a, k, sp in zip(mats, hints, done, strict=True)]


def _gram_batch(mats: Sequence[Tensor], refine_below: float = REFINE_BELOW) -> list[Spectrum | None]:
    """The unrefined Gram route on same-shaped matrices at once, with torch.linalg on their device: G_b = A_b·A_bᵀ
    (or A_bᵀ·A_b) in float64 as one batched matmul, λ = eigvalsh(G) batched, σ = sqrt(max(λ, 0)) descending.
    Returns (σ, diag G) of each as a `Spectrum`, None where some σ_i < ``refine_below``·σ_1 (the refinement is
    per matrix) or the Gram diagonal is not finite. One host sync for the batch."""
    a = torch.stack([m.detach() for m in mats]).to(torch.float64)
    g = a @ a.mT if a.shape[1] <= a.shape[2] else a.mT @ a
    diag = torch.diagonal(g, dim1=1, dim2=2).clone()
    finite = torch.isfinite(diag.sum(1))
    sigma = torch.linalg.eigvalsh(torch.where(finite[:, None, None], g, torch.zeros_like(g))).flip(1)
    sigma = sigma.clamp_min(0.0).sqrt()
    k = (sigma < refine_below * sigma[:, :1]).sum(1)
    keep = (finite & (k == 0)).tolist()  # the one host sync of the batch
    return [Spectrum(sigma[i], diag[i], "gram", 0) if keep[i] else None for i in range(len(mats))]


def _count_small(sigma: Tensor | np.ndarray, refine_below: float) -> int:
    s = sigma.numpy() if isinstance(sigma, Tensor) and sigma.device.type == "cpu" else sigma
    if len(s) == 0 or not math.isfinite(float(s[0])):
        return 0
    return int((s < refine_below * s[0]).sum())


def singular_values(
    a: Tensor,
    *,
    method: str = "gram",
    refine_below: float = REFINE_BELOW,
) -> Tensor:
    """σ(A), descending, float64, length r = min(m, n).

    ``method="gram"`` (default): the float64 Gram route with small-σ refinement of `gram_spectrum`.
    ``method="svd"``: ``torch.linalg.svdvals`` in float64. Non-finite input gives all NaN (never raises,
    LAPACK failures included); an all-zero matrix gives zeros.
    """
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    m = as_matrix(a)
    r = min(m.shape)
    try:
        if method == "svd":
            if not bool(torch.isfinite(m).all()):
                return _nan(r, m.device)
            return torch.linalg.svdvals(m.to(torch.float64))
        return gram_spectrum(m, refine_below)[0]
    except (RuntimeError, np.linalg.LinAlgError, ValueError):
        # LAPACK convergence failure on pathological input: report NaN, never raise into training.
        return _nan(r, m.device)


def top_singular_value(a: Tensor) -> Tensor:
    """σ_1(A) exactly: sqrt of the largest eigenvalue of the float64 Gram matrix (on the CPU only that
    eigenvalue is computed: dsytrd, then bisection, dstebz). NaN for non-finite input."""
    m = as_matrix(a)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
    if m.numel() == 0:
        return nan
    m64 = m.detach().to(torch.float64)
    try:
        if m64.device.type != "cpu":
            sigma, _ = _torch_spectrum(m64, refine_below=0.0)
            return sigma[0]
        a64 = np.ascontiguousarray(m64.numpy())
        g = _syrk_lower(a64)
        n = g.shape[0]
        if not np.isfinite(np.trace(g)) or n == 1:
            return torch.tensor(float(_cpu_spectrum(a64, 0.0)[0][0]), dtype=torch.float64)
        _, d, e, _ = _tridiagonalize(g)
        found, w, _, _, info = lapack.dstebz(d, e, 2, 0.0, 0.0, n, n, 0.0, "E")
        if info != 0 or found != 1:
            raise np.linalg.LinAlgError(f"dstebz info={info}")
        return torch.tensor(float(np.sqrt(max(w[0], 0.0))), dtype=torch.float64)
    except (RuntimeError, np.linalg.LinAlgError, ValueError):
        return nan


@lru_cache(maxsize=256)
def _quantile_plan(n: int, qs: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """For n sorted values: the indices ⌊h⌋, ⌊h⌋+1 (clamped) and weights h − ⌊h⌋ with h = (n − 1)·q."""
    h = (n - 1) * torch.tensor(qs, dtype=torch.float64)
    lo = h.floor().long().clamp(0, n - 1)
    return lo, (lo + 1).clamp(max=n - 1), h - lo


def quantiles(values: Tensor, qs: Sequence[float] = DEFAULT_QUANTILES) -> Tensor:
    """q(v) for each level in ``qs``, linear interpolation — the same as ``numpy.quantile(v, q, method="linear")``:
    with v sorted ascending and h = (n − 1)·q, q(v) = v[⌊h⌋] + (h − ⌊h⌋)·(v[⌊h⌋+1] − v[⌊h⌋]).

    NaN or ±Inf anywhere in ``values`` (or no values) gives NaN for every level (numpy's interpolation
    would turn an infinite value into inf at some levels and NaN at others).
    """
    v = values.detach().to(torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        return torch.full((len(qs),), float("nan"), dtype=torch.float64, device=v.device)
    lo, hi, frac = _quantile_plan(n, tuple(float(q) for q in qs))
    if v.device.type == "cpu":  # a handful of numpy calls: the torch route costs more in small-op overhead
        a = np.sort(v.numpy())  # NaN sorts last, -inf first, +inf last but before NaN
        if not (np.isfinite(a[0]) and np.isfinite(a[-1])):
            return torch.full((len(qs),), float("nan"), dtype=torch.float64)
        lo_, hi_ = lo.numpy(), hi.numpy()
        return torch.from_numpy(a[lo_] + frac.numpy() * (a[hi_] - a[lo_]))
    lo, hi, frac = lo.to(v.device), hi.to(v.device), frac.to(v.device)
    v = torch.sort(v).values
    out = v[lo] + frac * (v[hi] - v[lo])
    bad = ~(torch.isfinite(v[0]) & torch.isfinite(v[-1]))
    return torch.where(bad, torch.full_like(out, float("nan")), out)


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
