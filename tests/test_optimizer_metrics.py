from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import np_quantile, prescribed

from spectralscope.newton_schulz import NSConfig
from spectralscope.optimizer_metrics import (
    direction_cosine,
    momentum_metrics,
    newton_schulz_metrics,
    update_metrics,
    weight_metrics,
)
from spectralscope.spectra import DEFAULT_QUANTILES as QS

SHAPES = [(24, 24), (16, 40), (40, 16), (1, 12), (12, 1)]


def _spectrum(r: int) -> np.ndarray:
    # values on both sides of the 5-step threshold 1.067e-3 after normalisation, none close to it
    return np.concatenate([np.geomspace(1.0, 0.02, max(r - r // 4, 1)), np.full(r // 4, 1e-5)])[:r]


@pytest.mark.parametrize("shape", SHAPES)
def test_momentum_metrics(shape):
    r = min(shape)
    s = _spectrum(r) * 7.0
    m = prescribed(*shape, s, seed=sum(shape))
    out = momentum_metrics(torch.from_numpy(m), QS, NSConfig())
    sv = np.linalg.svd(m, compute_uv=False)
    fro = np.sqrt((m**2).sum())
    np.testing.assert_allclose(out["momentum_norm"].item(), fro, rtol=1e-12)
    np.testing.assert_allclose(out["momentum_sv"].numpy(), np_quantile(sv / fro, QS), rtol=1e-9)
    assert out["ns_fail_frac"].item() == pytest.approx(np.mean(sv / fro < 1.067e-3))


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_metrics(shape):
    o = prescribed(*shape, np.linspace(1.2, 0.6, min(shape)), seed=3)
    out = newton_schulz_metrics(torch.from_numpy(o), QS)
    sv = np.linalg.svd(o, compute_uv=False)
    r = min(shape)
    small = o @ o.T if shape[0] <= shape[1] else o.T @ o
    np.testing.assert_allclose(out["ns_out_sv"].numpy(), np_quantile(sv, QS), rtol=1e-10)
    np.testing.assert_allclose(out["ns_polar_err"].item(), np.sqrt(np.mean((sv - 1) ** 2)), rtol=1e-10)
    np.testing.assert_allclose(out["ns_orth_err"].item(), np.linalg.norm(small - np.eye(r)) / np.sqrt(r), rtol=1e-10)
    # the polar error equals ‖O − UVᵀ‖_F/√r
    u, _, vt = np.linalg.svd(o, full_matrices=False)
    np.testing.assert_allclose(out["ns_polar_err"].item(), np.linalg.norm(o - u @ vt) / np.sqrt(r), rtol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_update_metrics(shape):
    dw = prescribed(*shape, np.geomspace(3e-3, 1e-5, min(shape)), seed=9)
    out = update_metrics(torch.from_numpy(dw), QS)
    sv = np.linalg.svd(dw, compute_uv=False)
    p = sv**2 / (sv**2).sum()
    rho = np.linalg.norm(dw, axis=1)
    np.testing.assert_allclose(out["update_rms"].item(), np.sqrt(np.mean(dw**2)), rtol=1e-12)
    np.testing.assert_allclose(out["update_sv"].numpy(), np_quantile(sv, QS), rtol=1e-9)
    np.testing.assert_allclose(out["update_erank"].item(), np.exp(-(p * np.log(p)).sum()), rtol=1e-9)
    np.testing.assert_allclose(out["neuron_norm"].numpy(), np_quantile(rho / rho.mean(), QS), rtol=1e-12)
    np.testing.assert_allclose(out["neuron_cv"].item(), np.std(rho) / np.mean(rho), rtol=1e-10, atol=1e-15)


def test_weight_metrics_spectral_norm():
    w = prescribed(30, 50, np.linspace(2.0, 0.1, 30), seed=4)
    out, v = weight_metrics(torch.from_numpy(w))
    assert out["weight_spectral_norm"].item() == pytest.approx(2.0, rel=1e-12) and v is None  # exact path
    spec = np.concatenate([[3.0, 2.9], np.linspace(2.8, 0.1, 518)])  # σ2/σ1 = 0.967
    big = prescribed(520, 600, spec, seed=5)  # above EXACT_TOP_MAX: power iteration
    out, v = weight_metrics(torch.from_numpy(big))
    assert out["weight_spectral_norm"].item() == pytest.approx(3.0, rel=1e-3) and v.shape == (600,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    m = torch.from_numpy(prescribed(16, 32, np.geomspace(1, 0.05, 16), seed=8)).to(dtype)
    ref = m.double().numpy()
    sv = np.linalg.svd(ref, compute_uv=False)
    out = momentum_metrics(m, QS)
    np.testing.assert_allclose(out["momentum_sv"].numpy(), np_quantile(sv / np.linalg.norm(ref), QS), rtol=1e-9)
    up = update_metrics(m, QS)
    np.testing.assert_allclose(up["update_sv"].numpy(), np_quantile(sv, QS), rtol=1e-9)


def test_zero_input_gives_nan_for_normalised_quantities():
    z = torch.zeros(8, 12)
    mm = momentum_metrics(z, QS, NSConfig())
    assert mm["momentum_norm"].item() == 0.0
    assert torch.isnan(mm["momentum_sv"]).all() and torch.isnan(mm["ns_fail_frac"])
    up = update_metrics(z, QS)
    assert up["update_rms"].item() == 0.0
    assert torch.isnan(up["update_erank"]) and torch.isnan(up["neuron_cv"]) and torch.isnan(up["neuron_norm"]).all()


@pytest.mark.parametrize("shape", [(10, 14), (14, 10)])  # the tall case takes row norms from ΔW itself
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_gives_nan_never_raises(bad, shape):
    m = torch.randn(*shape)
    m[3, 4] = bad
    for out in (momentum_metrics(m, QS, NSConfig()), newton_schulz_metrics(m, QS), update_metrics(m, QS),
                weight_metrics(m)[0]):
        for name, value in out.items():
            assert torch.isnan(value).all(), name


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_direction_cosine_within_the_leading_subspace_of_m_matches_numpy(shape):
    # M of rank 3 plus a little noise: only its 3 large directions are kept; A and D differ by noise in the
    # others (what a stochastically rounded NS adds there) and by a small part inside
    rng = np.random.default_rng(1)
    r, c = shape
    m = rng.normal(size=(r, 3)) @ rng.normal(size=(3, c)) + 1e-4 * rng.normal(size=shape)
    a, d = rng.normal(size=shape), rng.normal(size=shape)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = int((s >= 1e-2 * np.linalg.norm(m)).sum())
    assert k == 3
    pa, pd = u[:, :k].T @ a @ vt[:k].T, u[:, :k].T @ d @ vt[:k].T
    want = (pa * pd).sum() / np.linalg.norm(pa) / np.linalg.norm(pd)
    got = direction_cosine(torch.tensor(a), torch.tensor(d), torch.tensor(m))["ns_consistency"]
    np.testing.assert_allclose(float(got), want, rtol=1e-10)
    plain = direction_cosine(torch.tensor(a), torch.tensor(d))["ns_consistency"]
    np.testing.assert_allclose(float(plain), (a * d).sum() / np.linalg.norm(a) / np.linalg.norm(d), rtol=1e-12)
