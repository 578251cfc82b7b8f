"""A small GPT family for the demo and the benchmarks (nanoGPT-style, pre-norm).

Parameter names classify into the layer kinds of SPEC §5: ``transformer.h.{i}.attn.{q,k,v,o}_proj`` →
attn_q/k/v/o, ``transformer.h.{i}.mlp.c_fc`` / ``c_proj`` → mlp_in / mlp_out, ``transformer.wte`` /
``wpe`` → embed, ``lm_head`` → head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    width: int = 64
    depth: int = 4
    heads: int = 4
    ctx: int = 64
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``depth`` pre-norm blocks, a final norm and an untied head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg.vocab, cfg.width),
            "wpe": nn.Embedding(cfg.ctx, cfg.width),
            "h": nn.ModuleList(Block(cfg) for _ in range(cfg.depth)),
            "ln_f": nn.LayerNorm(cfg.width),
        })
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for token ids (batch, tokens), tokens ≤ ctx."""
        tr = self.transformer
        x = tr["wte"](idx) + tr["wpe"](torch.arange(idx.shape[1], device=idx.device))
        for block in tr["h"]:
            x = block(x)
        return self.lm_head(tr["ln_f"](x))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on a (batch, tokens + 1) array of ids."""
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the blocks: what Muon optimises (embeddings, head and norms go to AdamW)."""
        return [p for n, p in self.named_parameters() if p.ndim == 2 and ".h." in f".{n}"]
