"""Which parameters are watched, and how a parameter's name classifies it (SPEC §5 coordinates).

`kind` is read off the dotted parameter name with the naming conventions of nanoGPT, HF transformers,
torchtitan and timm; `depth` = block index / (blocks − 1) over the watched parameters that sit in
numbered blocks (1.0 when there is a single block, NaN outside blocks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

KINDS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_in", "mlp_out", "embed", "head", "other")

# First match wins; patterns look at the module path without the trailing ".weight".
_KIND_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("attn_qkv", re.compile(r"(qkv|c_attn|in_proj|query_key_value|wqkv)")),
    ("attn_q", re.compile(r"(^|\.)(q_proj|wq|query|q|to_q|c_q)$")),
    ("attn_k", re.compile(r"(^|\.)(k_proj|wk|key|k|to_k|c_k)$")),
    ("attn_v", re.compile(r"(^|\.)(v_proj|wv|value|v|to_v|c_v)$")),
    ("attn_o", re.compile(r"(attn|attention).*\.(o_proj|out_proj|c_proj|wo|o|proj|dense|to_out(\.0)?)$")),
    ("attn_o", re.compile(r"(^|\.)(o_proj|out_proj|wo)$")),
    ("mlp_in", re.compile(r"(^|\.)(c_fc|fc1|fc_in|up_proj|gate_proj|w1|w3|w13|gate_up_proj|up|gate|dense_h_to_4h|lin1)$")),
    ("mlp_out", re.compile(r"(^|\.)(fc2|fc_out|down_proj|w2|down|dense_4h_to_h|lin2)$")),
    ("mlp_out", re.compile(r"(mlp|ffn|feed_forward).*\.(c_proj|proj|dense)$")),
    ("embed", re.compile(r"(embed|wte|wpe|tok_emb|pos_emb|embedding)")),
    ("head", re.compile(r"(lm_head|(^|\.)head|(^|\.)output|classifier|(^|\.)fc)$")),
]
_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)(?:\.|$)")


def layer_kind(name: str) -> str:
    """The kind of a parameter from its dotted name (one of `KINDS`)."""
    path = re.sub(r"\.(weight|bias)$", "", name.lower())
    for kind, pat in _KIND_PATTERNS:
        if pat.search(path):
            return kind
    return "other"


def block_index(name: str) -> int | None:
    """The index of the numbered block a parameter sits in (``transformer.h.3.attn…`` → 3), else None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Layer:
    """A watched parameter: its name, the tensor, and its coordinates in the store."""

    name: str
    param: torch.Tensor
    kind: str
    depth: float
    rows: int
    cols: int


def select_layers(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None,
    layers: str | Callable[[str, torch.Tensor], bool] | None = None,
) -> list[Layer]:
    """Every parameter the optimizer updates with ``ndim >= 2``, in optimizer order, named after
    ``model.named_parameters()`` (``param{i}`` when the model does not hold it), narrowed by ``layers``
    (a regex searched in the name, or a callable ``(name, param) -> bool``)."""
    names: dict[int, str] = {}
    if model is not None:
        for n, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), n)
    if isinstance(layers, str):
        pattern = re.compile(layers)
        keep: Callable[[str, torch.Tensor], bool] = lambda n, p: bool(pattern.search(n))  # noqa: E731
    elif layers is None:
        keep = lambda n, p: True  # noqa: E731
    else:
        keep = layers
    chosen: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = names.get(id(p), f"param{i}")
            i += 1
            if p.ndim >= 2 and keep(name, p):
                chosen.append((name, p))
    blocks = [b for b in (block_index(n) for n, _ in chosen) if b is not None]
    top = max(blocks) if blocks else 0
    out = []
    for name, p in chosen:
        b = block_index(name)
        depth = math.nan if b is None else (1.0 if top == 0 else b / top)
        out.append(Layer(name, p, layer_kind(name), depth, int(p.shape[0]), int(p[0].numel())))
    return out


def layer_coords(layers: list[Layer]) -> dict[str, tuple[str, np.ndarray]]:
    """The store coordinates along ``layer``: names, ``kind``, ``depth``, and the matrix ``rows`` × ``cols``."""
    return {
        "layer": ("layer", np.array([lay.name for lay in layers])),
        "kind": ("layer", np.array([lay.kind for lay in layers])),
        "depth": ("layer", np.array([lay.depth for lay in layers], dtype=np.float64)),
        "rows": ("layer", np.array([lay.rows for lay in layers], dtype=np.int64)),
        "cols": ("layer", np.array([lay.cols for lay in layers], dtype=np.int64)),
    }
