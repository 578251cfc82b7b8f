from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import np_quantile, prescribed

from spectralscope.spectra import (
    DEFAULT_QUANTILES,
    _torch_spectrum,
    as_matrix,
    eigvalsh,
    entropy_rank,
    gram_spectrum,
    matrix_spectrum,
    participation_rank,
    quantiles,
    refine_budget,
    route_costs,
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


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64)])
def test_gram_spectrum_returns_the_gram_diagonal(shape):
    a = prescribed(*shape, np.geomspace(3.0, 1e-5, min(shape)), seed=13)
    sigma, diag = gram_spectrum(torch.from_numpy(a))
    side = a @ a.T if shape[0] <= shape[1] else a.T @ a
    np.testing.assert_allclose(diag.numpy(), np.diag(side), rtol=1e-13)
    np.testing.assert_allclose(sigma.numpy(), _ref_sv(a), rtol=1e-10)


def test_many_small_singular_values_are_refined_from_one_reduction():
    # Half the spectrum below the refinement threshold, in a cluster: the tridiagonal eigenvectors are
    # mapped back through the Householder reflectors, and must span the small subspace exactly.
    s = np.concatenate([np.linspace(1.0, 0.5, 40), np.geomspace(1e-4, 1e-6, 40)])
    a = prescribed(80, 300, s, seed=14)
    got = singular_values(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, _ref_sv(a), rtol=1e-9)


def test_entries_whose_squares_overflow_are_rescaled_not_lost():
    a = prescribed(20, 30, np.geomspace(2.0, 1e-3, 20), seed=15)
    big = a * 1e200  # finite in float64, but every square overflows
    got = singular_values(torch.from_numpy(big)).numpy()
    np.testing.assert_allclose(got, _ref_sv(a) * 1e200, rtol=1e-10)
    assert float(top_singular_value(torch.from_numpy(big))) == pytest.approx(float(_ref_sv(a)[0]) * 1e200, rel=1e-12)


def test_device_path_matches_numpy():
    # The torch.linalg route used off the CPU, run here on CPU tensors: same answers as the LAPACK route.
    s = np.concatenate([[4.0, 2.0], np.geomspace(1.0, 1e-6, 38)])
    for shape in [(40, 100), (100, 40)]:
        a = prescribed(*shape, s, seed=16)
        sigma, diag = _torch_spectrum(torch.from_numpy(a), 2e-3)
        np.testing.assert_allclose(sigma.numpy(), _ref_sv(a), rtol=1e-9)
        side = a @ a.T if shape[0] <= shape[1] else a.T @ a
        np.testing.assert_allclose(diag.numpy(), np.diag(side), rtol=1e-13)
    bad = torch.ones(5, 8, dtype=torch.float64)
    bad[1, 1] = float("nan")
    assert torch.isnan(_torch_spectrum(bad, 2e-3)[0]).all()


@pytest.mark.parametrize("n", [1, 2, 17, 130])
def test_eigvalsh_matches_numpy(n, rng):
    x = rng.standard_normal((n, n))
    g = x + x.T
    np.testing.assert_allclose(eigvalsh(torch.from_numpy(g)).numpy(), np.linalg.eigvalsh(g), rtol=1e-10, atol=1e-12 * n)


def _decaying(m, n, seed, small=0.5):
    """A spectrum whose lower ``small`` fraction lies far below 2e-3·σ_1 (many values to refine)."""
    r = min(m, n)
    k = int(small * r)
    s = np.concatenate([np.geomspace(1.0, 5e-2, r - k), np.geomspace(1e-4, 1e-6, k)])
    return prescribed(m, n, s, seed=seed).astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("shape", [(96, 96), (48, 160), (160, 48)])
@pytest.mark.parametrize("hint", [None, 0, 1000])
def test_matrix_spectrum_every_route_is_exact(shape, hint):
    # hint None/0 starts on the Gram route (which hands over to the direct SVD past its refine budget);
    # a large hint goes straight to the direct SVD. Every route: float64-SVD accuracy down to 1e-6·σ_1.
    for small in (0.0, 0.05, 0.5):
        a = _decaying(*shape, seed=int(100 * small) + shape[0], small=small)
        sp = matrix_spectrum(torch.from_numpy(a), k_hint=hint)
        ref = _ref_sv(a)
        keep = ref / ref[0] >= 1e-6
        np.testing.assert_allclose(sp.sigma.numpy()[keep], ref[keep], rtol=1e-9)
        diag_ref = (a * a).sum(axis=1 if shape[0] <= shape[1] else 0)
        np.testing.assert_allclose(sp.diag.numpy(), diag_ref, rtol=1e-12)
        assert sp.k == int(np.sum(ref < 2e-3 * ref[0]))
        expect_direct = (hint is not None and sum(route_costs(*shape, hint)[:2]) > route_costs(*shape, hint)[2]) or (
            sp.k > refine_budget(*shape))
        assert sp.route == ("direct" if expect_direct else "gram")


def test_route_costs_pick_the_cheaper_route_where_it_is_clear():
    # square with half its spectrum to refine: the direct SVD is cheaper; wide with one value: the Gram route
    gram, refine, direct = route_costs(128, 128, 64)
    assert gram + refine > direct
    gram, refine, direct = route_costs(128, 512, 1)
    assert gram + refine < direct
    assert route_costs(128, 512, 0)[1] == 0.0
    assert 0 < refine_budget(128, 128) < refine_budget(128, 512)


def test_matrix_spectrum_bad_input_gives_nan_like_gram_spectrum():
    a = torch.randn(20, 30)
    a[3, 4] = float("nan")
    for hint in (None, 1000):
        sp = matrix_spectrum(a, k_hint=hint)
        assert torch.isnan(sp.sigma).all() and sp.sigma.shape == (20,)
    big = torch.from_numpy(prescribed(20, 30, np.geomspace(1, 1e-5, 20), seed=4) * 1e200)
    for hint in (None, 1000):
        sp = matrix_spectrum(big, k_hint=hint)
        np.testing.assert_allclose(sp.sigma.numpy(), np.geomspace(1, 1e-5, 20) * 1e200, rtol=1e-8)


def test_a_batch_of_same_shaped_matrices_has_numpys_spectra_and_hands_back_what_needs_refinement():
    from spectralscope.spectra import _gram_batch, matrix_spectra

    rng = np.random.default_rng(3)
    for shape in ((12, 30), (30, 12), (16, 16)):
        r = min(shape)
        mats = []
        for i in range(5):
            u, _ = np.linalg.qr(rng.standard_normal((shape[0], r)))
            v, _ = np.linalg.qr(rng.standard_normal((shape[1], r)))
            s = rng.uniform(0.5, 2.0, r) if i != 3 else np.geomspace(1.0, 1e-5, r)  # #3 needs its small end refined
            mats.append(torch.from_numpy((u * s) @ v.T).float())
        mats[1] = mats[1].clone()
        mats[1][2, 2] = float("nan")
        got = _gram_batch(mats)
        assert got[1] is None and got[3] is None  # not finite; σ below REFINE_BELOW·σ_1: per matrix
        for i in (0, 2, 4):
            a = mats[i].double().numpy()
            ref = np.linalg.svd(a, compute_uv=False)
            np.testing.assert_allclose(got[i].sigma.numpy(), ref, rtol=1e-10, atol=0)
            side = a @ a.T if shape[0] <= shape[1] else a.T @ a
            np.testing.assert_allclose(got[i].diag.numpy(), np.diag(side), rtol=1e-12)
            assert got[i].k == 0 and got[i].route == "gram"
        # the whole list, batch or not, as numpy has it (NaN for the non-finite one)
        for i, sp in enumerate(matrix_spectra(mats, [0] * 5)):
            if i == 1:
                assert np.isnan(sp.sigma.numpy()).all()
            else:
                ref = np.linalg.svd(mats[i].double().numpy(), compute_uv=False)
                np.testing.assert_allclose(sp.sigma.numpy(), ref, rtol=1e-10, atol=1e-12 * ref[0])
