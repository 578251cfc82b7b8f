"""spectralscope.attention: the logit statistics of an attention call against an explicit float64 QKᵀ in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectralscope.attention import logit_stats, query_rows, summarise


def _reference(q, k, allowed, scale, rows=None):
    """max, mean, q99 per head of scale·q·kᵀ over the allowed pairs (numpy float64), on the query rows ``rows`` of
    the flattened (batch, position)."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    b, h, length, _ = q.shape
    s = np.einsum("bhie,bhje->bhij", q, k) * scale
    s = np.where(allowed, s, np.nan)
    s = s.transpose(1, 0, 2, 3).reshape(h, b * length, -1)  # head, (batch, position), key
    if rows is not None:
        s = s[:, rows]
    s = s.reshape(h, -1)
    return np.nanmax(s, 1), np.nanmean(s, 1), np.nanquantile(s, 0.99, axis=1)


def _check(stats, ref):
    for got, want in zip(summarise(stats), ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 7, 8, generator=g, dtype=torch.float64) * 2
    k = torch.randn(3, 4, 9, 8, generator=g, dtype=torch.float64)
    return q, k


def test_unmasked_logits_are_scale_q_dot_k(qk):
    q, k = qk
    allowed = np.ones((3, 4, 7, 9), dtype=bool)
    _check(logit_stats(q, k, max_queries=None), _reference(q.numpy(), k.numpy(), allowed, 8 ** -0.5))
    _check(logit_stats(q, k, scale=0.3, max_queries=None), _reference(q.numpy(), k.numpy(), allowed, 0.3))


def test_causal_is_the_top_left_lower_triangle(qk):
    q, k = qk
    allowed = np.broadcast_to(np.tril(np.ones((7, 9), dtype=bool)), (3, 4, 7, 9))
    _check(logit_stats(q, k, is_causal=True, max_queries=None), _reference(q.numpy(), k.numpy(), allowed, 8 ** -0.5))


def test_boolean_and_additive_masks_leave_out_what_they_mask(qk):
    q, k = qk
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(3, 1, 7, 9, generator=g) > 0.4  # broadcast over heads, as HF's padding masks are
    keep[..., 0] = True
    ref = _reference(q.numpy(), k.numpy(), np.broadcast_to(keep.numpy(), (3, 4, 7, 9)), 8 ** -0.5)
    _check(logit_stats(q, k, keep, max_queries=None), ref)
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        additive = torch.zeros(3, 1, 7, 9).masked_fill(~keep, fill)
        _check(logit_stats(q, k, additive, max_queries=None), ref)
    # a finite bias (ALiBi) is not added: the statistic is scale·q·k over the pairs attended to
    bias = torch.randn(3, 1, 7, 9, generator=g).masked_fill(~keep, float("-inf"))
    _check(logit_stats(q, k, bias, max_queries=None), ref)


def test_grouped_query_heads_share_their_key_head(qk):
    q, _ = qk
    k = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    full = k.repeat_interleave(2, dim=1).numpy()
    allowed = np.broadcast_to(np.tril(np.ones((7, 9), dtype=bool)), (3, 4, 7, 9))
    _check(logit_stats(q, k, is_causal=True, max_queries=None), _reference(q.numpy(), full, allowed, 8 ** -0.5))
    with pytest.raises(ValueError, match="evenly"):
        logit_stats(q, torch.randn(3, 3, 9, 8, dtype=torch.float64))


def test_the_cap_takes_evenly_spaced_query_rows_with_all_their_keys(qk):
    q, k = qk
    rows = query_rows(21, 5)
    assert rows.tolist() == [0, 5, 10, 15, 20] and query_rows(4, 5).tolist() == [0, 1, 2, 3]
    allowed = np.broadcast_to(np.tril(np.ones((7, 9), dtype=bool)), (3, 4, 7, 9))
    stats = logit_stats(q, k, is_causal=True, max_queries=5)
    _check(stats, _reference(q.numpy(), k.numpy(), allowed, 8 ** -0.5, rows.numpy()))
    # flattened rows 0, 5 | 10 | 15, 20 are positions 0, 5 of batch 0, 3 of batch 1, 1 and 6 of batch 2
    assert stats.count.tolist() == [float(np.tril(np.ones((7, 9)))[[0, 5, 3, 1, 6]].sum())] * 4


def test_merged_calls_pool_their_pairs_and_a_fully_masked_head_is_nan(qk):
    q, k = qk
    a, b = logit_stats(q[:1], k[:1], max_queries=None), logit_stats(q[1:], k[1:], max_queries=None)
    _check(a.merge(b), _reference(q.numpy(), k.numpy(), np.ones((3, 4, 7, 9), dtype=bool), 8 ** -0.5))
    none = torch.zeros(3, 4, 7, 9, dtype=torch.bool)
    none[:, :2] = True
    top, mean, high = (t.numpy() for t in summarise(logit_stats(q, k, none, max_queries=None)))
    assert np.isnan(top[2:]).all() and np.isnan(mean[2:]).all() and np.isnan(high[2:]).all()
    assert np.isfinite(top[:2]).all()
