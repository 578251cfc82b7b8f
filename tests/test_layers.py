"""Which layers are watched, how each reads as an (out, in) matrix, and their kinds, on real module types:
tiny Hugging Face models built from configs (GPT-2's Conv1D, Llama, MoE experts), nn.MultiheadAttention,
nn.Embedding. Values are checked against numpy float64 on the realised steps, captured independently."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spectralscope as ss
from spectralscope.layers import check_kinds, layer_kind, select_layers

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import FAMILIES, gpt2, llama  # noqa: E402

# ---- kinds -------------------------------------------------------------------------------------------------
# Real parameter names of block 0 (and outside the blocks) of each family, as built from a tiny config.
EXPECTED_KINDS = {
    "gpt2": {"transformer.wte.weight": "embed", "transformer.wpe.weight": "embed",
             "transformer.h.0.attn.c_attn.weight": "attn_qkv", "transformer.h.0.attn.c_proj.weight": "attn_o",
             "transformer.h.0.mlp.c_fc.weight": "mlp_in", "transformer.h.0.mlp.c_proj.weight": "mlp_out"},
    "llama": {"model.embed_tokens.weight": "embed", "lm_head.weight": "head",
              **{f"model.layers.0.self_attn.{p}_proj.weight": f"attn_{p}" for p in "qkv"},
              "model.layers.0.self_attn.o_proj.weight": "attn_o", "model.layers.0.mlp.gate_proj.weight": "mlp_in",
              "model.layers.0.mlp.up_proj.weight": "mlp_in", "model.layers.0.mlp.down_proj.weight": "mlp_out"},
    "gpt_neox": {"gpt_neox.embed_in.weight": "embed", "lm_head.weight": "head",
                 "gpt_neox.layers.0.attention.query_key_value.weight": "attn_qkv",
                 "gpt_neox.layers.0.attention.dense.weight": "attn_o",
                 "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": "mlp_in",
                 "gpt_neox.layers.0.mlp.dense_4h_to_h.weight": "mlp_out"},
    "bert": {"bert.embeddings.word_embeddings.weight": "embed", "bert.embeddings.position_embeddings.weight": "embed",
             **{f"bert.encoder.layer.0.attention.self.{p}.weight": f"attn_{p[0]}" for p in ("query", "key", "value")},
             "bert.encoder.layer.0.attention.output.dense.weight": "attn_o",
             "bert.encoder.layer.0.intermediate.dense.weight": "mlp_in",
             "bert.encoder.layer.0.output.dense.weight": "mlp_out"},
    "roberta": {"roberta.encoder.layer.1.attention.output.dense.weight": "attn_o",
                "roberta.encoder.layer.1.intermediate.dense.weight": "mlp_in",
                "roberta.encoder.layer.1.output.dense.weight": "mlp_out"},
    "t5": {"shared.weight": "embed",
           **{f"encoder.block.0.layer.0.SelfAttention.{p}.weight": f"attn_{p}" for p in "qkv"},
           "encoder.block.0.layer.0.SelfAttention.o.weight": "attn_o",
           "decoder.block.0.layer.1.EncDecAttention.q.weight": "attn_q",
           "decoder.block.0.layer.1.EncDecAttention.o.weight": "attn_o",
           "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": "mlp_in",
           "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": "mlp_in",
           "encoder.block.0.layer.1.DenseReluDense.wo.weight": "mlp_out"},
    "falcon": {"transformer.word_embeddings.weight": "embed",
               "transformer.h.0.self_attention.query_key_value.weight": "attn_qkv",
               "transformer.h.0.self_attention.dense.weight": "attn_o",
               "transformer.h.0.mlp.dense_h_to_4h.weight": "mlp_in", "transformer.h.0.mlp.dense_4h_to_h.weight": "mlp_out"},
    "phi": {"model.layers.0.self_attn.q_proj.weight": "attn_q", "model.layers.0.self_attn.dense.weight": "attn_o",
            "model.layers.0.mlp.fc1.weight": "mlp_in", "model.layers.0.mlp.fc2.weight": "mlp_out"},
    "phi3": {"model.layers.0.self_attn.qkv_proj.weight": "attn_qkv", "model.layers.0.self_attn.o_proj.weight": "attn_o",
             "model.layers.0.mlp.gate_up_proj.weight": "mlp_in", "model.layers.0.mlp.down_proj.weight": "mlp_out"},
    "mixtral": {"model.layers.0.mlp.gate.weight": "router", "model.layers.0.mlp.experts.gate_up_proj[0]": "mlp_in",
                "model.layers.0.mlp.experts.gate_up_proj[2]": "mlp_in",
                "model.layers.0.mlp.experts.down_proj[1]": "mlp_out", "model.layers.0.self_attn.o_proj.weight": "attn_o"},
    "qwen2_moe": {"model.layers.0.mlp.gate.weight": "router", "model.layers.0.mlp.shared_expert_gate.weight": "router",
                  "model.layers.0.mlp.shared_expert.gate_proj.weight": "mlp_in",
                  "model.layers.0.mlp.shared_expert.down_proj.weight": "mlp_out",
                  "model.layers.0.mlp.experts.down_proj[1]": "mlp_out"},
}
#: Layers of these models that are none of the kinds, on purpose (a transform before a tied head).
OTHER = {"cls.predictions.transform.dense.weight", "lm_head.dense.weight"}


@pytest.mark.parametrize("family", sorted(EXPECTED_KINDS))
def test_kinds_of_the_common_families(family):
    model = FAMILIES[family]()
    kinds = {lay.name: lay.kind for lay in select_layers(torch.optim.SGD(model.parameters(), lr=0.1), model)}
    for name, kind in EXPECTED_KINDS[family].items():
        assert kinds.get(name) == kind, (name, kinds.get(name))
    assert {n for n, k in kinds.items() if k == "other"} <= OTHER


@pytest.mark.parametrize(("name", "kind"), [
    # names of versions and families whose tiny models are not built above
    ("gpt_neox.embed_out.weight", "head"),
    ("model.layers.3.block_sparse_moe.gate.weight", "router"),
    ("model.layers.3.block_sparse_moe.experts.0.w1.weight", "mlp_in"),
    ("model.layers.3.block_sparse_moe.experts.0.w2.weight", "mlp_out"),
    ("model.layers.3.block_sparse_moe.experts.0.w3.weight", "mlp_in"),
    ("encoder.block.0.layer.1.mlp.router.classifier.weight", "router"),
    ("model.layers.0.mlp.router.weight", "router"),
    ("layers.0.attention.wo.weight", "attn_o"),
    ("layers.0.feed_forward.w2.weight", "mlp_out"),
    ("blocks.0.attn.in_proj_weight[k]", "attn_k"),
])
def test_layer_kind_of_more_names(name, kind):
    assert layer_kind(name) == kind


def test_kinds_override_the_name_rules_everywhere(tmp_path):
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ss.watch(opt, model, tmp_path / "r.zarr", kinds={r"\.up_proj": "other", r"down_proj": "mlp_in"},
                  background=False) as rec:
        x = torch.randint(3, 64, (2, 8))
        model(x, labels=x).loss.backward()
        opt.step()
    tree = ss.open_run(rec.path)
    for group, unit in (("optimizer", "layer"), ("activations", "module")):
        ds = tree[group].dataset
        kinds = dict(zip(ds[unit].values, ds["kind"].values, strict=True))
        suffix = ".weight" if unit == "layer" else ""
        assert kinds[f"model.layers.1.mlp.up_proj{suffix}"] == "other"
        assert kinds[f"model.layers.0.mlp.down_proj{suffix}"] == "mlp_in"
        assert kinds[f"model.layers.0.mlp.gate_proj{suffix}"] == "mlp_in"
    with pytest.raises(ValueError, match=r"kinds\['x'\] must be one of attn_q, .*, got 'mlp'"):
        check_kinds({"x": "mlp"})
    with pytest.raises(ValueError, match=r"kinds has an invalid regex '\('"):
        check_kinds({"(": "mlp_in"})


# ---- orientation: (out, in) whatever the module stores --------------------------------------------------------
def _train(model, opt, path, steps, batch, **kw):
    """Train ``steps`` recorded steps; the realised ΔW of every parameter at each step, captured here."""
    deltas = []
    with ss.watch(opt, model, path, every=1, **kw) as rec:
        for i in range(steps):
            x = batch(i)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            deltas.append({n: (p.detach().double() - before[n].double()).numpy() for n, p in model.named_parameters()})
            rec.log(loss=loss)
    return rec, deltas


def _lm_loss(model, batch):
    return model(batch, labels=batch).loss


def _np_neuron_cv(dw: np.ndarray) -> float:
    rho = np.linalg.norm(dw, axis=1)  # rows of the (out, in) matrix: the output neurons
    return float(rho.std() / rho.mean())


def test_gpt2_conv1d_is_read_as_out_by_in(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n]
    opt = torch.optim.Muon(hidden, lr=0.02)
    g = torch.Generator().manual_seed(1)
    acts: dict[str, list[np.ndarray]] = {}
    conv = model.transformer.h[0].attn.c_attn
    conv.register_forward_pre_hook(lambda m, a: acts.setdefault("c_attn", []).append(a[0].detach().double().numpy()))
    probe = torch.randint(3, 64, (2, 16), generator=g)
    rec, deltas = _train(model, opt, tmp_path / "g.zarr", 3, lambda i: torch.randint(3, 64, (4, 16), generator=g),
                         gradients=ss.GradientSpectra(every=1, max_samples=4),
                         sharpness=ss.Sharpness(_lm_loss, probe, every=2, per_layer=True))
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset
    assert list(ds["step"].values) == [0, 1, 2] and rec.errors == {}
    names = list(ds["layer"].values)
    assert names[0] == "transformer.h.0.attn.c_attn.weight"
    # rows/cols are (out, in): Conv1D stores (in, out)
    np.testing.assert_array_equal(ds["rows"].values, [96, 32, 128, 32] * 2)
    np.testing.assert_array_equal(ds["cols"].values, [32, 32, 32, 128] * 2)
    stored = dict(model.named_parameters())
    for step in range(3):
        for j, name in enumerate(names):
            dw = deltas[step][name].T  # Conv1D weight (in, out) → ΔW (out, in)
            assert stored[name].shape == dw.shape[::-1]
            np.testing.assert_allclose(ds["neuron_cv"].values[step, j], _np_neuron_cv(dw), rtol=1e-9)
            rho = np.linalg.norm(dw, axis=1)
            np.testing.assert_allclose(ds["neuron_norm"].values[step, j], np.quantile(rho / rho.mean(), ds["quantile"]),
                                       rtol=1e-9)
            assert not np.isclose(ds["neuron_cv"].values[step, j], _np_neuron_cv(dw.T), rtol=1e-3)  # would be wrong
    # activation spectra on the Conv1D's input (width nx = 32), per-sample gradients through its forward
    act = tree["activations"].dataset
    assert int(act["width"].sel(module="transformer.h.0.attn.c_attn")) == 32
    x = acts["c_attn"][0].reshape(-1, 32)
    lam = np.sort(np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, ddof=1)), 0, None))[::-1]
    np.testing.assert_allclose(act["act_eig"].sel(module="transformer.h.0.attn.c_attn").values[0, :32], lam,
                               rtol=1e-6, atol=1e-9 * lam[0])
    grads = tree["gradients"].dataset
    assert "transformer.h.0.mlp.c_proj.weight" in grads["layer"].values
    assert np.isfinite(grads["grad_sv"].values[:, :, :4]).all()
    assert set(tree.children) == {"optimizer", "activations", "gradients", "sharpness", "scalars", "health"}
    assert np.isfinite(tree["sharpness"]["nds"].values).all() and np.isfinite(tree["sharpness"]["nds_within"]).all()


def test_gpt2_per_sample_gradients_through_conv1d_equal_explicit_ones(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    x = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    # reference: each sample's share of the batch loss (mean over tokens of equal-length samples) on its own
    per_sample = []
    for s in range(4):
        model.zero_grad()
        (model(x[s:s + 1], labels=x[s:s + 1]).loss / 4).backward()
        per_sample.append(model.transformer.h[1].mlp.c_fc.weight.grad.detach().double().reshape(-1).numpy().copy())
    model.zero_grad()
    ref = np.linalg.svd(np.stack(per_sample), compute_uv=False)
    with ss.watch(opt, model, tmp_path / "g.zarr", gradients=ss.GradientSpectra(every=1, max_samples=4),
                  activations=None, background=False) as rec:
        model(x, labels=x).loss.backward()
        opt.step()
    sv = ss.open_run(rec.path)["gradients"]["grad_sv"].sel(layer="transformer.h.1.mlp.c_fc.weight").values[0]
    np.testing.assert_allclose(sv, ref, rtol=1e-4, atol=1e-6 * ref[0])


def test_llama_records_every_group_with_numpy_neuron_cv(tmp_path):
    torch.manual_seed(0)
    model = llama()
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    opt = torch.optim.Muon(hidden, lr=0.02)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(3, 64, (2, 8), generator=g)

    rec, deltas = _train(model, opt, tmp_path / "l.zarr", 2, lambda i: torch.randint(3, 64, (4, 8), generator=g),
                         gradients=ss.GradientSpectra(every=1, max_samples=4),
                         sharpness=ss.Sharpness(_lm_loss, batch, every=1, per_layer=True))
    tree = ss.open_run(rec.path)
    assert set(tree.children) == {"optimizer", "activations", "gradients", "sharpness", "scalars", "health"}
    ds = tree["optimizer"].dataset
    for step in range(2):
        for j, name in enumerate(ds["layer"].values):
            np.testing.assert_allclose(ds["neuron_cv"].values[step, j], _np_neuron_cv(deltas[step][name]), rtol=1e-9)
    for group in ("optimizer", "activations", "gradients", "sharpness"):
        for var, da in tree[group].dataset.data_vars.items():
            assert np.isfinite(da.values).any(), (group, var)
    assert np.isfinite(tree["sharpness"]["nds_within"].values).all()
    assert rec.errors == {}


def test_multihead_attention_in_proj_is_three_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    mha = model[0]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    net = Net()
    opt = torch.optim.Muon([mha.in_proj_weight, mha.out_proj.weight], lr=0.02)
    x = torch.randn(3, 5, 16)

    def loss_fn(m, b):
        return m(b).square().mean()

    before = mha.in_proj_weight.detach().double().clone()
    with ss.watch(opt, net, tmp_path / "m.zarr", every=1, background=False,
                  sharpness=ss.Sharpness(loss_fn, x, every=1, per_layer=True)) as rec:
        loss_fn(net, x).backward()
        opt.step()
    dw = mha.in_proj_weight.detach().double() - before
    ds = ss.open_run(rec.path)["optimizer"].dataset
    assert list(ds["layer"].values) == ["attn.in_proj_weight[q]", "attn.in_proj_weight[k]", "attn.in_proj_weight[v]",
                                        "attn.out_proj.weight"]
    assert list(ds["kind"].values) == ["attn_q", "attn_k", "attn_v", "attn_o"]
    np.testing.assert_array_equal(ds["rows"].values, [16, 16, 16, 16])
    for j in range(3):
        part = dw[16 * j:16 * (j + 1)].numpy()
        np.testing.assert_allclose(ds["neuron_cv"].values[0, j], _np_neuron_cv(part), rtol=1e-9)
        np.testing.assert_allclose(ds["update_sv"].values[0, j, -1], np.linalg.svd(part, compute_uv=False)[0], rtol=1e-9)
    # O = NS_5 of the whole (48, 16) momentum, cut to each block: what Muon applied, read off its step
    # W_after = W_before·(1 − lr·wd) − lr·sqrt(48/16)·O
    lr, wd = 0.02, opt.param_groups[0]["weight_decay"]
    o = ((before * (1 - lr * wd) - mha.in_proj_weight.detach().double()) / (lr * np.sqrt(3))).numpy()
    for j in range(3):
        sv = np.linalg.svd(o[16 * j:16 * (j + 1)], compute_uv=False)
        # float32 weights: O read off them is known to ≈ ε₃₂·|W|/lr ≈ 1e-6
        np.testing.assert_allclose(ds["ns_out_sv"].values[0, j], np.quantile(sv, ds["quantile"]), rtol=1e-4, atol=2e-6)
    whole = np.linalg.svd(o, compute_uv=False)
    assert not np.allclose(ds["ns_out_sv"].values[0, 0], np.quantile(whole, ds["quantile"]), rtol=1e-2)
    within = ss.open_run(rec.path)["sharpness"]["nds_within"].values[0]
    assert np.isfinite(within).all() and len(within) == 4


def test_embedding_is_read_as_dim_by_vocabulary(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = model[0].weight.detach().double().clone()
    with ss.watch(opt, model, tmp_path / "e.zarr", every=1, background=False, activations=None) as rec:
        model(torch.arange(20)).square().mean().backward()
        opt.step()
    ds = ss.open_run(rec.path)["optimizer"].dataset
    assert (int(ds["rows"][0]), int(ds["cols"][0])) == (8, 20)
    dw = (model[0].weight.detach().double() - before).numpy().T  # (dim, vocabulary)
    np.testing.assert_allclose(ds["neuron_cv"].values[0, 0], _np_neuron_cv(dw), rtol=1e-9)


def test_stacked_expert_weights_are_one_layer_per_expert(tmp_path):
    torch.manual_seed(0)
    model = FAMILIES["mixtral"]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(3, 64, (2, 8))
    with ss.watch(opt, model, tmp_path / "x.zarr", every=1, background=False) as rec:
        for _ in range(2):
            before = model.model.layers[0].mlp.experts.down_proj.detach().double().clone()
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    dw = model.model.layers[0].mlp.experts.down_proj.detach().double() - before
    m = opt.state[model.model.layers[0].mlp.experts.down_proj]["exp_avg"].double()
    ds = ss.open_run(rec.path)["optimizer"].dataset
    for e in range(3):
        name = f"model.layers.0.mlp.experts.down_proj[{e}]"
        j = list(ds["layer"].values).index(name)
        assert (int(ds["rows"][j]), int(ds["cols"][j])) == (32, 64)
        np.testing.assert_allclose(ds["neuron_cv"].values[1, j], _np_neuron_cv(dw[e].numpy()), rtol=1e-9)
        sv = np.linalg.svd(m[e].numpy(), compute_uv=False)
        np.testing.assert_allclose(ds["momentum_sv"].values[1, j], np.quantile(sv / np.linalg.norm(sv), ds["quantile"]),
                                   rtol=1e-9, atol=1e-12)
    assert rec.errors == {}


def test_modules_may_name_a_conv1d(tmp_path):
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with ss.watch(opt, model, tmp_path / "c.zarr", background=False,
                  activations=ss.ActivationSpectra(modules=["transformer.h.0.mlp.c_fc"])) as rec:
        x = torch.randint(3, 64, (2, 8))
        model(x, labels=x).loss.backward()
        opt.step()
    assert list(ss.open_run(rec.path)["activations"]["module"].values) == ["transformer.h.0.mlp.c_fc"]
    with pytest.raises(ValueError, match=r"'transformer.ln_f' is a LayerNorm; it takes linear modules"):
        ss.watch(opt, model, tmp_path / "d.zarr", activations=ss.ActivationSpectra(modules=["transformer.ln_f"]))
