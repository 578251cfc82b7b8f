from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import process_of
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import spectralscope as ss
from spectralscope.hooks.sharpness import SCALARS


class Quadratic(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def theta(self) -> torch.Tensor:
        return torch.cat([self.w.reshape(-1), self.v])


def quad_loss(model: Quadratic, batch) -> torch.Tensor:
    t = model.theta()
    return 0.5 * t @ model.a @ t + model.b @ t


def test_quadratic_loss_exact_curvature_and_prediction(tmp_path):
    torch.manual_seed(0)
    q = torch.randn(17, 17, dtype=torch.float64)
    a = q @ q.T / 17 + torch.eye(17, dtype=torch.float64)
    model = Quadratic(a, torch.randn(17, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    probe = ss.Sharpness(quad_loss, None, every=1, per_layer=True)
    thetas = [model.theta().detach().clone()]
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=None, sharpness=probe):
        for _ in range(3):
            quad_loss(model, None).backward()
            opt.step()
            opt.zero_grad()
            thetas.append(model.theta().detach().clone())
    ds = ss.open_run(tmp_path / "r.zarr")["sharpness"].dataset
    assert list(ds["layer"].values) == ["w"]
    an, bn = a.numpy(), model.b.numpy()
    for t in range(3):
        th, u = thetas[t].numpy(), (thetas[t + 1] - thetas[t]).numpy()
        g = an @ th + bn
        uau = u @ an @ u
        np.testing.assert_allclose(ds["curvature"].values[t], uau, rtol=1e-10)
        np.testing.assert_allclose(ds["grad_dot_update"].values[t], g @ u, rtol=1e-10)
        np.testing.assert_allclose(ds["update_norm_sq"].values[t], u @ u, rtol=1e-12)
        np.testing.assert_allclose(ds["nds"].values[t], uau / (u @ u), rtol=1e-10)
        np.testing.assert_allclose(ds["loss_before"].values[t], 0.5 * th @ an @ th + bn @ th, rtol=1e-12)
        # a quadratic is its own second-order Taylor expansion
        np.testing.assert_allclose(ds["predicted_delta"].values[t], ds["actual_delta"].values[t], rtol=1e-9)
        within = u[:12] @ an[:12, :12] @ u[:12] / (u @ u)
        np.testing.assert_allclose(ds["nds_within"].values[t, 0], within, rtol=1e-10)
        np.testing.assert_allclose(ds["nds_cross"].values[t], uau / (u @ u) - within, rtol=1e-9, atol=1e-14)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_nonlinear_model_against_full_hessian(tmp_path):
    torch.manual_seed(1)
    model = MLP().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=None,
                  sharpness=ss.Sharpness(loss_fn, (x, y), every=1, per_layer=True)):
        loss_fn(model, (x, y)).backward()
        opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return F.mse_loss(functional_call(model, parts, (x,)), y)

    h = torch.autograd.functional.hessian(flat_loss, before).numpy()
    u = (after - before).numpy()
    ds = ss.open_run(tmp_path / "r.zarr")["sharpness"].dataset
    np.testing.assert_allclose(ds["curvature"].values[0], u @ h @ u, rtol=1e-8)
    np.testing.assert_allclose(ds["nds"].values[0], u @ h @ u / (u @ u), rtol=1e-8)
    offsets = np.cumsum([0] + [s.numel() for s in shapes])
    for j, layer in enumerate(ds["layer"].values):
        k = names.index(str(layer))
        sl = slice(offsets[k], offsets[k + 1])
        np.testing.assert_allclose(ds["nds_within"].values[0, j], u[sl] @ h[sl, sl] @ u[sl] / (u @ u), rtol=1e-8)


class Block(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.2)
        self.norm = nn.BatchNorm1d(d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        y = self.drop(self.proj(y))
        return self.norm((x + y).transpose(1, 2)).transpose(1, 2)


def block_loss(model, batch):
    return model(batch).square().mean()


def _train_block(model, steps, probe=None, path=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = ss.watch(opt, model, path, activations=None, sharpness=probe) if probe else None
    torch.manual_seed(3)
    for _ in range(steps):
        block_loss(model, torch.randn(4, 8, 16)).backward()
        opt.step()
        opt.zero_grad()
    if rec:
        rec.close()
    return torch.get_rng_state()


def test_probe_on_attention_block_and_training_continues_bit_for_bit(tmp_path):
    torch.manual_seed(2)
    a = Block()
    b = copy.deepcopy(a)
    probe_batch = torch.randn(4, 8, 16)
    rng_a = _train_block(a, 6)
    rng_b = _train_block(b, 6, ss.Sharpness(block_loss, probe_batch, every=2, per_layer=True), tmp_path / "r.zarr")
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n  # parameters and BatchNorm running statistics
    assert torch.equal(rng_a, rng_b)
    ds = ss.open_run(tmp_path / "r.zarr")["sharpness"].dataset
    assert list(ds["step"].values) == [0, 2, 4]
    for var in ("loss_before", "loss_after", "curvature", "nds", "predicted_delta", "actual_delta", "nds_cross"):
        assert np.isfinite(ds[var].values).all(), var
    assert np.isfinite(ds["nds_within"].values).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_fn"):
        ss.Sharpness(3, None)
    with pytest.raises(ValueError, match="every"):
        ss.Sharpness(block_loss, None, every=0)


def test_other_instruments_do_not_record_the_probe(tmp_path):
    torch.manual_seed(4)
    model = MLP()
    x, y = torch.randn(10, 4), torch.randn(10, 3)

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=ss.ActivationSpectra(every=1),
                  gradients=ss.GradientSpectra(every=1), sharpness=ss.Sharpness(loss_fn, (x, y), every=1)):
        for _ in range(3):
            loss_fn(model, (torch.randn(6, 4), torch.randn(6, 3))).backward()  # 6 samples; the probe uses 10
            opt.step()
            opt.zero_grad()
    tree = ss.open_run(tmp_path / "r.zarr")
    assert (tree["activations"]["act_tokens"].values == 6).all()
    assert (tree["gradients"]["grad_samples"].values == 6).all()
    assert np.isfinite(tree["sharpness"]["nds"].values).all()


def pid_loss(model, batch):
    """A regression loss, noting which process evaluated it (batch: input, target, a file for the pid).
    (Not block_loss: after BatchNorm its mean square is ≈ 1 whatever the model does.)"""
    x, target, where = batch
    with open(where, "a") as f:
        f.write(f"{os.getpid()}\n")
    return (model(x) - target).square().mean()


def halve(module, args, output):
    """A user's hook: it must go with the model to the worker process (spectralscope's own hooks do not)."""
    return output * 0.5


def _probed_run(tmp_path, name, background, loss=pid_loss, hooks=False):
    torch.manual_seed(5)
    model = Block()
    model.proj.register_forward_hook(halve)
    where = tmp_path / f"{name}.pids"
    batch = (torch.randn(4, 8, 16), torch.randn(4, 8, 16), str(where))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = ss.watch(opt, model, tmp_path / f"{name}.zarr", background=background,
                   activations=ss.ActivationSpectra(every=2) if hooks else None,
                   gradients=ss.GradientSpectra(every=2) if hooks else None,
                   sharpness=ss.Sharpness(loss, batch, every=2, per_layer=True))
    if process_of(rec) is not None:
        assert process_of(rec).wait_ready(120)  # every probe goes to the child, none is made while it starts
    torch.manual_seed(3)
    for _ in range(6):
        block_loss(model, torch.randn(4, 8, 16)).backward()
        opt.step()
        opt.zero_grad()
    pid = process_of(rec).proc.pid if process_of(rec) is not None else None
    rec.close()
    pids = [int(p) for p in where.read_text().split()] if where.exists() else []
    return ss.open_run(tmp_path / f"{name}.zarr"), model, pids, pid


def test_the_probe_runs_in_the_worker_process_and_equals_the_inline_probe(tmp_path):
    here, model_here, pids_here, _ = _probed_run(tmp_path, "inline", False)
    there, model_there, pids_there, child = _probed_run(tmp_path, "process", "auto", hooks=True)
    assert set(pids_here) == {os.getpid()}
    # the training process only copied the state: every loss of the probes was evaluated by the child
    assert child is not None and set(pids_there) == {child}
    assert len(pids_there) == len(pids_here) == 3 * 2  # L0 and L(θ_after) at steps 0, 2, 4
    for (n, a), b in zip(model_here.state_dict().items(), model_there.state_dict().values(), strict=True):
        assert torch.equal(a, b), n  # training went on the same (BatchNorm's running statistics too)
    a, b = here["sharpness"].dataset, there["sharpness"].dataset
    assert list(b["step"].values) == [0, 2, 4]
    for var in (*SCALARS, "nds_within"):
        assert np.isfinite(b[var].values).all(), var
        # the child measures with one thread; float32 sums may be ordered otherwise than here
        np.testing.assert_allclose(b[var].values, a[var].values, rtol=1e-5, atol=1e-9, err_msg=var)
    assert (there["activations"]["act_tokens"].values == 32).all()  # its passes were not recorded here


def test_a_probe_the_worker_process_cannot_load_runs_on_the_training_thread(tmp_path):
    def local_loss(model, batch):  # no name to import it by
        return pid_loss(model, batch)

    _, _, pids, child = _probed_run(tmp_path, "local", "auto", loss=local_loss)
    assert child is not None  # the other records still go to the child
    assert set(pids) == {os.getpid()} and len(pids) == 6
