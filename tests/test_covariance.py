from __future__ import annotations

import numpy as np
import pytest
import torch

import spectralscope.covariance as covariance_module
from spectralscope.covariance import (
    CovarianceStats,
    activation_metrics,
    covariance,
    covariance_eigenvalues,
    tail_alpha,
    tail_window,
)


def _stats(x: np.ndarray, chunks: int = 1) -> CovarianceStats:
    st = CovarianceStats.zeros(x.shape[1])
    for part in np.array_split(x, chunks):
        st.add(torch.from_numpy(part))
    return st


@pytest.mark.parametrize("chunks", [1, 3])
def test_eigenvalues_match_numpy_cov(rng, chunks):
    d = 40
    scales = np.geomspace(5.0, 0.01, d)
    x = rng.standard_normal((500, d)) * scales @ np.linalg.qr(rng.standard_normal((d, d)))[0] + 3.0
    lam = covariance_eigenvalues(_stats(x, chunks)).numpy()
    ref = np.sort(np.clip(np.linalg.eigvalsh(np.cov(x.T, ddof=1)), 0, None))[::-1]
    np.testing.assert_allclose(lam, ref, rtol=1e-9, atol=1e-12 * ref[0])


def test_blockwise_in_place_sums_match_numpy_and_reset_starts_over(rng, monkeypatch):
    monkeypatch.setattr(covariance_module, "BLOCK_BYTES", 8 * 30 * 7)  # 7 tokens per block: many blocks
    x = rng.standard_normal((101, 30)).astype(np.float32) * np.geomspace(4.0, 0.1, 30).astype(np.float32) + 2.0
    st = _stats(x, 3)
    assert st.n.item() == 101
    np.testing.assert_allclose(st.s.numpy(), x.astype(np.float64).sum(0), rtol=1e-13)
    np.testing.assert_allclose(covariance(st).numpy(), np.cov(x.astype(np.float64).T, ddof=1), rtol=1e-12, atol=1e-14)
    ss = st.ss
    y = rng.standard_normal((40, 30))
    st.reset()
    st.add(torch.from_numpy(y))
    assert st.ss is ss and st.n.item() == 40  # the same buffers, zeroed
    np.testing.assert_allclose(covariance(st).numpy(), np.cov(y.T, ddof=1), rtol=1e-12, atol=1e-14)


def test_metrics_match_their_formulas(rng):
    d = 64
    x = rng.standard_normal((1000, d)) * np.geomspace(3, 0.05, d)
    lam = covariance_eigenvalues(_stats(x)).numpy()
    out = activation_metrics(torch.from_numpy(lam))
    p = lam / lam.sum()
    assert out["act_soft_rank"].item() == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert out["act_hard_rank"].item() == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-12)
    assert out["act_top10_share"].item() == pytest.approx(lam[:10].sum() / lam.sum(), rel=1e-12)
    lo, hi = tail_window(d)
    assert (lo, hi) == (3, 13)
    i = np.arange(lo, hi + 1)
    slope = np.polyfit(np.log(i), np.log(lam[lo - 1 : hi]), 1)[0]
    assert out["act_tail_alpha"].item() == pytest.approx(-slope, rel=1e-9)


def test_tail_alpha_recovers_a_power_law_and_needs_five_ranks():
    for alpha in (0.5, 1.0, 2.3):
        lam = torch.arange(1, 769, dtype=torch.float64) ** -alpha
        assert tail_alpha(lam).item() == pytest.approx(alpha, rel=1e-12)
    assert tail_window(768) == (31, 154)  # SPEC: ranks ≈ 30–150 at width 768
    assert torch.isnan(tail_alpha(torch.arange(1, 21, dtype=torch.float64) ** -1.0))  # window 2..4


def test_degenerate_inputs_give_nan():
    one = CovarianceStats.zeros(5)
    one.add(torch.ones(1, 5))
    assert torch.isnan(covariance_eigenvalues(one)).all()
    bad = CovarianceStats.zeros(5)
    bad.add(torch.tensor([[1.0, float("nan"), 0, 0, 0], [0, 1.0, 0, 0, 0]]))
    assert torch.isnan(covariance_eigenvalues(bad)).all()
    const = _stats(np.ones((10, 4)))
    out = activation_metrics(covariance_eigenvalues(const))
    assert torch.isnan(out["act_soft_rank"]) and torch.isnan(out["act_hard_rank"]) and torch.isnan(out["act_top10_share"])
