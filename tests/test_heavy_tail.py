"""spectralscope.heavy_tail: the ESD power-law exponent against WeightWatcher's own fit, on the same matrices."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import weightwatcher as ww  # the dev extra: its own fit is the reference
from torch import nn
from weightwatcher.WW_powerlaw import WWFit

from spectralscope.heavy_tail import MIN_EIGENVALUES, stable_rank, tail_fit, weight_alpha

logging.getLogger("weightwatcher").setLevel(logging.ERROR)


@pytest.mark.parametrize("shape,df", [((100, 200), 2.0), ((256, 128), 3.0), ((300, 300), 5.0), ((64, 512), 1.5)])
def test_tail_fit_is_weightwatchers_on_random_heavy_tailed_matrices(shape, df):
    rng = np.random.default_rng(shape[0] + int(10 * df))
    lam = np.sort(np.linalg.svd(rng.standard_t(df, shape), compute_uv=False) ** 2)
    ref = WWFit(lam)
    alpha, xmin, ks = tail_fit(lam)
    assert alpha == pytest.approx(ref.alpha, rel=1e-12)
    assert xmin == ref.xmin and ks == pytest.approx(ref.D, rel=1e-12)


def _trained() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 96, bias=False), nn.Tanh(), nn.Linear(96, 64, bias=False), nn.Tanh(),
                          nn.Linear(64, 10, bias=False))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 40, generator=gen), torch.randint(0, 10, (512,), generator=gen)
    for _ in range(300):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def test_weight_alpha_is_weightwatchers_analyze_on_trained_and_heavy_tailed_layers():
    model = _trained()
    rng = np.random.default_rng(7)
    heavy = nn.Linear(300, 200, bias=False)
    with torch.no_grad():
        heavy.weight.copy_(torch.as_tensor(rng.standard_t(2.5, (200, 300)) * 0.05))
    model.append(heavy)  # applied to nothing: only its weights are analysed
    details = ww.WeightWatcher(model=model).analyze().set_index("layer_id")
    modules = dict(enumerate(model, start=1))  # WeightWatcher's layer_id counts every module of the Sequential
    compared = 0
    for layer_id, row in details.iterrows():
        w = modules[layer_id].weight.detach().double().numpy()
        ours, why = weight_alpha(np.linalg.svd(w, compute_uv=False))
        if min(w.shape) < MIN_EIGENVALUES:  # the 10×64 head: WeightWatcher's small-sample rule, ours says NaN
            assert np.isnan(ours) and "fewer than" in why
            continue
        assert why is None and ours == pytest.approx(row["alpha"], rel=1e-9), layer_id
        compared += 1
    assert compared == 3


def test_weight_alpha_is_scale_free_and_says_when_there_is_no_tail():
    rng = np.random.default_rng(3)
    sv = np.linalg.svd(rng.standard_t(3, (80, 120)), compute_uv=False)
    assert weight_alpha(10 * sv)[0] == pytest.approx(weight_alpha(sv)[0], rel=1e-12)
    alpha, why = weight_alpha(sv[: MIN_EIGENVALUES - 1])
    assert np.isnan(alpha) and f"fewer than the {MIN_EIGENVALUES}" in why
    alpha, why = weight_alpha(np.zeros(40))
    assert np.isnan(alpha) and "0 eigenvalues" in why


def test_stable_rank_is_frobenius_over_spectral_squared():
    w = np.random.default_rng(4).standard_normal((30, 50))
    ref = np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2
    assert stable_rank(np.linalg.svd(w, compute_uv=False)) == pytest.approx(ref, rel=1e-12)
    assert np.isnan(stable_rank(np.zeros(5)))
