from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectralscope as ss


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        mlp = lambda: nn.ModuleDict({"c_fc": nn.Linear(12, 24), "c_proj": nn.Linear(24, 12)})  # noqa: E731
        self.h = nn.ModuleList(nn.ModuleDict({"mlp": mlp()}) for _ in range(2))

    def forward(self, x):
        for b in self.h:
            x = x + b["mlp"]["c_proj"](torch.relu(b["mlp"]["c_fc"](x)))
        return x


def _capture(model):
    seen: dict[str, list[np.ndarray]] = {}

    def grab(name):
        def hook(mod, args):
            x = args[0].detach().double()
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).numpy())

        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return seen, handles


def _ref_eig(chunks):
    x = np.concatenate(chunks)
    return np.sort(np.clip(np.linalg.eigvalsh(np.cov(x.T, ddof=1)), 0, None))[::-1]


@pytest.mark.parametrize("background", [False, True])  # True: hooks copy, a worker thread sums and decomposes
def test_act_eig_matches_numpy_cov_of_the_layer_inputs(tmp_path, background):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    seen, handles = _capture(model)
    with ss.watch(opt, model, tmp_path / "r.zarr", every=1, activations=ss.ActivationSpectra(every=2),
                  background=background):
        for step in range(4):
            seen.clear()
            for _ in range(2):  # gradient accumulation: both forwards belong to this step
                model(torch.randn(4, 6, 12)).square().mean().backward()  # (batch, tokens, features)
            captured = {k: list(v) for k, v in seen.items()}
            opt.step()
            opt.zero_grad()
            if step == 2:
                at_two = captured
    for h in handles:
        h.remove()
    ds = ss.open_run(tmp_path / "r.zarr")["activations"].dataset
    assert list(ds["step"].values) == [0, 2]
    assert list(ds["module"].values) == ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    assert list(ds["kind"].values) == ["mlp_in", "mlp_out", "mlp_in", "mlp_out"]
    assert list(ds["width"].values) == [12, 24, 12, 24] and ds.sizes["rank"] == 24
    for j, name in enumerate(ds["module"].values):
        ref = _ref_eig(at_two[str(name)])
        got = ds["act_eig"].values[1, j]
        np.testing.assert_allclose(got[: len(ref)], ref, rtol=1e-9, atol=1e-12 * ref[0])
        assert np.isnan(got[len(ref):]).all()  # NaN padding up to the widest module
        assert ds["act_tokens"].values[1, j] == 48
        p = ref / ref.sum()
        assert ds["act_soft_rank"].values[1, j] == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-9)


@pytest.mark.parametrize("background", [False, True])
def test_max_tokens_subsamples_without_touching_the_global_rng(tmp_path, background):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=ss.ActivationSpectra(every=1, max_tokens=30),
                  background=background):
        for _step in range(2):
            x = torch.randn(10, 8, 12)
            model(x).sum().backward()
            state = torch.get_rng_state()
            opt.step()
            assert torch.equal(state, torch.get_rng_state())
            for _ in range(3):  # three passes of 20 tokens at the next step: the budget spans them
                model(torch.randn(2, 10, 12)).sum().backward()
    ds = ss.open_run(tmp_path / "r.zarr")["activations"].dataset
    assert ds.sizes["step"] == 2
    assert (ds["act_tokens"].values == 30).all()
    assert np.isfinite(ds["act_hard_rank"].values).all()


def test_off_and_hooks_removed(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ss.watch(opt, model, tmp_path / "off.zarr", activations=None):
        pass
    assert "activations" not in ss.open_run(tmp_path / "off.zarr").children
    rec = ss.watch(opt, model, tmp_path / "on.zarr")  # on by default
    assert all(len(m._forward_pre_hooks) == 1 for m in model.modules() if isinstance(m, nn.Linear))
    rec.close()
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    with pytest.raises(ValueError, match="every"):
        ss.ActivationSpectra(every=0)
    with pytest.raises(ValueError, match="no module named"):
        ss.watch(opt, model, tmp_path / "bad.zarr", activations=ss.ActivationSpectra(modules=["nope"]))
    with pytest.raises(ValueError, match="is a ModuleList; it takes linear modules"):
        ss.watch(opt, model, tmp_path / "bad2.zarr", gradients=ss.GradientSpectra(modules=["h"]))
    with pytest.raises(ValueError, match="modules must be"):
        ss.ActivationSpectra(modules="h.0")
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())  # nothing left behind on failure


class Attn(nn.Module):
    """q, k and v read one tensor: its statistics are accumulated once and shared."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o_proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


@pytest.mark.parametrize("background", [False, True])
def test_modules_reading_one_tensor_share_its_statistics(tmp_path, background):
    model = Attn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, handles = _capture(model)
    inst = ss.ActivationSpectra(every=1)
    with ss.watch(opt, model, tmp_path / "r.zarr", activations=inst, background=background):
        assert inst.defer == background
        for _ in range(2):
            model(torch.randn(20, 8)).sum().backward()
        opt.step()
    for h in handles:
        h.remove()
    ds = ss.open_run(tmp_path / "r.zarr")["activations"].dataset
    for j, name in enumerate(ds["module"].values):
        np.testing.assert_allclose(ds["act_eig"].values[0, j], _ref_eig(seen[str(name)]), rtol=1e-9, atol=1e-13)
        assert ds["act_tokens"].values[0, j] == 40


def test_an_instrument_can_serve_two_runs_in_turn(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inst = ss.ActivationSpectra(every=1)
    for name, background in (("a.zarr", True), ("b.zarr", False)):
        with ss.watch(opt, model, tmp_path / name, activations=inst, background=background):
            model(torch.randn(5, 12)).sum().backward()
            opt.step()
        ds = ss.open_run(tmp_path / name)["activations"].dataset
        assert ds.sizes["module"] == 4 and (ds["act_tokens"].values == 5).all()
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
