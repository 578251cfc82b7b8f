"""When a recorded series has settled: the end of its burn-in, by a documented rule, as pure functions on arrays.

For a series y_0 … y_{n−1} (one layer's metric over a run's records; NaNs skipped) and a window of w records, let
m_t = median(y_{t−w+1} … y_t) be the rolling median (t ≥ w − 1) and m_end = m_{n−1} the level it ends at. Let t*
be the first t from which every rolling median stays within a relative tolerance of the final level,

    |m_t − m_end| ≤ tol · |m_end|   for every t ≥ t*;

the series has *settled from* record b = t* − ⌊(w − 1)/2⌋, the centre of that first window (a median stands for the
middle of its window: a step from one level to another at record s is found at s), and the burn-in is records
0 … b − 1. It has *not settled* when that holds for fewer than
``min_settled`` records at the end (by default the larger of 2·w and a quarter of the run): the tail is still
moving. The defaults (w = 5, tol = 0.1, a quarter of the run) are documented in docs/store.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

WINDOW = 5
TOLERANCE = 0.1
MIN_SHARE = 0.25


@dataclass(frozen=True)
class Settling:
    """``start``: the first settled record (None when the series never settled), ``n`` records in all."""

    start: int | None
    n: int

    @property
    def settled(self) -> bool:
        return self.start is not None


def rolling_median(y: np.ndarray, window: int) -> np.ndarray:
    """m_t = the NaN-skipping median of y[t − window + 1 : t + 1] along the first axis, for t ≥ window − 1 (NaN
    before, and where a window holds no finite value)."""
    y = np.asarray(y, dtype=np.float64)
    out = np.full(y.shape, np.nan)
    if y.shape[0] < window:
        return out
    views = np.lib.stride_tricks.sliding_window_view(y, window, axis=0)  # (n − w + 1, …, w)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows stay NaN
        out[window - 1:] = np.nanmedian(views, axis=-1)
    return out


def settled_starts(y: np.ndarray, window: int = WINDOW, tol: float = TOLERANCE, min_settled: int | None = None
                   ) -> np.ndarray:
    """The first settled record of each column of ``y`` (n records × series) by the rule of the module docstring,
    −1 for a series that has not settled; one vectorised pass."""
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"settled_from: window must be an int >= 1, got {window!r}")
    if not tol > 0:
        raise ValueError(f"settled_from: tol must be > 0, got {tol!r}")
    y = np.asarray(y, dtype=np.float64)
    y = y.reshape(y.shape[0], -1)
    n = y.shape[0]
    need = min_settled if min_settled is not None else max(2 * window, int(np.ceil(MIN_SHARE * n)))
    if n < window:
        return np.full(y.shape[1], -1)
    m = rolling_median(y, window)
    end = m[-1]
    with np.errstate(invalid="ignore"):
        inside = np.abs(m - end) <= tol * np.abs(end)
    # a window with nothing finite does not unsettle
    inside |= ~np.isfinite(m) & (np.arange(n) >= window - 1)[:, None]
    inside[: window - 1] = False  # no full window yet
    out = ~inside
    # the last record outside; -1 when none (window 1 and inside throughout)
    last = np.where(out.any(axis=0), n - 1 - np.argmax(out[::-1], axis=0), -1)
    # inside from the first full window on: settled from the start
    b = np.where(last >= window - 1, np.maximum(0, last + 1 - (window - 1) // 2), 0)
    return np.where(np.isfinite(end) & (n - b >= need), b, -1)


def settled_from(y: np.ndarray, window: int = WINDOW, tol: float = TOLERANCE, min_settled: int | None = None
                 ) -> Settling:
    """The first settled record of one series ``y`` by the rule of the module docstring."""
    y = np.asarray(y, dtype=np.float64).ravel()
    start = int(settled_starts(y[:, None], window, tol, min_settled)[0])
    return Settling(start if start >= 0 else None, y.size)
