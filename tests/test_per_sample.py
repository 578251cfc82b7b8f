from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import process_of
from torch import nn
from torch.func import functional_call, grad, vmap

import spectralscope as ss
from spectralscope.hooks import gradients as gradients_module
from spectralscope.per_sample import gradient_metrics, per_sample_gram


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 9), nn.Linear(9, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _per_sample_grads(model: nn.Module, x: torch.Tensor, batch: int) -> dict[str, np.ndarray]:
    """Independent reference: vmap over grad of each sample's share of the batch loss (mean over the batch)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xs):
        return functional_call(model, p, (xs.unsqueeze(0),)).square().sum() / batch

    g = vmap(grad(loss_one), in_dims=(None, 0))(params, x)
    return {k: v.reshape(v.shape[0], -1).numpy() for k, v in g.items()}


@pytest.mark.parametrize("shape", [(12, 6), (7, 5, 6)])  # (batch, features) and (batch, tokens, features)
@pytest.mark.parametrize("where", ["inline", "process", "budget"])
def test_grad_sv_matches_explicit_per_sample_gradients(tmp_path, shape, where, monkeypatch):
    # inline: the Gram matrices are formed in the backward hooks; process (the default on the CPU): the hooks
    # copy a and δ and the worker process forms them; budget: copies only up to DEFER_BYTES (here fc2's, the
    # first layer autograd reaches), the rest formed in the hook
    n_tokens = int(np.prod(shape[:-1]))
    if where == "budget":
        monkeypatch.setattr(gradients_module, "DEFER_BYTES", n_tokens * (9 + 4) * 8)
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(*shape, dtype=torch.float64)
    ref = _per_sample_grads(model, x, shape[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inst = ss.GradientSpectra(every=1)
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=None, gradients=inst,
                  background=False if where == "inline" else "auto") as rec:
        assert inst.defer == (where != "inline")
        if process_of(rec) is not None:
            assert process_of(rec).wait_ready(120)
        model(x).square().sum().div(shape[0]).backward()
        kept = [type(k).__name__ for k in inst._grams]  # fc1, fc2
        assert kept == {"inline": ["Tensor", "Tensor"], "process": ["tuple", "tuple"], "budget": ["Tensor", "tuple"]}[where]
        w_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    assert rec.errors == {}
    ds = ss.open_run(tmp_path / "r.zarr")["gradients"].dataset
    assert list(ds["layer"].values) == ["fc1.weight", "fc2.weight"] and ds.sizes["rank"] == 64  # SPEC §5: layer
    for j, name in enumerate(["fc1", "fc2"]):
        rows = ref[f"{name}.weight"]
        # the per-sample gradients sum to the layer's weight gradient
        np.testing.assert_allclose(rows.sum(0), w_grads[f"{name}.weight"].reshape(-1).numpy(), rtol=1e-10, atol=1e-14)
        sv = np.linalg.svd(rows, compute_uv=False)
        got = ds["grad_sv"].values[0, j]
        keep = sv > 1e-7 * sv[0]
        np.testing.assert_allclose(got[: len(sv)][keep], sv[keep], rtol=1e-8)
        assert np.isnan(got[len(sv):]).all() and ds["grad_samples"].values[0, j] == shape[0]
        p = sv**2 / (sv**2).sum()
        assert ds["grad_soft_rank"].values[0, j] == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-8)


def test_blocked_gram_equals_direct_formula(rng):
    a = torch.from_numpy(rng.standard_normal((9, 4, 5)))
    d = torch.from_numpy(rng.standard_normal((9, 4, 3)))
    direct = np.einsum("sti,rui,stj,ruj->sr", d.numpy(), d.numpy(), a.numpy(), a.numpy())
    for max_elements in (1, 50, 1 << 22):  # kernel route: one sample per block … ; per-sample-gradient route
        np.testing.assert_allclose(per_sample_gram(a, d, max_elements).numpy(), direct, rtol=1e-12)
    long_a = torch.from_numpy(rng.standard_normal((5, 40, 3)))  # T² ≫ d_in·d_out: the per-sample route is cheaper
    long_d = torch.from_numpy(rng.standard_normal((5, 40, 2)))
    ref = np.einsum("sti,rui,stj,ruj->sr", long_d.numpy(), long_d.numpy(), long_a.numpy(), long_a.numpy())
    for max_elements in (1, 1 << 22):  # 1: no room for per-sample gradients, so the kernel route
        np.testing.assert_allclose(per_sample_gram(long_a, long_d, max_elements).numpy(), ref, rtol=1e-12)
    bad = per_sample_gram(a, d)
    bad[0, 0] = float("nan")
    assert torch.isnan(gradient_metrics(bad)["grad_sv"]).all()


def test_max_samples_and_gradient_accumulation(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=None, gradients=ss.GradientSpectra(every=2, max_samples=5)):
        for _ in range(3):
            for _ in range(2):  # two micro-batches: the first one is used
                model(torch.randn(8, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
    ds = ss.open_run(tmp_path / "r.zarr")["gradients"].dataset
    assert list(ds["step"].values) == [0, 2] and ds.sizes["rank"] == 5
    assert (ds["grad_samples"].values == 5).all() and np.isfinite(ds["grad_sv"].values).all()


def test_close_removes_the_forward_hooks(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = ss.watch(opt, model, tmp_path / "r.zarr", gradients=True)
    assert all(len(m._forward_hooks) == 1 for m in (model.fc1, model.fc2))
    assert all(len(m._forward_pre_hooks) == 1 for m in (model.fc1, model.fc2))  # activations, on by default
    rec.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
