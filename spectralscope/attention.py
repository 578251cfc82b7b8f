"""Attention logits: the per-head statistics of s = scale·q·k over the positions a softmax attends to.

For one call of ``scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)`` with q of shape
(…, H, L, E) and k of shape (…, H_kv, S, E), the logit of query i and key j in head h is

    s_hij = scale · ⟨q_hi, k_hj⟩,   scale = 1/sqrt(E) unless given,

taken over the pairs the softmax sees: not those a boolean mask sets False, not j > i under ``is_causal`` (the
top-left aligned lower triangle torch uses), and not those an additive mask sets to −inf or to at most half its
dtype's most negative value (how HF builds its masks). A finite additive bias (ALiBi, relative positions) is not
added: the statistic is the q·k product that qk-clipping acts on. With ``enable_gqa`` (or H_kv < H) each key head
serves H/H_kv query heads, as torch repeats them.

A cap bounds the cost: at most ``max_queries`` query rows of the call's B·L (evenly spaced over the flattened
batch and positions, all of them when fewer), each against every key of its own batch element; per head that is a
(rows × S) block, i.e. ``max_queries``/(B·L) of the attention's own work. Pure functions on tensors; no hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogitStats:
    """The sufficient statistics of one record's logits of one attention module, per head: ``max``, ``sum`` and
    ``count`` of the attended logits, and ``values`` (H, n) of them with NaN where masked, for the quantile."""

    max: Tensor
    sum: Tensor
    count: Tensor
    values: list[Tensor]

    def merge(self, other: LogitStats) -> LogitStats:
        return LogitStats(torch.maximum(self.max, other.max), self.sum + other.sum, self.count + other.count,
                          self.values + other.values)


def _masked_out(mask: Tensor) -> Tensor:
    """True where a mask excludes a pair: False in a boolean mask; −inf, NaN or ≤ finfo.min/2 in an additive one."""
    if mask.dtype == torch.bool:
        return ~mask
    floor = torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else None
    out = ~torch.isfinite(mask)
    return out | (mask <= floor) if floor is not None else out


def query_rows(n_rows: int, max_queries: int | None) -> Tensor:
    """The indices of the query rows (of n_rows = B·L) that are taken: all, or ``max_queries`` evenly spaced."""
    if max_queries is None or n_rows <= max_queries:
        return torch.arange(n_rows)
    return torch.linspace(0, n_rows - 1, max_queries).round().long().unique()


def logit_stats(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                scale: float | None = None, max_queries: int | None = 256) -> LogitStats:
    """The `LogitStats` of one attention call (module docstring), computed in float32 (float64 for float64
    inputs) on q's device, without gradients."""
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        if q.dim() == 2:
            q, k = q[None], k[None]
        heads, length, dim = q.shape[-3:]
        lead = q.shape[:-3]
        kv_heads, keys = k.shape[-3], k.shape[-2]
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not share {kv_heads} key heads evenly")
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.reshape(-1, heads, length, dim).to(work)
        k = k.reshape(-1, kv_heads, keys, dim).to(work)
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
        batch = q.shape[0]
        s = float(scale) if scale is not None else dim ** -0.5
        masked = None
        if attn_mask is not None:
            m = _masked_out(attn_mask.detach())
            masked = torch.broadcast_to(m, (*lead, heads, length, keys)).reshape(batch, heads, length, keys)
        rows = query_rows(batch * length, max_queries).to(q.device)
        b_of, i_of = rows // length, rows % length
        parts = []
        for b in torch.unique(b_of).tolist():
            pos = i_of[b_of == b]
            logits = torch.einsum("hie,hje->hij", q[b][:, pos], k[b]) * s  # (H, rows, S)
            out = torch.zeros_like(logits, dtype=torch.bool)
            if is_causal:
                out |= torch.arange(keys, device=q.device)[None, None, :] > pos[None, :, None]
            if masked is not None:
                out |= masked[b][:, pos]
            parts.append(logits.masked_fill(out, float("nan")).reshape(heads, -1))
        values = torch.cat(parts, dim=1)
        seen = ~torch.isnan(values)
        return LogitStats(torch.where(seen, values, -torch.inf).amax(dim=1).to(torch.float64),
                          torch.where(seen, values, 0.0).sum(dim=1).to(torch.float64),
                          seen.sum(dim=1).to(torch.float64), [values])


#: torch.quantile's largest input (all heads together); beyond it the pooled values are thinned evenly
QUANTILE_MAX = 1 << 24


def summarise(stats: LogitStats, level: float = 0.99) -> tuple[Tensor, Tensor, Tensor]:
    """(max, mean, quantile ``level``) per head, float64 on the host; NaN for a head with no attended pair."""
    values = torch.cat(stats.values, dim=1)
    room = QUANTILE_MAX // max(1, values.shape[0])
    if values.shape[1] > room:
        values = values[:, torch.linspace(0, values.shape[1] - 1, room, device=values.device).long()]
    count = stats.count
    none = count == 0
    top = torch.where(none, torch.nan, stats.max)
    mean = torch.where(none, torch.nan, stats.sum / count.clamp_min(1))
    high = torch.nanquantile(values.to(torch.float64), level, dim=1)
    return top.cpu(), mean.cpu(), high.cpu()
