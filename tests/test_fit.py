from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

import spectralscope as ss


def test_power_law_matches_linregress_and_t_interval(rng):
    x = np.geomspace(1e6, 1e9, 7)
    y = 3.0 * x**-0.27 * np.exp(rng.normal(0, 0.05, x.size))
    fit = ss.power_law(x, y)
    ref = scipy.stats.linregress(np.log(x), np.log(y))
    assert fit.slope == pytest.approx(ref.slope, rel=1e-12)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-12)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-12)
    assert fit.stderr == pytest.approx(ref.stderr, rel=1e-12)
    t = scipy.stats.t.ppf(0.975, x.size - 2)
    assert (fit.ci_low, fit.ci_high) == pytest.approx((ref.slope - t * ref.stderr, ref.slope + t * ref.stderr), rel=1e-12)
    np.testing.assert_allclose(fit.predict(x), np.exp(ref.intercept) * x**ref.slope, rtol=1e-12)
    assert fit.n == 7


def test_exact_power_law_and_dropped_pairs():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, -1.0, np.nan, 3.0])
    y = np.array([5.0, 5 * 2**-0.5, 5 * 4**-0.5, 5 * 8**-0.5, 5 * 16**-0.5, 1.0, 1.0, 0.0])
    fit = ss.power_law(x, y)  # the last three pairs are not finite and positive
    assert fit.n == 5 and fit.slope == pytest.approx(-0.5, abs=1e-12) and fit.r2 == pytest.approx(1.0)
    assert fit.predict(32.0) == pytest.approx(5 * 32**-0.5, rel=1e-12)


def test_offset_recovers_exponent_and_constant():
    x = np.geomspace(1, 1000, 12)
    y = 2.0 * x**-0.8 + 0.3
    fit = ss.power_law(x, y, offset=True)
    assert fit.slope == pytest.approx(-0.8, rel=1e-6) and fit.offset == pytest.approx(0.3, rel=1e-6)
    assert np.exp(fit.intercept) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-6)


def test_too_few_points_raise():
    with pytest.raises(ValueError, match="at least 3"):
        ss.power_law([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        ss.power_law([1.0, 2.0, 3.0], [1.0, -2.0, 0.0])
    with pytest.raises(ValueError, match="equal"):
        ss.power_law([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
