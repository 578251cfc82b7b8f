"""One schema: what the writer lays out is what `spectralscope.schema` states; the read side needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import xarray as xr
from torch import nn

import spectralscope as ss
from spectralscope import schema


def test_the_read_side_imports_no_torch():
    code = ("import sys; import spectralscope, spectralscope.store, spectralscope.fit, spectralscope.integrity, "
            "spectralscope.schema, spectralscope.dashboards.data; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]; "
            "print(spectralscope.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ss.__version__


def test_top_level_names_load_on_first_use():
    assert ss.watch.__module__ == "spectralscope.recorder"
    assert ss.DEFAULT_QUANTILES == schema.DEFAULT_QUANTILES
    assert set(ss.__all__) <= set(dir(ss))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ss.nope  # noqa: B018


class Attn(nn.Module):
    heads = 2

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        q, k = (p(x).view(1, -1, 2, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj))
        return x + nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True).transpose(1, 2).reshape(-1, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.attn, self.fc2 = nn.Linear(6, 8), Attn(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.attn(torch.tanh(self.fc1(x))))


def _loss(model, x):
    return model(x).square().mean()


@pytest.mark.parametrize("estimated", [False, True])
def test_a_run_holds_exactly_the_schema(tmp_path, estimated):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    x = torch.randn(4, 6)
    kw = {"exact_max": 4, "sv_method": "slq"} if estimated else {}
    with ss.watch(opt, model, tmp_path / "r.zarr", every=1, background=False,
                  gradients=ss.GradientSpectra(every=1, max_samples=4), weights=ss.WeightSpectra(every=1),
                  attention=ss.AttentionLogits(every=1),
                  sharpness=ss.Sharpness(_loss, x, every=1, per_layer=True), **kw) as rec:
        _loss(model, x).backward()
        opt.step()
        rec.log(loss=1.0)
    for name, group in schema.GROUPS.items():
        ds = xr.open_zarr(tmp_path / "r.zarr", group=name, consolidated=False)
        stored = {v: ds[v].dims for v in ds.data_vars}
        assert stored == {v: d for v, d in group.dims().items() if estimated or not schema.variable(v).optional}, name
    assert list(ss.open_run(tmp_path / "r.zarr")["optimizer"]["quantile"].values) == list(schema.DEFAULT_QUANTILES)


def test_every_family_and_lost_record_name_is_a_stored_variable_or_said():
    for group in schema.GROUPS.values():
        assert group.lost_as in {*group.names(), "optimizer"}
        for v in group.variables:
            assert v.dims[:1] in ((), ("layer",), ("module",)) and schema.group_of(v.name) == group.name
    assert schema.family_of("momentum_sv") == "momentum" and schema.family_of("act_eig") == "activations"
    assert schema.family_of("tensorboard") == "tensorboard"  # not a stored variable: its own family
    assert schema.fit_metrics()["sharpness"] == ["nds_within"]
    assert ("optimizer", "momentum_sv", 0.5) in schema.tensorboard_metrics()
