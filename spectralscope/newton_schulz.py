"""Newton–Schulz orthogonalisation: the matrix iteration as Muon runs it, its scalar map, and the
failure threshold.

One NS step maps X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ; on each singular value it acts as the odd
quintic p(x) = a·x + b·x³ + c·x⁵, so k steps act as f_k = p_k ∘ … ∘ p_1 (one (a, b, c) per step, or
the same triple every step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

#: Keller Jordan's quintic, the default of ``torch.optim.Muon``.
MUON_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
MUON_EPS = 1e-7

Coefficients = tuple[float, float, float] | Sequence[tuple[float, float, float]]


def step_coefficients(coefficients: Coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` steps: a single triple repeated, or a per-step list (its length
    must equal ``steps``)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    coeffs = list(coefficients)
    if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        return [tuple(float(c) for c in coeffs)] * steps  # type: ignore[list-item]
    triples = [tuple(float(x) for x in t) for t in coeffs]
    if any(len(t) != 3 for t in triples):
        raise ValueError("coefficients must be one (a, b, c) triple or a list of (a, b, c) triples")
    if len(triples) != steps:
        raise ValueError(f"a per-step coefficient list has {len(triples)} entries but steps={steps}")
    return triples  # type: ignore[return-value]


def run_for(coefficients: Coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each step when ``coefficients`` is run for ``steps`` steps, its own count or not: one triple
    repeated; a per-step schedule (Polar Express, heavyball's five quintics) cut to its first ``steps``, or run to
    its end and then its last triple repeated (as pytorch-optimizer runs a schedule shorter than ``ns_steps``)."""
    coeffs = list(coefficients)
    if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        return step_coefficients(coeffs, steps)  # type: ignore[arg-type]
    if not coeffs:
        raise ValueError("a per-step coefficient schedule needs at least one (a, b, c) triple")
    triples = step_coefficients(coeffs, len(coeffs))
    return [triples[min(i, len(triples) - 1)] for i in range(steps)]


@dataclass(frozen=True)
class NSConfig:
    """How an optimizer orthogonalises: coefficients (one triple or per step), steps, eps and dtype."""

    coefficients: Coefficients = MUON_COEFFICIENTS
    steps: int = 5
    eps: float = MUON_EPS
    dtype: torch.dtype = torch.bfloat16

    def triples(self) -> list[tuple[float, float, float]]:
        return step_coefficients(self.coefficients, self.steps)


def newton_schulz(m: Tensor, config: NSConfig = NSConfig()) -> Tensor:
    """O = NS_k(M), operation for operation as ``torch.optim.Muon`` computes it.

    X = M in ``config.dtype``, transposed when rows > cols (so A = X·Xᵀ is the small Gram),
    X ← X / max(‖X‖_F, eps), then for each step X ← a·X + (b·A + c·A·A)·X; transposed back.
    The result has M's shape and ``config.dtype``.
    """
    x = m.to(config.dtype)
    tall = m.shape[0] > m.shape[1]
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=config.eps))
    for a, b, c in config.triples():
        g = x @ x.T
        poly = torch.addmm(g, g, g, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def recover_applied(decayed: Tensor, after: Tensor, step_size: float,
                    dtype: torch.dtype = torch.bfloat16) -> Tensor | None:
    """The update direction O an optimizer applied as W_after = decayed − step_size·O, read back from the
    parameters: Ô = (decayed − W_after)/step_size in float64, rounded to ``dtype`` (O's own dtype).

    ``decayed`` is W_before·(1 − lr·wd) as the optimizer formed it (the same float32 operation reproduces
    it bit for bit), so the only error is the rounding of W_after and of step_size·O, each ≤ u relative
    (u = eps/2 of the weights' dtype, 2⁻²⁴ for float32):
        |Ô_ij − O_ij| ≤ e_ij = u·(|W_after,ij|/step_size + 2|O_ij|),
    and every singular value moves by at most ‖E‖_F ≤ ‖e‖_F ≤ u·(‖W_after‖_F/step_size + 2‖Ô‖_F).
    O has ``dtype`` entries, so Ô lies within |E_ij| of ``dtype``'s grid entry by entry. Ô is accepted only when
        ‖Ô − round(Ô)‖_F ≤ 2·‖e‖_F   (a step not of this form fails it at once), and
        ‖e‖_F ≤ 1e-4·‖Ô‖_F/√r        (small steps against large weights lose the digits).
    Returns round(Ô) in float64, or None when not accepted.
    """
    if not (step_size > 0 and math.isfinite(step_size)) or dtype == torch.float64:
        return None
    o = decayed.detach().to(torch.float64, copy=True).sub_(after.detach().to(torch.float64)).div_(step_size)
    size = float(torch.linalg.vector_norm(o))
    if not math.isfinite(size):
        return None
    rounded = o.to(dtype).to(torch.float64)
    unit = torch.finfo(after.dtype).eps / 2 if after.dtype.is_floating_point else 0.5
    # ‖e‖_F ≤ u·(‖W_after‖_F/step_size + 2‖Ô‖_F) by the triangle inequality
    bound = unit * (float(torch.linalg.vector_norm(after.detach(), dtype=torch.float64)) / step_size + 2 * size)
    r = min(o.shape) if o.ndim == 2 else 1
    if bound > 1e-4 * size / math.sqrt(r) or float(torch.linalg.vector_norm(o.sub_(rounded))) > 2 * bound:
        return None
    return rounded


def scalar_map(x: np.ndarray | float, coefficients: Coefficients = MUON_COEFFICIENTS, steps: int = 5) -> np.ndarray:
    """f_k(x): the k-step NS map on one singular value, in float64: x ← a·x + b·x³ + c·x⁵ per step."""
    y = np.asarray(x, dtype=np.float64).copy()
    for a, b, c in step_coefficients(coefficients, steps):
        y2 = y * y
        y = y * (a + y2 * (b + c * y2))
    return y


@lru_cache(maxsize=256)
def _threshold(steps: int, triples: tuple[tuple[float, float, float], ...], floor: float) -> float:
    f = lambda s: scalar_map(s, list(triples), steps)  # noqa: E731
    if f(1.0) < floor:
        raise ValueError(
            f"f_{steps}(1) = {float(f(1.0)):.4g} < floor {floor}: no σ in (0, 1] has f_k ≥ floor on all of [σ, 1]"
        )
    # A log grid resolves the rise near 0, a linear grid the oscillating band near 1; the last grid point
    # where f_k < floor brackets the answer, which bisection then pins to float64 precision.
    grid = np.unique(np.concatenate([np.logspace(-300, 0, 60001), np.linspace(0.0, 1.0, 200001)[1:]]))
    below = np.nonzero(f(grid) < floor)[0]
    if below.size == 0:
        return float(grid[0])
    i = below[-1]
    lo, hi = grid[i], grid[i + 1]  # f(lo) < floor <= f(s) for s in [hi, 1]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) < floor:
            lo = mid
        else:
            hi = mid
    return float(hi)


def ns_threshold(steps: int, coefficients: Coefficients = MUON_COEFFICIENTS, floor: float = 0.5) -> float:
    """The smallest σ ∈ (0, 1] such that f_k(s) ≥ ``floor`` for every s in [σ, 1].

    Singular values of the normalised input M/‖M‖_F below it come out of k NS steps under ``floor``
    ("NS failure"). Raises ``ValueError`` when no σ qualifies, e.g. a floor above f_k(1).
    Reference (default quintic, floor 0.5): 5 steps → 1.067e-3, 10 steps → 2.201e-6.
    """
    if not 0 < floor:
        raise ValueError(f"floor must be > 0, got {floor}")
    triples = tuple(step_coefficients(coefficients, int(steps)))
    return _threshold(int(steps), triples, float(floor))


def fewest_ns_steps(sigma: float, coefficients: Coefficients = MUON_COEFFICIENTS, floor: float = 0.5,
                    max_steps: int = 100) -> int:
    """The fewest k ≥ 1 with ``ns_threshold(k, run_for(coefficients, k), floor)`` ≤ ``sigma``: how many NS steps
    lift every normalised singular value in [σ, 1] to at least ``floor`` (a per-step schedule run for k steps as
    `run_for` says). ``ValueError`` if none up to ``max_steps`` does (or σ is not in (0, 1])."""
    if not (0 < sigma <= 1):
        raise ValueError(f"sigma must be in (0, 1], got {sigma!r}")
    for k in range(1, max_steps + 1):
        try:
            if ns_threshold(k, run_for(coefficients, k), floor) <= sigma:
                return k
        except ValueError:  # this k cannot reach the floor at all; more steps may
            continue
    raise ValueError(f"no k ≤ {max_steps} lifts σ = {sigma:g} to {floor}")
