"""spectralscope.settle: settle detection on synthetic series with a known burn-in."""

from __future__ import annotations

import numpy as np
import pytest

from spectralscope.settle import rolling_median, settled_from


def test_rolling_median_is_numpys_median_of_each_window():
    y = np.random.default_rng(0).normal(size=30)
    y[7] = np.nan
    m = rolling_median(y, 5)
    assert np.isnan(m[:4]).all()
    for t in range(4, 30):
        assert m[t] == pytest.approx(np.nanmedian(y[t - 4 : t + 1]))


@pytest.mark.parametrize("tau", [5.0, 10.0, 20.0])
def test_an_exponential_transient_settles_where_it_falls_under_the_tolerance(tau):
    """y = 1 + 2·exp(−t/τ) (·(1 + noise)): the transient 2·exp(−t/τ) is under tol = 0.1 of the level from
    t = τ·ln(20) on; the detected start lies within a window of that."""
    rng = np.random.default_rng(int(tau))
    t = np.arange(200)
    y = (1 + 2 * np.exp(-t / tau)) * (1 + 0.01 * rng.normal(size=t.size))
    known = tau * np.log(2 / 0.1)
    s = settled_from(y, window=5, tol=0.1)
    assert s.settled and known - 5 <= s.start <= known + 5, (s.start, known)


def test_a_series_still_moving_at_the_end_has_not_settled():
    t = np.arange(100)
    assert not settled_from(np.exp(t / 30.0)).settled  # grows to the end
    assert not settled_from(np.r_[np.ones(90), 2 * np.ones(10)]).settled  # a late step: under a quarter settled
    assert settled_from(np.r_[2 * np.ones(50), np.ones(50)]).start == 50
    flat = settled_from(np.ones(40))
    assert flat.start == 0 and flat.n == 40


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="window"):
        settled_from(np.ones(10), window=0)
    with pytest.raises(ValueError, match="tol"):
        settled_from(np.ones(10), tol=0)
    assert not settled_from(np.ones(3)).settled and not settled_from(np.full(20, np.nan)).settled


def _reference(y, w=5, tol=0.1):
    """The rule written out plainly, one series at a time."""
    n = len(y)
    m = {t: np.nanmedian(y[t - w + 1 : t + 1]) for t in range(w - 1, n) if np.isfinite(y[t - w + 1 : t + 1]).any()}
    end = m.get(n - 1, np.nan)
    if not np.isfinite(end):
        return -1
    t_star = next(t for t in range(w - 1, n + 1) if all(abs(m[u] - end) <= tol * abs(end) for u in m if u >= t))
    b = 0 if t_star == w - 1 else t_star - (w - 1) // 2
    return b if n - b >= max(2 * w, int(np.ceil(n / 4))) else -1


def test_many_series_at_once_follow_the_rule_written_out():
    from spectralscope.settle import settled_starts

    rng = np.random.default_rng(1)
    t = np.arange(60)[:, None]
    y = (1 + rng.uniform(0.5, 3, 8) * np.exp(-t / rng.uniform(3, 20, 8))) * (1 + 0.02 * rng.normal(size=(60, 8)))
    y[:, 3] = np.exp(t[:, 0] / 20)  # never settles
    y[10:20, 5] = np.nan
    starts = settled_starts(y)
    assert starts[3] == -1 and (starts >= 0).sum() >= 5
    assert starts.tolist() == [_reference(y[:, j]) for j in range(8)]
