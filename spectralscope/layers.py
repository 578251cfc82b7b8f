"""Which parameters are watched, how each reads as a matrix, and how its name classifies it (SPEC §5, §9).

Every watched layer is a linear map read as W ∈ R^{out×in} (rows = output neurons), whatever the module
stores. `matrix_views` is the one table of how a module's weight maps to (out, in): `nn.Linear` as
stored, transformers' `Conv1D` (GPT-2 and its kin keep (in, out)) transposed, conv kernels as
(out, in·k·k), an embedding table (num, dim) transposed (a token's one-hot in, its vector out),
`nn.MultiheadAttention.in_proj_weight` as three layers ``[q]``, ``[k]``, ``[v]``, and the stacked
(experts, out, in) weights of a mixture of experts as one layer per expert ``[e]``.

`kind` is read off the dotted parameter name (`layer_kind`, the rules in `KIND_RULES`) for the naming
conventions of nanoGPT, HF transformers (Llama/Mistral/Qwen, GPT-2, GPT-NeoX/Pythia, BERT/RoBERTa,
T5, Falcon, Phi, MoE), torchtitan and timm; ``watch(kinds={regex: kind})`` overrides it. `depth` =
block index / (blocks − 1) over the watched parameters that sit in numbered blocks (1.0 when there is a
single block, NaN outside blocks).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .spectra import as_matrix

KINDS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_in", "mlp_out", "embed", "head", "router",
         "other")

#: (kind, pattern): the first pattern found in the lower-cased module path (the name without its trailing
#: ".weight") gives the kind.
KIND_RULES: list[tuple[str, re.Pattern[str]]] = [
    # MoE routers: Mixtral/Qwen-MoE/DeepSeek/OLMoE `mlp.gate` (and the older `block_sparse_moe.gate`),
    # Switch's `router.classifier`, GPT-OSS `router`, Qwen-MoE's `shared_expert_gate`
    ("router", re.compile(r"(^|\.)(router(\.classifier)?|shared_expert_gate|(block_sparse_moe|moe)\.(gate|wg))$")),
    ("attn_qkv", re.compile(r"(qkv|c_attn|query_key_value|wqkv|w_pack)")),
    ("attn_q", re.compile(r"(^|\.)(q_proj|wq|query|q|to_q|c_q)$")),
    ("attn_k", re.compile(r"(^|\.)(k_proj|wk|key|k|to_k|c_k)$")),
    ("attn_v", re.compile(r"(^|\.)(v_proj|wv|value|v|to_v|c_v)$")),
    # T5's feed-forward output is `DenseReluDense.wo`: not an attention output
    ("mlp_out", re.compile(r"densereludense\.wo$")),
    ("attn_o", re.compile(r"(attn|attention).*\.(o_proj|out_proj|c_proj|wo|o|proj|dense|to_out(\.0)?)$")),
    ("attn_o", re.compile(r"(^|\.)(o_proj|out_proj)$")),
    ("mlp_in", re.compile(r"(^|\.)(c_fc|fc1|fc_in|up_proj|gate_proj|w1|w3|w13|gate_up_proj|up|dense_h_to_4h|lin1"
                          r"|wi|wi_0|wi_1|intermediate\.dense|gate)$")),
    ("mlp_out", re.compile(r"(^|\.)(fc2|fc_out|down_proj|w2|down|dense_4h_to_h|lin2)$")),
    ("mlp_out", re.compile(r"(mlp|ffn|feed_forward).*\.(c_proj|proj|dense)$")),
    ("mlp_out", re.compile(r"(^|\.)layers?\.\d+\.output\.dense$")),  # BERT/RoBERTa: after intermediate.dense
    ("head", re.compile(r"(^|\.)embed_out$")),  # GPT-NeoX's output layer
    ("embed", re.compile(r"(embed|wte|wpe|tok_emb|pos_emb|embedding|^shared$|relative_attention_bias$)")),
    ("head", re.compile(r"(lm_head|(^|\.)head|(^|\.)output|classifier|(^|\.)fc|(^|\.)score)$")),
]
_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)(?:\.|$)")
_SPLIT_KINDS = {"q": "attn_q", "k": "attn_k", "v": "attn_v"}


def layer_kind(name: str) -> str:
    """The kind of a parameter from its dotted name (one of `KINDS`; the first of `KIND_RULES` that matches)."""
    base, _, part = name.partition("[")
    path = re.sub(r"\.(weight|bias)$", "", base.lower())
    if path.endswith("in_proj_weight") and part.rstrip("]") in _SPLIT_KINDS:
        return _SPLIT_KINDS[part.rstrip("]")]
    for kind, pat in KIND_RULES:
        if pat.search(path):
            return kind
    return "other"


def block_index(name: str) -> int | None:
    """The index of the numbered block a parameter sits in (``transformer.h.3.attn…`` → 3), else None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class MatrixView:
    """How a stored parameter reads as a layer's (out, in) matrix: ``index`` picks one matrix of a stack
    (an expert), then the tensor is viewed as a matrix in its stored orientation (`as_matrix`: conv kernels
    (out, in·k·k)) — `whole`, what a matrix optimizer orthogonalises — then ``rows`` keeps a block of its
    rows (q, k or v of a fused in-projection) and ``transpose`` turns (in, out) storage around — `part`.
    ``param`` is the name of the parameter viewed. Views never copy."""

    param: str
    index: int | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False

    def whole(self, t: Tensor) -> Tensor:
        return as_matrix(t if self.index is None else t[self.index])

    def part(self, mat: Tensor) -> Tensor:
        if self.rows is not None:
            mat = mat[self.rows[0]:self.rows[1]]
        return mat.T if self.transpose else mat

    def __call__(self, t: Tensor) -> Tensor:
        """The layer's (out, in) matrix of the parameter-shaped tensor ``t``."""
        return self.part(self.whole(t))

    def select(self, t: Tensor) -> Tensor:
        """The entries of the parameter-shaped ``t`` that belong to this layer, in stored orientation."""
        mat = self.whole(t)
        return mat if self.rows is None else mat[self.rows[0]:self.rows[1]]

    @property
    def identity(self) -> bool:
        return self.index is None and self.rows is None and not self.transpose


def _conv1d_class() -> type | None:
    """transformers' `Conv1D`, when transformers is already imported (a model of it could not exist otherwise)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map of its last input dimension whose weight is watched as a layer:
    `nn.Linear` or transformers' `Conv1D` (the modules whose activations and per-sample gradients are taken)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def in_features(module: nn.Module) -> int:
    """The input width of a module `is_linear` accepts."""
    return int(module.in_features if isinstance(module, nn.Linear) else module.nx)


def matrix_views(name: str, param: Tensor, module: nn.Module | None, attr: str) -> list[tuple[str, MatrixView]]:
    """The layers a parameter is recorded as: (layer name, view), from the type of the ``module`` that holds it
    as ``attr`` (None when the model does not hold it: the parameter as stored)."""
    conv1d = _conv1d_class()
    if module is None:
        return [(name, MatrixView(name))]
    if conv1d is not None and isinstance(module, conv1d) and attr == "weight":
        return [(name, MatrixView(name, transpose=True))]
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and attr == "weight":
        return [(name, MatrixView(name, transpose=True))]
    if isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight" and param.ndim == 2:
        e = param.shape[0] // 3
        return [(f"{name}[{p}]", MatrixView(name, rows=(i * e, (i + 1) * e))) for i, p in enumerate("qkv")]
    if param.ndim == 3 and ("experts" in type(module).__name__.lower() or name.rpartition(".")[0].endswith("experts")):
        # stacked expert weights (experts, out, in), applied one expert at a time as F.linear(x, W[e])
        return [(f"{name}[{e}]", MatrixView(name, index=e)) for e in range(param.shape[0])]
    return [(name, MatrixView(name))]


@dataclass(frozen=True)
class Layer:
    """A watched layer: its name, the parameter it reads, how (``view``), and its coordinates in the store."""

    name: str
    param: torch.Tensor
    kind: str
    depth: float
    rows: int
    cols: int
    view: MatrixView
    optimizer: int = 0  # which of the watched optimizers updates it (its index)


def _owners(model: nn.Module | None) -> dict[int, tuple[str, nn.Module, str, bool]]:
    """id(parameter) → (its first name in the model, the module holding it, the attribute name, whether that
    module is a mixture-of-experts router: a class named like one, or a ``gate`` beside ``experts``)."""
    owners: dict[int, tuple[str, nn.Module, str, bool]] = {}
    if model is None:
        return owners
    modules = dict(model.named_modules(remove_duplicate=True))
    for mod_name, module in modules.items():
        parent, _, leaf = mod_name.rpartition(".")
        router = "router" in type(module).__name__.lower() or (
            leaf == "gate" and hasattr(modules.get(parent), "experts"))
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (f"{mod_name}.{attr}" if mod_name else attr, module, attr, router))
    return owners


def check_kinds(kinds: object) -> list[tuple[re.Pattern[str], str]]:
    """``watch(kinds=...)`` as compiled (pattern, kind) pairs; ``ValueError`` naming the bad entry."""
    if kinds is None:
        return []
    if not isinstance(kinds, Mapping):
        raise ValueError(f"watch(): kinds must be a dict {{regex: kind}} or None, got {type(kinds).__name__}")
    out = []
    for pat, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"watch(): kinds[{pat!r}] must be one of {', '.join(KINDS)}, got {kind!r}")
        try:
            out.append((re.compile(pat), kind))
        except (re.error, TypeError) as exc:
            raise ValueError(f"watch(): kinds has an invalid regex {pat!r} ({exc})") from None
    return out


def select_layers(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    model: nn.Module | None,
    layers: str | Callable[[str, torch.Tensor], bool] | None = None,
    kinds: list[tuple[re.Pattern[str], str]] | None = None,
) -> list[Layer]:
    """Every parameter the optimizer (or each of several, in turn) updates with ``ndim >= 2``, in optimizer order,
    named after ``model.named_parameters()`` (``param{i}`` when the model does not hold it), narrowed by
    ``layers`` (a regex searched in the parameter name, or a callable ``(name, param) -> bool``), each read as
    the layers `matrix_views` gives; ``kinds`` (from `check_kinds`) overrides the kind of the layers whose name
    a pattern matches (the first that does). A parameter two optimizers hold is the first's; depth is over all
    of them."""
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    owners = _owners(model)
    if isinstance(layers, str):
        pattern = re.compile(layers)
        keep: Callable[[str, torch.Tensor], bool] = lambda n, p: bool(pattern.search(n))  # noqa: E731
    elif layers is None:
        keep = lambda n, p: True  # noqa: E731
    else:
        keep = layers
    chosen: list[tuple[str, torch.Tensor, MatrixView, bool, int]] = []
    seen: set[int] = set()
    i = 0
    for j, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name, module, attr, router = owners.get(id(p), (f"param{i}", None, "", False))
                i += 1
                if p.ndim >= 2 and keep(name, p):
                    chosen += [(n, p, v, router, j) for n, v in matrix_views(name, p, module, attr)]
    blocks = [b for b in (block_index(n) for n, *_ in chosen) if b is not None]
    top = max(blocks) if blocks else 0
    out = []
    for name, p, view, router, j in chosen:
        b = block_index(name)
        depth = math.nan if b is None else (1.0 if top == 0 else b / top)
        kind = next((k for pat, k in kinds or () if pat.search(name)), None) or (
            "router" if router else layer_kind(name))
        rows, cols = view(torch.empty(p.shape, device="meta")).shape
        out.append(Layer(name, p, kind, depth, int(rows), int(cols), view, j))
    return out


def layer_coords(layers: list[Layer], optimizer_names: Sequence[str] | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """The store coordinates along ``layer``: names, ``kind``, ``depth``, the matrix ``rows`` × ``cols``, and with
    ``optimizer_names`` (one per watched optimizer) the ``optimizer`` that updates each layer."""
    coords = {
        "layer": ("layer", np.array([lay.name for lay in layers])),
        "kind": ("layer", np.array([lay.kind for lay in layers])),
        "depth": ("layer", np.array([lay.depth for lay in layers], dtype=np.float64)),
        "rows": ("layer", np.array([lay.rows for lay in layers], dtype=np.int64)),
        "cols": ("layer", np.array([lay.cols for lay in layers], dtype=np.int64)),
    }
    if optimizer_names is not None:
        coords["optimizer"] = ("layer", np.array([optimizer_names[lay.optimizer] for lay in layers]))
    return coords
