"""Spectrum estimates for large matrices: stochastic Lanczos quadrature (SLQ) with a guaranteed bracket on
every quantile (SPEC §6: "larger matrices may use an estimator whose error bound is documented and tested").

For A ∈ R^{m×n}, r = min(m, n), G the r×r Gram matrix of the smaller side (λ_i(G) = σ_i(A)²) and
F(x) = #{σ_i ≤ x}/r the singular-value distribution. For each of ``n_vectors`` random unit vectors v
(uniform on the sphere), ``steps`` steps of Lanczos on G from v (full reorthogonalisation, float64) give the
Gauss quadrature of the measure μ_v = Σ_i (u_iᵀv)² δ_{λ_i}: nodes θ_1 < … < θ_k (Ritz values) and weights w_j.

Two facts make the bracket rigorous:

1. Chebyshev–Markov–Stieltjes: μ_v(−∞, x] lies between the quadrature's cumulative weight up to the node
   *before* the last node ≤ x and up to the node *after* it: P_{j−1} ≤ μ_v(−∞, x] ≤ P_{j+1} for
   θ_j ≤ x < θ_{j+1} (P_j = w_1 + … + w_j). So moving each weight one node up (to θ_{j+1}; the last to the
   upper bound B) gives a distribution below μ_v, one node down (to θ_{j−1}; the first to 0) one above.
2. Sphere concentration: μ_v(−∞, x] ~ Beta(j/2, (r − j)/2) with mean F(x), sub-Gaussian with variance
   proxy 1/(2(r + 2)) (Marchal & Arbel 2017), so the mean over n_v vectors is within
   t = sqrt(ln(2(r + 1)/η) / (n_v·(r + 2))) of F(x) at all r + 1 levels at once, with probability ≥ 1 − η.

Hence with probability ≥ 1 − η, for every x: L̄(x) − t ≤ F(x) ≤ Ū(x) + t (L̄, Ū the shifted-weight
distributions averaged over the vectors), and `quantile_bracket` turns that into an interval [lo, hi] that
holds ``numpy.quantile(σ, q)`` for every level q at once. The recorded values are the quantiles of a
representative spectrum σ̃ (σ̃_i = the (i + ½)/r quantile of the pooled quadrature), which lie inside their
brackets whenever t ≥ 1/(2r) (true for r ≥ 2); so |recorded − true| ≤ hi − lo.

Cost: k products of A and of Aᵀ with the n_v vectors at once plus the reorthogonalisation (`slq_cost`),
against r²·max(m, n) + 4/3·r³ for the exact Gram route; on a CPU the products are bound by memory traffic,
so the estimate wins only for r of several thousand (`choose_method`). Everything runs on A's device with
no host synchronisation per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .spectra import as_matrix, route_costs

#: Defaults: 8 vectors × 64 Lanczos steps, failure probability η = 1e-3 per estimate.
N_VECTORS = 8
STEPS = 64
ETA = 1e-3
#: Smaller side up to which spectra are always exact (`watch(exact_max=...)`); above it the cheaper of the
#: exact route and the estimate by `choose_method`'s cost model.
EXACT_MAX = 2048


class SpectrumEstimate(NamedTuple):
    """SLQ of one matrix. ``nodes``/``weights``: per vector, Ritz values of G ascending (λ units) and their
    Gauss weights (each vector's sum to 1), NaN-padded to ``steps``; ``exact`` per vector: its run found an
    invariant subspace (or spanned all of R^r), so its quadrature *is* μ_v and its weights need no shift;
    ``r``; ``t`` the sampling term; ``top`` an upper bound on λ_max(G) (the last weight's destination);
    ``tol`` the absolute slack on nodes for floating-point Lanczos and for a breakdown's residual."""

    nodes: Tensor
    weights: Tensor
    exact: Tensor
    r: int
    t: float
    top: float
    tol: float


def sampling_error(r: int, n_vectors: int, eta: float = ETA) -> float:
    """t = sqrt(ln(2(r + 1)/η) / (n_v·(r + 2))): the largest deviation of the vector-averaged CDF from F at
    any level, with probability ≥ 1 − η (sub-Gaussian Beta tails and a union bound over r + 1 levels)."""
    return math.sqrt(math.log(2 * (r + 1) / eta) / (n_vectors * (r + 2)))


def slq_cost(m: int, n: int, n_vectors: int = N_VECTORS, steps: int = STEPS) -> float:
    """Cost of `slq` on an m×n matrix in `spectra.route_costs` units: k·(70·m·n + 2.5·n_v·m·n + 4·n_v·k·r),
    k = min(steps, r), calibrated on one core of the project's CPU (docs/benchmarks.md): the products with
    A and Aᵀ of a few vectors are bound by memory traffic (two passes over A per step,
    the 70·m·n), not by their 4·n_v·m·n flops — so more vectors cost little and the estimate beats the
    exact route only for r of a few thousand and up."""
    r = min(m, n)
    k = min(steps, r)
    return k * (70.0 * m * n + 2.5 * n_vectors * m * n + 4.0 * n_vectors * k * r)


def choose_method(m: int, n: int, exact_max: int | None = EXACT_MAX, policy: str = "auto",
                  n_vectors: int = N_VECTORS, steps: int = STEPS) -> str:
    """How to measure an m×n matrix's spectra: "exact" or "slq". Always "exact" when min(m, n) ≤ ``exact_max``
    (None: no limit) or ``policy`` is "exact"; above it, "slq" when ``policy`` is "slq", and for "auto"
    whichever of the exact route (`spectra.route_costs`) and the estimate (`slq_cost`) costs less."""
    if policy not in ("auto", "exact", "slq"):
        raise ValueError(f"policy must be 'auto', 'exact' or 'slq', got {policy!r}")
    r = min(m, n)
    if policy == "exact" or exact_max is None or r <= exact_max:
        return "exact"
    if policy == "slq":
        return "slq"
    gram, _, direct = route_costs(m, n, 0)
    return "slq" if slq_cost(m, n, n_vectors, steps) < min(gram, direct) else "exact"


def _gram_apply(a: Tensor, x: Tensor) -> Tensor:
    """G·x for a batch of vectors x (b, r): G = A·Aᵀ when m ≤ n, else AᵀA; never formed."""
    if a.shape[0] <= a.shape[1]:
        return (x @ a) @ a.T
    return (x @ a.T) @ a


def slq(a: Tensor, n_vectors: int = N_VECTORS, steps: int = STEPS, eta: float = ETA,
        generator: torch.Generator | None = None) -> SpectrumEstimate:
    """Stochastic Lanczos quadrature of A's Gram matrix: ``n_vectors`` independent Lanczos runs of up to
    ``steps`` steps (fewer where a run finds an invariant subspace; exact then), in float64 on A's device.
    Non-finite A gives NaN nodes."""
    m = as_matrix(a).detach().to(torch.float64)
    rows, cols = m.shape
    r = min(rows, cols)
    k = max(1, min(steps, r))
    dev = m.device
    nodes = torch.full((n_vectors, k), float("nan"), dtype=torch.float64, device=dev)
    weights = torch.zeros((n_vectors, k), dtype=torch.float64, device=dev)
    exact = torch.full((n_vectors,), k == r, dtype=torch.bool, device=dev)
    t = sampling_error(r, n_vectors, eta)
    fro2 = float(m.square().sum())
    if not math.isfinite(fro2):
        return SpectrumEstimate(nodes, weights, exact, r, t, float("nan"), float("nan"))
    # ‖A‖₂² ≤ min(‖A‖_F², ‖A‖₁·‖A‖_∞): where the quadrature's top weight may be moved without losing the bound
    top = min(fro2, float(m.abs().sum(0).max() * m.abs().sum(1).max()))
    breakdown = 1e-10 * top
    # slack on node positions: rounding in float64 Lanczos, and the residual left at a breakdown
    tol = 64.0 * k * torch.finfo(torch.float64).eps * top + breakdown
    if top == 0.0:
        nodes[:, 0], weights[:, 0] = 0.0, 1.0
        return SpectrumEstimate(nodes, weights, torch.ones_like(exact), r, t, 0.0, 0.0)
    gen = generator if generator is not None else torch.Generator(device=dev).manual_seed(0)
    v = torch.randn((n_vectors, r), generator=gen, dtype=torch.float64, device=gen.device).to(dev)
    v = v / v.norm(dim=1, keepdim=True)
    basis = torch.zeros((n_vectors, k, r), dtype=torch.float64, device=dev)
    alpha = torch.zeros((n_vectors, k), dtype=torch.float64, device=dev)
    beta = torch.zeros((n_vectors, k), dtype=torch.float64, device=dev)
    length = torch.full((n_vectors,), k, dtype=torch.long, device=dev)
    exact = exact.to(dev)
    live = torch.ones(n_vectors, dtype=torch.bool, device=dev)
    q = v
    for j in range(k):
        basis[:, j] = q
        w = _gram_apply(m, q)
        alpha[:, j] = (q * w).sum(1)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - torch.einsum("bj,bjr->br", torch.einsum("bjr,br->bj", basis[:, : j + 1], w), basis[:, : j + 1])
        if j == k - 1:
            break
        b = w.norm(dim=1)
        # an invariant subspace: that run's quadrature is μ_v itself. Kept on the device (no host sync per
        # step); a stopped run continues on a zero vector, which adds nothing to its tridiagonal block.
        stop = live & (b <= breakdown)
        length = torch.where(stop, torch.full_like(length, j + 1), length)
        exact = exact | stop
        live = live & ~stop
        beta[:, j] = torch.where(live, b, torch.zeros_like(b))
        q = torch.where(live[:, None], w / b.clamp_min(torch.finfo(torch.float64).tiny)[:, None], torch.zeros_like(w))
        if (dev.type == "cpu" or j % 16 == 15) and not bool(live.any()):
            break
    for i, n_i in enumerate(length.tolist()):
        tri = torch.diag(alpha[i, :n_i]) + torch.diag(beta[i, : n_i - 1], 1) + torch.diag(beta[i, : n_i - 1], -1)
        theta, vecs = torch.linalg.eigh(tri)
        nodes[i, :n_i] = theta.clamp_min(0.0)
        weights[i, :n_i] = vecs[0].square() / vecs[0].square().sum()
    return SpectrumEstimate(nodes, weights, exact, r, t, top, tol)


def _pooled(nodes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted pooled nodes and their cumulative weight (sums to 1) over all vectors."""
    keep = torch.isfinite(nodes) & (weights >= 0)
    x, w = nodes[keep], weights[keep] / nodes.shape[0]
    order = torch.argsort(x)
    return x[order], torch.cumsum(w[order], 0)


def _inverse(x: Tensor, cum: Tensor, levels: Tensor, beyond: float) -> Tensor:
    """min{x_j : cum_j ≥ p} for each level p (``beyond`` where no node reaches p)."""
    idx = torch.searchsorted(cum, levels, right=False)
    out = torch.full_like(levels, beyond)
    ok = idx < len(x)
    out[ok] = x[idx[ok]]
    return out


def representative_spectrum(est: SpectrumEstimate) -> Tensor:
    """σ̃ descending, length r: σ̃ (ascending i) = sqrt of the (i + ½)/r quantile of the pooled quadrature —
    the spectrum the recorded statistics are computed from. NaN when the estimate is."""
    dev = est.nodes.device
    if not math.isfinite(est.top):
        return torch.full((est.r,), float("nan"), dtype=torch.float64, device=dev)
    x, cum = _pooled(est.nodes, est.weights)
    levels = (torch.arange(est.r, dtype=torch.float64, device=dev) + 0.5) / est.r
    lam = _inverse(x, cum / cum[-1], levels, float(x[-1]))
    return lam.clamp_min(0.0).sqrt().flip(0)


def _shifted(est: SpectrumEstimate, up: bool) -> tuple[Tensor, Tensor]:
    """Each vector's weights moved one node up (the last to ``top``) or down (the first to 0): the
    distributions that bound μ_v from below (up) and above (down), pooled and cumulated. An exact run's
    quadrature is μ_v and stays where it is."""
    nodes, weights, top = est.nodes, est.weights, est.top
    xs, ws = [], []
    for i in range(nodes.shape[0]):
        keep = torch.isfinite(nodes[i])
        x, w = nodes[i][keep], weights[i][keep]
        x, order = torch.sort(x)
        w = w[order]
        if bool(est.exact[i]):
            pass
        elif up:
            x = torch.cat([x[1:], x.new_tensor([top])])
        else:
            x = torch.cat([x.new_zeros(1), x[:-1]])
        xs.append(x)
        ws.append(w / nodes.shape[0])
    x, w = torch.cat(xs), torch.cat(ws)
    order = torch.argsort(x)
    return x[order], torch.cumsum(w[order], 0)


def quantile_bracket(est: SpectrumEstimate, qs: Tensor | list[float], scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """[lo, hi] per level q with lo ≤ numpy.quantile(σ, q, method="linear") ≤ hi for all levels at once,
    with probability ≥ 1 − η, each divided by ``scale`` (e.g. ‖M‖_F for momentum_sv).

    With h = (r − 1)·q, i = ⌊h⌋, j = ⌈h⌉, the quantile lies in [σ_(i), σ_(j)] (ascending order statistics).
    F(σ_(i)) ≥ (i + 1)/r and F ≤ Ū + t give lo = √(min{x : Ū(x) ≥ (i + 1)/r − t}) ≤ σ_(i); F(σ_(j)⁻) ≤ j/r
    and F ≥ L̄ − t give hi = √(min{x : L̄(x) > j/r + t}) ≥ σ_(j) (√top when no node gets there). Nodes carry
    a floating-point slack ``tol`` (λ units) outward."""
    dev = est.nodes.device
    qs_t = torch.as_tensor(qs, dtype=torch.float64, device=dev)
    if not math.isfinite(est.top):
        nan = torch.full_like(qs_t, float("nan"))
        return nan, nan.clone()
    r = est.r
    h = (r - 1) * qs_t
    i, j = h.floor(), h.ceil()
    xd, cd = _shifted(est, up=False)
    xu, cu = _shifted(est, up=True)
    lo_levels = (i + 1) / r - est.t
    # levels nudged outward by 1e-12 so that rounding in the cumulative sums cannot narrow the bracket
    lo = torch.where(lo_levels <= 0, torch.zeros_like(qs_t), _inverse(xd, cd, lo_levels - 1e-12, 0.0))
    hi_levels = j / r + est.t + 1e-12
    # "> level": the first node whose cumulative weight exceeds it strictly
    idx = torch.searchsorted(cu, hi_levels, right=True)
    hi = torch.full_like(qs_t, est.top)
    ok = (idx < len(xu)) & (hi_levels < 1.0)
    hi[ok] = xu[idx[ok]]
    lo = (lo - est.tol).clamp_min(0.0).sqrt()
    hi = (hi + est.tol).clamp(max=est.top).sqrt()
    return lo / scale, hi / scale
