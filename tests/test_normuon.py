"""spectralscope.normuon: NorMuon's step against a float64 numpy reference, its neuron balance, and its record."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

import spectralscope as ss
from spectralscope.normuon import NorMuon


def _ns64(m: np.ndarray, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7) -> np.ndarray:
    """The quintic Newton–Schulz iteration in float64 numpy, on the wide orientation."""
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / max(np.linalg.norm(x), eps)
    a, b, c = coefficients
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def _reference(w, grads, lr, mu, beta2, wd, nesterov=True, row_eps=1e-8):
    """NorMuon written out in float64: the weights after each gradient of ``grads``."""
    w = w.astype(np.float64).copy()
    buf, s = np.zeros_like(w), np.zeros((w.shape[0], 1))
    for g in grads:
        buf = mu * buf + (1 - mu) * g
        o = _ns64(g + mu * (buf - g) if nesterov else buf)
        s = beta2 * s + (1 - beta2) * (o ** 2).mean(axis=1, keepdims=True)
        d = o / (np.sqrt(s) + row_eps)
        d *= np.linalg.norm(o) / np.linalg.norm(d)
        w = w * (1 - lr * wd) - lr * np.sqrt(max(1.0, w.shape[0] / w.shape[1])) * d
    return w


@pytest.mark.parametrize("shape,nesterov", [((24, 40), True), ((48, 16), True), ((32, 32), False)])
def test_normuon_steps_as_its_float64_reference(shape, nesterov):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=gen) * 0.1
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    opt = NorMuon([p], lr=0.05, momentum=0.9, beta2=0.9, weight_decay=0.1, nesterov=nesterov)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = _reference(w0.numpy(), [g.numpy() for g in grads], 0.05, 0.9, 0.9, 0.1, nesterov)
    moved = ref - w0.numpy().astype(np.float64)
    err = np.linalg.norm(p.detach().numpy() - ref) / np.linalg.norm(moved)
    assert err < 0.03  # NS runs in bf16 in the optimizer, in float64 here


def test_normuon_balances_the_neurons_muon_leaves_uneven():
    """After one step from rest, s_i = (1 − β2)·mean_j O_ij², so every row of the step has the same norm; Muon's
    rows of a tall matrix do not (their norms are leverage scores)."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(64, 16, generator=gen) * torch.linspace(0.1, 3, 64).unsqueeze(1)

    def row_cv(opt_cls, **kw):
        p = nn.Parameter(torch.zeros(64, 16))
        opt = opt_cls([p], lr=0.1, **kw)
        p.grad = g.clone()
        opt.step()
        rows = np.linalg.norm(p.detach().numpy().astype(np.float64), axis=1)
        return rows.std() / rows.mean()

    assert row_cv(NorMuon) < 1e-3
    assert row_cv(torch.optim.Muon, adjust_lr_fn="original") > 0.1


def test_normuon_rejects_bad_settings_in_one_line():
    p = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="lr must be positive"):
        NorMuon([p], lr=0)
    with pytest.raises(ValueError, match="2-D parameters only"):
        NorMuon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="ns_steps"):
        NorMuon([p], ns_steps=0)


@pytest.mark.parametrize("background", [False, "auto"])
def test_normuon_records_through_its_adapter_and_passes_the_self_check(tmp_path, caplog, background):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32, bias=False), nn.Tanh(), nn.Linear(32, 32, bias=False), nn.Tanh(),
                          nn.Linear(32, 4, bias=False))
    opt = NorMuon([model[0].weight, model[2].weight], lr=0.02)
    x, y = torch.randn(64, 12), torch.randn(64, 4)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "n.zarr", every=1, overhead=None, background=background) as rec:
            for _ in range(5):
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    tree = ss.open_run(rec.path)
    assert tree.attrs["optimizer"][0]["class"] == "spectralscope.normuon.NorMuon"
    ds = tree["optimizer"].dataset
    assert list(ds["layer"].values) == ["0.weight", "2.weight"]
    assert (ds["ns_consistency"].values[1:] >= 0.999).all()
    assert np.isfinite(ds["momentum_sv"].values).all()
    assert "does not reproduce" not in caplog.text and rec.errors == {}
