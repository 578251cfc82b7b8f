"""Power-law fits (SPEC §7), as pure functions on arrays.

`power_law` fits y ≈ e^a · x^b by ordinary least squares of ln y on ln x over the finite positive pairs,
with the standard error of b and its 95% t-interval on n − 2 degrees of freedom; ``offset=True`` fits
y = A·x^b + c by nonlinear least squares instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.stats


@dataclass(frozen=True)
class PowerLawFit:
    """y ≈ exp(intercept) · x^slope (+ offset). ``ci_low``/``ci_high``: the 95% t-interval of the slope."""

    slope: float
    intercept: float
    r2: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int
    offset: float = 0.0

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        """exp(intercept) · x^slope + offset."""
        return np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.slope + self.offset


def power_law(x: np.ndarray, y: np.ndarray, offset: bool = False) -> PowerLawFit:
    """Fit y ≈ e^a·x^b: OLS of ln y on ln x over the pairs with both values finite and positive.

    b = Σ(u − ū)(v − v̄)/Σ(u − ū)², a = v̄ − b·ū (u = ln x, v = ln y); r² of the log-log fit;
    stderr = sqrt(Σ residual² / (n − 2) / Σ(u − ū)²); CI = b ± t_{0.975, n−2}·stderr.
    With ``offset=True``: y = A·x^b + c by least squares over the pairs with x > 0 (started from the
    log-log fit), the slope's standard error from the Jacobian and its t-interval on n − 3 degrees of
    freedom (three parameters). Raises ``ValueError`` with fewer than 3 usable pairs.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"power_law: x and y differ in length ({x.size} vs {y.size})")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    if not offset:  # y > 0 for its logarithm; with an offset y may be anything finite
        keep &= y > 0
    n = int(keep.sum())
    if n < 3:
        raise ValueError(f"power_law needs at least 3 finite positive (x, y) pairs, got {n}")
    x, y = x[keep], y[keep]
    if offset:
        return _power_law_offset(x, y)
    u, v = np.log(x), np.log(y)
    du = u - u.mean()
    sxx = float(du @ du)
    if sxx == 0:
        raise ValueError("power_law: all x are equal; the slope is undefined")
    slope = float(du @ (v - v.mean())) / sxx
    intercept = float(v.mean() - slope * u.mean())
    resid = v - (intercept + slope * u)
    ss_res, ss_tot = float(resid @ resid), float(((v - v.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    stderr = float(np.sqrt(ss_res / (n - 2) / sxx)) if n > 2 else float("nan")
    t = float(scipy.stats.t.ppf(0.975, n - 2))
    return PowerLawFit(slope, intercept, r2, stderr, slope - t * stderr, slope + t * stderr, n)


def _power_law_offset(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    n = x.size
    if n < 4:
        raise ValueError(f"power_law(offset=True) needs at least 4 pairs for 3 parameters, got {n}")
    pos = y > 0
    start = power_law(x[pos], y[pos]) if pos.sum() >= 3 else PowerLawFit(-0.5, float(np.log(np.abs(y).mean())),
                                                                          0, 0, 0, 0, n)
    u = np.log(x)

    def resid(p: np.ndarray) -> np.ndarray:
        return np.exp(p[0] + p[1] * u) + p[2] - y

    sol = scipy.optimize.least_squares(resid, [start.intercept, start.slope, 0.0], method="lm")
    a, b, c = (float(v) for v in sol.x)
    r = sol.fun
    dof = n - 3
    ss_res = float(r @ r)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    try:
        cov = np.linalg.inv(sol.jac.T @ sol.jac) * ss_res / dof
        stderr = float(np.sqrt(cov[1, 1]))
    except np.linalg.LinAlgError:
        stderr = float("nan")
    t = float(scipy.stats.t.ppf(0.975, dof))
    return PowerLawFit(b, a, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, stderr, b - t * stderr, b + t * stderr,
                       n, offset=c)
