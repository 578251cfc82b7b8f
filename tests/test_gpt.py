from __future__ import annotations

import numpy as np
import pytest
import torch

import spectralscope as ss
from spectralscope.corpus import CharCorpus, load_corpus, pcfg_text, stdlib_text
from spectralscope.gpt import GPT, GPTConfig


def test_gpt_parameter_names_classify_into_spec_kinds(tmp_path):
    model = GPT(GPTConfig(vocab=30, width=32, depth=3, heads=4, ctx=16))
    muon = torch.optim.Muon(model.hidden_matrices(), lr=0.02)
    with ss.watch(muon, model, tmp_path / "r.zarr", activations=None) as rec:
        kinds = {lay.name: (lay.kind, lay.depth) for lay in rec.layers}
    assert len(kinds) == 3 * 6
    assert kinds["transformer.h.0.attn.q_proj.weight"] == ("attn_q", 0.0)
    assert kinds["transformer.h.1.attn.k_proj.weight"] == ("attn_k", 0.5)
    assert kinds["transformer.h.2.attn.v_proj.weight"] == ("attn_v", 1.0)
    assert kinds["transformer.h.2.attn.o_proj.weight"] == ("attn_o", 1.0)
    assert kinds["transformer.h.0.mlp.c_fc.weight"] == ("mlp_in", 0.0)
    assert kinds["transformer.h.0.mlp.c_proj.weight"] == ("mlp_out", 0.0)
    other = torch.optim.AdamW([p for p in model.parameters() if p.ndim == 2 and all(p is not q for q in
                                                                                     model.hidden_matrices())])
    with ss.watch(other, model, tmp_path / "o.zarr", activations=None) as rec:
        assert {lay.name: lay.kind for lay in rec.layers} == {"transformer.wte.weight": "embed",
                                                              "transformer.wpe.weight": "embed",
                                                              "lm_head.weight": "head"}


def test_gpt_learns_a_corpus():
    torch.manual_seed(0)
    corpus = CharCorpus("abcabcabd" * 200)
    model = GPT(GPTConfig(vocab=corpus.vocab, width=32, depth=2, heads=2, ctx=16))
    muon = torch.optim.Muon(model.hidden_matrices(), lr=0.02)
    rest = torch.optim.AdamW([p for p in model.parameters() if all(p is not q for q in model.hidden_matrices())],
                             lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = model.loss(corpus.batch(16, 16, g))
        first = first if first is not None else loss.item()
        loss.backward()
        muon.step()
        rest.step()
        muon.zero_grad()
        rest.zero_grad()
    assert loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab=10, width=30, heads=4)


def test_corpora():
    text = stdlib_text()
    assert len(text) > 100_000 and "def" in text
    c = load_corpus("text")
    assert c.decode(c.ids[:50]) == text[:50]
    b = c.batch(4, 32, torch.Generator().manual_seed(0))
    assert b.shape == (4, 33) and int(b.max()) < c.vocab
    # the imbalance knob skews the word distribution: the most frequent word's share grows with it
    def top_share(imbalance):
        words = pcfg_text(60_000, imbalance=imbalance, seed=1).replace(".", " ").split()
        _, counts = np.unique(words, return_counts=True)
        return counts.max() / counts.sum()
    assert top_share(0.0) < top_share(1.0) < top_share(2.0)
    assert pcfg_text(1000, seed=3) == pcfg_text(1000, seed=3)
    with pytest.raises(ValueError, match="UTF-8 text file"):
        load_corpus("/no/such/file.txt")
