from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import np_quantile, prescribed

from spectralscope.spectra import (
    DEFAULT_QUANTILES,
    as_matrix,
    entropy_rank,
    participation_rank,
    quantiles,
    singular_values,
    spectral_norm,
    top_singular_value,
)

SHAPES = [(40, 40), (30, 70), (70, 30), (1, 50), (50, 1), (1, 1)]


def _ref_sv(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(a, dtype=np.float64), compute_uv=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_singular_values_match_numpy_on_prescribed_spectra(shape, method):
    m, n = shape
    r = min(m, n)
    s = np.geomspace(10.0, 1e-3, r) if r > 1 else np.array([3.0])
    a = prescribed(m, n, s, seed=m * 100 + n)
    got = singular_values(torch.from_numpy(a), method=method).numpy()
    ref = _ref_sv(a)
    assert got.shape == (r,)
    assert np.all(np.diff(got) <= 0), "descending"
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=0)


def test_wide_dynamic_range_keeps_small_singular_values_accurate():
    # σ spanning 1 … 1e-6: the Gram route alone would lose ~1e-4 relative at the bottom.
    s = np.geomspace(1.0, 1e-6, 60)
    a = prescribed(60, 200, s, seed=7).astype(np.float32).astype(np.float64)  # exact float32 values
    got = singular_values(torch.from_numpy(a).float()).numpy()
    ref = _ref_sv(a)
    keep = ref / ref[0] >= 1e-6
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-8)
    # without refinement the small end is visibly worse: the refinement is doing work
    plain = singular_values(torch.from_numpy(a), refine_below=0).numpy()
    assert np.max(np.abs(plain[keep] - ref[keep]) / ref[keep]) > 1e-6


def test_rank_deficient():
    s = np.array([5.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    a = prescribed(8, 20, s[:4], seed=3)
    got = singular_values(torch.from_numpy(a)).numpy()
    assert got.shape == (8,)
    np.testing.assert_allclose(got[:4], s[:4], rtol=1e-10)
    assert np.all(np.abs(got[4:]) <= 1e-7 * s[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_are_measured_exactly_as_stored(dtype):
    a = torch.from_numpy(prescribed(24, 48, np.geomspace(4, 0.05, 24), seed=5)).to(dtype)
    ref = _ref_sv(a.to(torch.float64).numpy())  # the matrix the low-precision tensor really holds
    np.testing.assert_allclose(singular_values(a).numpy(), ref, rtol=1e-10)


def test_zero_matrix_gives_zeros_and_nonfinite_gives_nan():
    assert torch.equal(singular_values(torch.zeros(5, 7)), torch.zeros(5, dtype=torch.float64))
    for bad in (float("nan"), float("inf"), -float("inf")):
        a = torch.randn(6, 9)
        a[2, 3] = bad
        out = singular_values(a)
        assert out.shape == (6,) and torch.isnan(out).all()


def test_conv_kernels_are_viewed_as_out_by_in_k_k():
    w = torch.randn(8, 3, 5, 5)
    assert as_matrix(w).shape == (8, 75)
    ref = _ref_sv(w.reshape(8, -1).double().numpy())
    np.testing.assert_allclose(singular_values(w).numpy(), ref, rtol=1e-10)


def test_quantiles_equal_numpy_linear(rng):
    x = rng.standard_normal(37)
    np.testing.assert_allclose(quantiles(torch.from_numpy(x)).numpy(), np_quantile(x, DEFAULT_QUANTILES), rtol=1e-14)
    qs = (0.1, 0.33, 0.9)
    np.testing.assert_allclose(quantiles(torch.from_numpy(x), qs).numpy(), np_quantile(x, qs), rtol=1e-14)
    assert torch.isnan(quantiles(torch.tensor([1.0, float("nan")]))).all()
    assert torch.isnan(quantiles(torch.tensor([]))).all()


def test_entropy_and_participation_ranks(rng):
    w = rng.random(50) ** 3
    p = w / w.sum()
    np.testing.assert_allclose(float(entropy_rank(torch.from_numpy(w))), np.exp(-(p * np.log(p)).sum()), rtol=1e-12)
    np.testing.assert_allclose(float(participation_rank(torch.from_numpy(w))), w.sum() ** 2 / (w**2).sum(), rtol=1e-12)
    # k equal weights and zeros: both ranks are exactly k
    flat = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0])
    assert float(entropy_rank(flat)) == pytest.approx(3.0, rel=1e-12)
    assert float(participation_rank(flat)) == pytest.approx(3.0, rel=1e-12)
    assert torch.isnan(entropy_rank(torch.zeros(4)))
    assert torch.isnan(participation_rank(torch.zeros(4)))


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (200, 50), (1, 30)])
def test_spectral_norm_power_iteration(shape):
    # Hard case for power iteration: a small gap between σ1 and σ2.
    r = min(shape)
    s = np.concatenate([[1.0, 0.97], np.linspace(0.9, 0.1, max(r - 2, 0))])[:r]
    a = prescribed(*shape, s, seed=11)
    s1, v = spectral_norm(torch.from_numpy(a))
    assert abs(float(s1) - s[0]) <= 1e-3 * s[0]
    # warm start from the returned vector converges at once and agrees
    s1b, _ = spectral_norm(torch.from_numpy(a), v)
    assert abs(float(s1b) - s[0]) <= 1e-3 * s[0]
    assert torch.isnan(spectral_norm(torch.full(shape, float("nan")))[0])
    assert float(spectral_norm(torch.zeros(shape))[0]) == 0.0


def test_spectral_norm_does_not_touch_global_rng():
    state = torch.get_rng_state()
    x1 = torch.randn(5)
    torch.set_rng_state(state)
    spectral_norm(torch.ones(10, 10))
    x2 = torch.randn(5)
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (200, 50), (1, 30)])
def test_top_singular_value_is_exact(shape):
    a = prescribed(*shape, np.linspace(2.0, 0.1, min(shape)), seed=12)
    assert float(top_singular_value(torch.from_numpy(a))) == pytest.approx(2.0, rel=1e-12)
    assert torch.isnan(top_singular_value(torch.full(shape, float("inf"))))
