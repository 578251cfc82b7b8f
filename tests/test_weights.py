"""hooks.weights: `WeightSpectra` records σ(W) quantiles, the ESD exponent and the stable rank of the watched
layers at its own cadence, against numpy and WeightWatcher on the weights captured at those steps."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn
from weightwatcher.WW_powerlaw import WWFit

import spectralscope as ss


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64, bias=False), nn.Tanh(), nn.Linear(64, 48, bias=False), nn.Tanh(),
                         nn.Linear(48, 10, bias=False))


@pytest.mark.parametrize("background", [False, True, "auto"])
def test_weight_spectra_match_numpy_and_weightwatcher_at_their_cadence(tmp_path, background, caplog):
    model = _net()
    opt = torch.optim.Muon([m.weight for m in model if isinstance(m, nn.Linear)], lr=0.02)
    x, y = torch.randn(128, 24), torch.randint(0, 10, (128,))
    kept = {}
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "w.zarr", every=2, overhead=None, background=background,
                      weights=ss.WeightSpectra(every=3)) as rec:
            for step in range(7):
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                if step % 3 == 0:
                    kept[step] = [m.weight.detach().double().numpy().copy() for m in model if isinstance(m, nn.Linear)]
    tree = ss.open_run(rec.path)
    ds = tree["weights"].dataset
    assert list(ds["step"].values) == [0, 3, 6] and list(tree["optimizer"]["step"].values) == [0, 2, 4, 6]
    assert list(ds["layer"].values) == ["0.weight", "2.weight", "4.weight"]
    assert list(ds["rows"].values) == [64, 48, 10]
    qs = ds["quantile"].values
    for step, weights in kept.items():
        for j, w in enumerate(weights):
            sv = np.linalg.svd(w, compute_uv=False)
            np.testing.assert_allclose(ds["weight_sv"].sel(step=step).values[j], np.quantile(sv, qs), rtol=1e-10)
            assert ds["weight_stable_rank"].sel(step=step).values[j] == pytest.approx(
                np.linalg.norm(w) ** 2 / np.linalg.norm(w, 2) ** 2, rel=1e-10)
            alpha = ds["weight_alpha"].sel(step=step).values[j]
            if min(w.shape) >= 20:
                assert alpha == pytest.approx(WWFit(np.sort(sv ** 2)).alpha, rel=1e-9)
            else:  # the 10×48 head: too few eigenvalues for a tail fit, said
                assert np.isnan(alpha)
    assert "weight_alpha of 4.weight has 10 eigenvalues" in caplog.text
    assert set(rec.errors) == {"weight_alpha"}


def test_weights_are_off_by_default_and_bad_settings_are_refused(tmp_path):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ss.watch(opt, model, tmp_path / "d.zarr", overhead=None) as rec:
        model(torch.randn(4, 24)).sum().backward()
        opt.step()
    assert "weights" not in ss.open_run(rec.path).children
    with pytest.raises(ValueError, match="WeightSpectra: every"):
        ss.WeightSpectra(every=0)
    with pytest.raises(ValueError, match="quantiles"):
        ss.WeightSpectra(quantiles=[1.5])
    with pytest.raises(ValueError, match="weights must be an ss.WeightSpectra"):
        ss.watch(opt, model, tmp_path / "e.zarr", weights="yes")
