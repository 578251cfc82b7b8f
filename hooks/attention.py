"""`AttentionLogits`: per attention module and head, the max, mean and 99th percentile of the logits s = scale·q·k
(`spectralscope.attention`), taken from the queries and keys of the ``scaled_dot_product_attention`` calls made
inside each attention module's forward on a recorded step.

How it sees them: a forward pre-hook on each attention module enters a ``TorchFunctionMode`` on a recorded step
and a forward hook (``always_call``) leaves it, so only the ops of that module's own forward pass through Python,
and only then. Every ``torch.nn.functional.scaled_dot_product_attention`` call there is measured and then run as
it was called. That covers HF Llama/Mistral/Qwen/GPT-2 with SDPA attention, nanoGPT and the demo's GPT without
model-specific code. It cannot see eager attention (an explicit softmax(QKᵀ)), ``nn.MultiheadAttention`` with
``need_weights=True`` or its fused fast path, and flash kernels called directly (``flash_attn_func``): a module
that made no SDPA call on a recorded step gets NaN, and the reason is said once.

The attention modules are the parents of the watched q/k/v (or fused qkv) projections (a container such as an
``nn.ModuleDict`` of them is never called, so the module above it that calls them), or those named in
``modules``; the number of heads is read off the module (``num_heads``, ``heads``, ``n_head``, …) or its
``config.num_attention_heads``, or given as ``heads``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from spectralscope import schema
from spectralscope.attention import LogitStats, logit_stats, summarise
from spectralscope.store import GroupSpec

from .modules import Context, check_every, check_modules, module_coords

#: the kinds of the projections whose parent module is an attention
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_qkv")
_HEAD_ATTRIBUTES = ("num_heads", "heads", "n_head", "n_heads", "num_attention_heads", "nhead", "n_heads_q")


def heads_of(module: nn.Module, model: nn.Module | None) -> int | None:
    """The number of query heads of an attention module, from its attributes or config (None if not found)."""
    for holder in (module, getattr(module, "config", None), getattr(model, "config", None)):
        for attr in _HEAD_ATTRIBUTES:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return None


def _parent(layer_name: str) -> str:
    """The module holding a watched weight: ``h.0.attn.q_proj.weight`` → ``h.0.attn``; a split
    ``in_proj_weight[q]`` → its ``nn.MultiheadAttention``."""
    base = re.sub(r"\[.*\]$", "", layer_name)
    parts = base.split(".")
    if parts[-1] in ("weight", "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        parts = parts[:-1] if parts[-1] != "weight" else parts[:-2]
    else:
        parts = parts[:-1]
    return ".".join(parts)


def _called(name: str, named: dict[str, nn.Module]) -> str:
    """``name``, or where it is a container that is never called (``nn.ModuleDict``, ``nn.ModuleList``: no forward
    of its own), the nearest module above it that is."""
    while name and name in named and type(named[name]).forward is nn.Module.forward:
        name = name.rpartition(".")[0]
    return name


def _call(args: tuple, kwargs: dict) -> dict:
    """The arguments of one ``scaled_dot_product_attention`` call, by name."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    return {**dict(zip(names, args, strict=False)), **kwargs}


class _Intercept(TorchFunctionMode):
    def __init__(self, seen) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen(_call(args, kwargs))
        return func(*args, **kwargs)


class AttentionFinisher:
    """Turns a record's per-module `LogitStats` into its row (inline: the values stay on their device until
    here)."""

    portable = False  # a few quantiles: not worth shipping the logits to the worker process

    def __init__(self, names: Sequence[str], heads: int, level: float = 0.99) -> None:
        self.names, self.heads, self.level = list(names), int(heads), float(level)

    def finish(self, taken: list) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        shape = (len(self.names), self.heads)
        out = {v: np.full(shape, np.nan) for v in ("attn_logit_max", "attn_logit_mean", "attn_logit_q99")}
        problems: list[tuple[str, str, str]] = []
        for i, stats in enumerate(taken):
            if stats is None:
                problems.append(("attn_logit_max", self.names[i], "made no scaled_dot_product_attention call on this "
                                 "step (eager attention, or a flash kernel called directly, is not seen)"))
                continue
            try:
                top, mean, high = summarise(stats, self.level)
            except Exception as exc:
                problems.append(("attn_logit_max", self.names[i], f"failed ({type(exc).__name__}: {exc})"))
                continue
            h = min(self.heads, top.numel())
            if top.numel() != self.heads:
                problems.append(("attn_logit_max", self.names[i], f"has {top.numel()} query heads where the group has "
                                 f"{self.heads}: heads {h} and above are NaN" + (" (and its extra heads are not "
                                 "recorded)" if top.numel() > self.heads else "")))
            out["attn_logit_max"][i, :h] = top[:h].numpy()
            out["attn_logit_mean"][i, :h] = mean[:h].numpy()
            out["attn_logit_q99"][i, :h] = high[:h].numpy()
            if not np.isfinite(out["attn_logit_max"][i, :h]).all():
                problems.append(("attn_logit_max", self.names[i], "is not finite (a head attended to nothing, "
                                 "or its logits overflowed)"))
        return out, problems


class AttentionLogits:
    """Record ``attn_logit_max``, ``attn_logit_mean`` and ``attn_logit_q99`` (per attention module and head) of
    the ``scaled_dot_product_attention`` calls of every ``every``-th step's forward (default 50). ``max_queries``
    query rows per call at most (None: all); ``modules``: attention module names (default: the parents of the
    watched q/k/v projections); ``heads``: their number of query heads (default: read off the modules)."""

    group = "attention"

    def __init__(self, every: int = 50, max_queries: int | None = 256, modules: Sequence[str] | None = None,
                 heads: int | None = None):
        check_every("AttentionLogits", every)
        if max_queries is not None and not (isinstance(max_queries, int) and max_queries >= 1):
            raise ValueError(f"AttentionLogits: max_queries must be an int >= 1 or None, got {max_queries!r}")
        if heads is not None and not (isinstance(heads, int) and heads >= 1):
            raise ValueError(f"AttentionLogits: heads must be an int >= 1 or None, got {heads!r}")
        self.every, self.max_queries, self.heads = every, max_queries, heads
        self.modules = check_modules("AttentionLogits", modules)
        self.names: list[str] = []
        self._handles: list = []
        self._stats: list[LogitStats | None] = []
        self._mode: _Intercept | None = None
        self._current: int | None = None
        self._writes = True
        self.paused = False
        self.live = False
        self.defer = False
        self.may_defer = False
        self.finisher = AttentionFinisher([], 1)

    # ---- wiring -------------------------------------------------------------------------------------
    def bind(self, ctx: Context) -> None:
        """Find the attention modules and their head count, and hook each."""
        if ctx.model is None:
            raise ValueError("AttentionLogits needs the model: watch(optimizer, model, ...)")
        named = dict(ctx.model.named_modules())
        if self.modules is not None:
            missing = [m for m in self.modules if m not in named]
            if missing:
                raise ValueError(f"AttentionLogits: no module named {missing[0]!r} in the model")
            names = list(self.modules)
        else:
            names = list(dict.fromkeys(_called(_parent(lay.name), named) for lay in ctx.layers
                                       if lay.kind in _PROJECTIONS))
            names = [n for n in names if n in named]
            if not names:
                raise ValueError("AttentionLogits: no watched q/k/v projection, so no attention module to hook; "
                                 "name them with modules=")
        counts = {n: self.heads or heads_of(named[n], ctx.model) for n in names}
        unknown = [n for n, h in counts.items() if h is None]
        if unknown:
            raise ValueError(f"AttentionLogits: cannot tell how many heads {unknown[0]!r} has; pass heads=")
        self.remove()
        self.names = names
        self.kinds = ["attn"] * len(names)
        self._step, self._ledger, self._writes, self._spend = ctx.step, ctx.ledger, ctx.writes, ctx.spend
        self._stats = [None] * len(names)
        self.n_heads = max(counts.values())
        self._mode = _Intercept(self._seen)
        for i, n in enumerate(names):
            self._handles.append(named[n].register_forward_pre_hook(self._enter(i)))
            self._handles.append(named[n].register_forward_hook(self._leave(i), always_call=True))
        self.finisher = AttentionFinisher(names, self.n_heads)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._exit_mode()

    def spec(self) -> GroupSpec:
        coords = {**module_coords(self.names, kinds=self.kinds),
                  "head": ("head", np.arange(self.n_heads if self.names else 1, dtype=np.int64))}
        return GroupSpec(self.group, coords, schema.ATTENTION.dims())

    # ---- hooks --------------------------------------------------------------------------------------
    def _enter(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self._writes or self.paused or self._current is not None or self._step() % self.every != 0:
                return  # ranks other than 0 write nothing: they do not measure either
            self._current = i
            self._mode.__enter__()

        return hook

    def _leave(self, i: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if self._current == i:
                self._exit_mode()

        return hook

    def _exit_mode(self) -> None:
        if self._current is not None and self._mode is not None:
            self._current = None
            self._mode.__exit__(None, None, None)

    def _seen(self, call: dict) -> None:
        """One SDPA call inside module ``_current``: its statistics, merged into the record's (never raises)."""
        i = self._current
        t = time.perf_counter()
        try:
            stats = logit_stats(call["query"], call["key"], call.get("attn_mask"), bool(call.get("is_causal", False)),
                                call.get("scale"), self.max_queries)
            self._stats[i] = stats if self._stats[i] is None else self._stats[i].merge(stats)
        except Exception as exc:  # never into the forward pass
            self._ledger.failed("attn_logit_max", self.names[i], exc)
        finally:
            self._spend(time.perf_counter() - t)

    def take(self, step: int) -> list | None:
        """After the step: each module's statistics of this step's forward (None where it made no SDPA call);
        None when ``step`` is not recorded or this rank does not write."""
        if step % self.every != 0:
            return None
        taken, self._stats = self._stats, [None] * len(self.names)
        return taken if self._writes else None
