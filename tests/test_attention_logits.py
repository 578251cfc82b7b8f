"""hooks/attention.py: `AttentionLogits` on real models, against the logits formed explicitly from the queries and
keys each attention computed (numpy float64), with what it cannot see said."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hf_models import SMALL

import spectralscope as ss
from spectralscope.gpt import GPT, GPTConfig


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab=32, width=16, depth=2, heads=4, ctx=12))


def _capture(model: GPT, steps: set[int], clock):
    """q and k of each block as its attention computed them (the projections' outputs), on ``steps``."""
    kept: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def hook(block: int, which: str):
        def fn(module, args, out):
            if clock() in steps:
                b, t, d = out.shape
                heads = model.cfg.heads
                kept.setdefault((clock(), block), {})[which] = (
                    out.detach().double().view(b, t, heads, d // heads).transpose(1, 2).numpy())
        return fn

    for i, blk in enumerate(model.transformer["h"]):
        blk.attn.q_proj.register_forward_hook(hook(i, "q"))
        blk.attn.k_proj.register_forward_hook(hook(i, "k"))
    return kept


def _explicit(q: np.ndarray, k: np.ndarray):
    """max, mean, q99 per head of q·kᵀ/sqrt(d) over the causal pairs (float64)."""
    s = np.einsum("bhie,bhje->bhij", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[2]
    s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, np.nan).transpose(1, 0, 2, 3).reshape(q.shape[1], -1)
    return np.nanmax(s, 1), np.nanmean(s, 1), np.nanquantile(s, 0.99, axis=1)


@pytest.mark.parametrize("background", [False, "auto"])
def test_recorded_logits_are_those_of_the_models_own_queries_and_keys(tmp_path, background):
    model = _gpt()
    opt = torch.optim.Muon(model.hidden_matrices(), lr=0.05)
    data = torch.randint(0, 32, (6, 4, 13), generator=torch.Generator().manual_seed(1))
    step = [0]
    kept = _capture(model, {0, 2, 4}, lambda: step[0])
    with ss.watch(opt, model, tmp_path / "r.zarr", every=2, activations=None, background=background, overhead=None,
                  attention=ss.AttentionLogits(every=2, max_queries=None)):
        for s in range(6):
            step[0] = s
            model.loss(data[s]).backward()
            opt.step()
            opt.zero_grad()
    ds = ss.open_run(tmp_path / "r.zarr")["attention"].dataset
    assert ds["step"].values.tolist() == [0, 2, 4]
    assert ds["module"].values.tolist() == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert ds.sizes["head"] == 4
    for j, s in enumerate((0, 2, 4)):
        for m in range(2):
            top, mean, high = _explicit(kept[(s, m)]["q"], kept[(s, m)]["k"])
            np.testing.assert_allclose(ds["attn_logit_max"].values[j, m], top, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ds["attn_logit_mean"].values[j, m], mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ds["attn_logit_q99"].values[j, m], high, rtol=1e-5, atol=1e-6)


def test_training_is_unchanged_and_no_mode_is_left_behind(tmp_path):
    data = torch.randint(0, 32, (5, 4, 13), generator=torch.Generator().manual_seed(2))

    def train(watched: bool) -> list[float]:
        model = _gpt()
        opt = torch.optim.Muon(model.hidden_matrices(), lr=0.05)
        losses = []
        rec = ss.watch(opt, model, tmp_path / f"{watched}.zarr", every=1, activations=None, background=False,
                       attention=ss.AttentionLogits(every=1)) if watched else None
        for s in range(5):
            loss = model.loss(data[s])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            assert torch._C._len_torch_function_stack() == 0  # the mode covers the attention modules' forwards only
        if rec is not None:
            # a forward that raises inside an attention module, while the mode is entered
            model.transformer["h"][0].attn.q_proj.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyError()))
            with pytest.raises(KeyError):
                model(torch.randint(0, 32, (2, 8)))
            assert torch._C._len_torch_function_stack() == 0
            rec.close()
        return losses

    assert train(True) == train(False)


def test_hf_llama_and_gpt2_are_seen_through_sdpa_with_their_masks(tmp_path):
    import transformers as T
    from hf_models import gpt2

    llama = T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1))  # grouped-query attention
    for name, model in (("llama", llama), ("gpt2", gpt2())):
        opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
        ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, :3] = 0  # left padding: a boolean mask reaches SDPA
        with ss.watch(opt, model, tmp_path / f"{name}.zarr", every=1, activations=None, background=False,
                      attention=ss.AttentionLogits(every=1)) as rec:
            model(ids, attention_mask=mask, labels=ids).loss.backward()
            opt.step()
        ds = ss.open_run(tmp_path / f"{name}.zarr")["attention"].dataset
        assert ds.sizes["module"] == 2 and ds.sizes["head"] == 2, name
        top = ds["attn_logit_max"].values
        assert np.isfinite(top).all() and (ds["attn_logit_q99"].values <= top + 1e-12).all(), name
        assert (ds["attn_logit_mean"].values <= top).all() and not rec.errors, name


def test_eager_attention_is_not_seen_and_says_so(tmp_path, caplog):
    import transformers as T

    model = T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1, attn_implementation="eager"))
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    ids = torch.randint(3, 64, (2, 8))
    with caplog.at_level(logging.WARNING, "spectralscope"):
        with ss.watch(opt, model, tmp_path / "eager.zarr", every=1, activations=None, background=False,
                      attention=ss.AttentionLogits(every=1)) as rec:
            model(ids, labels=ids).loss.backward()
            opt.step()
    assert np.isnan(ss.open_run(tmp_path / "eager.zarr")["attention"]["attn_logit_max"].values).all()
    assert "made no scaled_dot_product_attention call" in caplog.text
    assert sum(rec.errors["attn_logit_max"].values()) == 2


def test_bad_arguments_and_unknown_heads_are_one_line_errors():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return x

    model = torch.nn.Sequential(Attn())
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    with pytest.raises(ValueError, match="cannot tell how many heads '0' has; pass heads="):
        ss.watch(opt, model, "unused.zarr", attention=ss.AttentionLogits())
    with pytest.raises(ValueError, match="max_queries"):
        ss.AttentionLogits(max_queries=0)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        ss.watch(opt, model, "unused.zarr", attention=ss.AttentionLogits(modules=["nope"], heads=2))
    with pytest.raises(ValueError, match="attention"):
        ss.watch(opt, model, "unused.zarr", attention="yes")


def test_projections_kept_in_a_container_are_seen_from_the_module_that_calls_them(tmp_path):
    class Block(torch.nn.Module):
        heads = 2

        def __init__(self):
            super().__init__()
            self.attn = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8, bias=False) for n in ("q_proj", "k_proj")})

        def forward(self, x):
            q, k = (self.attn[n](x).view(1, -1, 2, 4).transpose(1, 2) for n in ("q_proj", "k_proj"))
            self.seen = (q.detach().double().numpy(), k.detach().double().numpy())
            return x + torch.nn.functional.scaled_dot_product_attention(q, k, k).transpose(1, 2).reshape(-1, 8)

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block())
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    with ss.watch(opt, model, tmp_path / "c.zarr", every=1, activations=None, background=False,
                  attention=ss.AttentionLogits(every=1, max_queries=None)):
        model(torch.randn(6, 8)).square().mean().backward()
        opt.step()
    ds = ss.open_run(tmp_path / "c.zarr")["attention"].dataset
    assert ds["module"].values.tolist() == ["0"]  # the Block, not its never-called ModuleDict
    q, k = model[0].seen
    s = (np.einsum("bhie,bhje->hij", q, k) / 2.0).reshape(2, -1)  # no mask; scale 1/sqrt(4)
    np.testing.assert_allclose(ds["attn_logit_max"].values[0, 0], s.max(1), rtol=1e-5)
    np.testing.assert_allclose(ds["attn_logit_q99"].values[0, 0], np.quantile(s, 0.99, axis=1), rtol=1e-5)
