"""The heavy-tail exponent of a weight matrix's empirical spectral density (heavy-tailed self-regularisation),
as a pure function on its singular values.

The ESD is λ_i = σ_i², sorted ascending, values ≤ ``thresh`` dropped (numerical zeros). For each candidate
lower cut-off x_min = λ_k (every eigenvalue but the largest), the continuous power law p(λ) ∝ λ^(−α) on
[x_min, ∞) is fitted to the tail λ_k … λ_n by maximum likelihood,

    α_k = 1 + m / Σ_{j≥k} ln(λ_j / λ_k),        m = n − k (the tail's size),

and scored by the Kolmogorov–Smirnov distance between the fitted and the empirical CDF of the tail,

    D_k = max_{j≥k} | 1 − (λ_j/λ_k)^(1−α_k) − (j − k)/m |.

``weight_alpha`` is α at the cut-off of the smallest D (Clauset, Shalizi & Newman 2009), the choice WeightWatcher
makes by default (its own "ww" fit, ``xmax`` unset). With fewer than ``MIN_EIGENVALUES`` eigenvalues above the
threshold there is no tail to fit: NaN, with the reason. Scale-free: α of c·λ is α of λ.
"""

from __future__ import annotations

import numpy as np

#: The fewest eigenvalues a tail fit is made from (WeightWatcher switches to a small-sample rule below 20).
MIN_EIGENVALUES = 20
#: Eigenvalues at or below this are numerical zeros (WeightWatcher's ``EVALS_THRESH``).
THRESH = 1e-5


def tail_fit(lam: np.ndarray) -> tuple[float, float, float]:
    """(α, x_min, D) of the best cut-off for ascending positive eigenvalues ``lam`` (at least 2)."""
    x = np.asarray(lam, dtype=np.float64)
    n = x.size
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # Σ_{j≥k} ln λ_j
    k = np.arange(n - 1)
    m = (n - k).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1 + m / (suffix[:-1] - m * logs[:-1])
    ks = np.ones(n - 1)
    for i in range(n - 1):
        a = alpha[i]
        if not (np.isfinite(a) and a > 1):
            continue
        tail = x[i:]
        ks[i] = np.max(np.abs(1 - (tail / x[i]) ** (1 - a) - np.arange(n - i) / m[i]))
    best = int(np.argmin(ks))
    return float(alpha[best]), float(x[best]), float(ks[best])


def weight_alpha(sv: np.ndarray, thresh: float = THRESH) -> tuple[float, str | None]:
    """(α of the ESD λ = σ² of singular values ``sv``, None), or (NaN, why) when it cannot be fitted."""
    lam = np.sort(np.asarray(sv, dtype=np.float64) ** 2)
    lam = lam[np.isfinite(lam) & (lam > thresh)]
    if lam.size < MIN_EIGENVALUES:
        return float("nan"), (f"has {lam.size} eigenvalues above {thresh:g}, fewer than the {MIN_EIGENVALUES} a tail "
                              "fit needs")
    return tail_fit(lam)[0], None


def stable_rank(sv: np.ndarray) -> float:
    """‖W‖_F² / ‖W‖₂² = Σσ_i² / σ_1² (NaN for a zero matrix)."""
    s = np.asarray(sv, dtype=np.float64)
    top = float(np.max(s)) if s.size else 0.0
    return float(np.sum(s ** 2) / top ** 2) if top > 0 else float("nan")
