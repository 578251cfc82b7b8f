"""Token-frequency buckets: `frequency_buckets`' rule, and `ActivationSpectra(buckets=...)` against numpy on the
rows of each bucket."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import spectralscope as ss
from spectralscope.buckets import frequency_buckets


def test_frequency_buckets_cut_the_ranking_by_cumulative_share():
    # counts 50, 20, 15, 10, 4, 1 (ids 3, 0, 5, 1, 2, 4) and id 6 never seen
    ids = np.repeat([3, 0, 5, 1, 2, 4], [50, 20, 15, 10, 4, 1])
    b = frequency_buckets(ids, vocab=7)
    assert b == {"head": [3], "mid": [0, 1, 5], "tail": [2, 4, 6]}  # 50% reached by id 3; 4 + 1 + 0 ≤ 10%
    b = frequency_buckets(ids, vocab=7, head=0.6, tail=0.04)
    assert b == {"head": [0, 3], "mid": [1, 2, 5], "tail": [4, 6]}  # 70% ≥ 60%; 1 ≤ 4%, 1 + 4 > 4%
    with pytest.raises(ValueError, match="head"):
        frequency_buckets(ids, head=0.9, tail=0.2)
    with pytest.raises(ValueError, match="outside a vocabulary"):
        frequency_buckets(ids, vocab=4)


class TokenNet(nn.Module):
    def __init__(self, vocab=12, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 16)
        self.out = nn.Linear(16, vocab)

    def forward(self, ids):
        return self.out(torch.tanh(self.fc(self.emb(ids))))


def _ref_eig(x):
    return np.sort(np.clip(np.linalg.eigvalsh(np.cov(x.T, ddof=1)), 0, None))[::-1]


@pytest.mark.parametrize("background", [False, True, "auto"])
def test_per_bucket_spectra_are_numpys_on_the_rows_of_each_bucket(tmp_path, background, caplog):
    torch.manual_seed(0)
    model = TokenNet()
    opt = torch.optim.Muon([model.fc.weight, model.out.weight], lr=0.01)
    buckets = {"head": [0, 1, 2], "mid": [3, 4, 5, 6], "tail": [7, 8, 9, 10, 11]}
    seen = []
    grab = model.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().reshape(-1, 8)))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 12, (6, 10), generator=gen) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "b.zarr", every=1, overhead=None, background=background,
                      activations=ss.ActivationSpectra(every=2, modules=["fc"], buckets=buckets)) as rec:
            for step, ids in enumerate(batches):
                seen.clear()
                nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
                if step == 2:
                    x, tok = torch.cat(seen).numpy(), ids.reshape(-1).numpy()
                opt.step()
                opt.zero_grad()
    grab.remove()
    ds = ss.open_run(rec.path)["activations"].dataset
    assert list(ds["bucket"].values) == ["all", "head", "mid", "tail"]
    assert ds["act_eig"].dims == ("step", "module", "bucket", "rank")
    assert ds["act_hard_rank"].dims == ("step", "module", "bucket")
    got = ds["act_eig"].sel(step=2, module="fc")
    np.testing.assert_allclose(got.sel(bucket="all").values, _ref_eig(x), rtol=1e-9, atol=1e-12)
    for name, members in buckets.items():
        rows = x[np.isin(tok, members)]
        ref = _ref_eig(rows)
        np.testing.assert_allclose(got.sel(bucket=name).values, ref, rtol=1e-9, atol=1e-12)
        lam = ref / ref.sum()
        hard = ds["act_hard_rank"].sel(step=2, module="fc", bucket=name).values
        assert hard == pytest.approx(1 / (lam ** 2).sum(), rel=1e-9)
        assert ds["act_tokens"].sel(step=2, module="fc", bucket=name).values == len(rows)
    assert rec.errors == {} and "recorded as NaN" not in caplog.text


def test_a_bucket_without_tokens_and_rows_that_do_not_line_up_are_said(tmp_path, caplog):
    torch.manual_seed(0)
    model = TokenNet()
    opt = torch.optim.Muon([model.fc.weight], lr=0.01)
    buckets = {"seen": list(range(11)), "never": [11]}
    ids = torch.randint(0, 11, (4, 6))
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "n.zarr", every=1, overhead=None, background=False,
                      activations=ss.ActivationSpectra(every=1, modules=["fc"], buckets=buckets,
                                                       tokens=lambda args, kwargs: args[0][:, :3])) as rec:
            model(ids).square().mean().backward()
            opt.step()
    ds = ss.open_run(rec.path)["activations"].dataset
    assert np.isfinite(ds["act_hard_rank"].sel(bucket="all").values).all()
    assert np.isnan(ds["act_hard_rank"].sel(bucket="never").values).all()
    assert "its input has 24 rows and the batch 12 token ids" in caplog.text
    assert rec.errors


def test_bad_buckets_are_refused_in_one_line():
    with pytest.raises(ValueError, match="both buckets"):
        ss.ActivationSpectra(buckets={"a": [1, 2], "b": [2]})
    with pytest.raises(ValueError, match="other than 'all'"):
        ss.ActivationSpectra(buckets={"all": [1]})
    with pytest.raises(ValueError, match="tokens must be a function"):
        ss.ActivationSpectra(buckets={"a": [1]}, tokens=3)
