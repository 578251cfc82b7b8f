"""Token-frequency buckets (HEAD / MID / TAIL) for `ActivationSpectra(buckets=...)`, as pure functions.

`frequency_buckets` ranks the vocabulary by corpus frequency, most frequent first, and cuts the ranking by the
cumulative share of occurrences c_k = Σ_{j≤k} n_j / Σ n:
- **head**: the most frequent tokens up to and including the one at which c_k reaches ``head`` (default 0.5:
  the tokens that make up half of the corpus);
- **tail**: the rarest tokens whose occurrences together are at most ``tail`` of the corpus (default 0.1),
  and every token that never occurs;
- **mid**: the rest.
Ties in frequency are broken by token id, so the buckets are a function of the counts alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

#: Reserved: the bucket of every token, stored first along the ``bucket`` dimension.
ALL = "all"


def frequency_buckets(tokens: Iterable[int] | np.ndarray, vocab: int | None = None, head: float = 0.5,
                      tail: float = 0.1) -> dict[str, list[int]]:
    """{"head", "mid", "tail"} → token ids, from a corpus given as its token ids (``vocab``: the vocabulary
    size, default max id + 1). See the module docstring for the rule."""
    ids = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens).ravel()
    if ids.size == 0:
        raise ValueError("frequency_buckets: the corpus is empty")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        raise ValueError("frequency_buckets: token ids must be non-negative integers")
    if not 0 < head < 1 or not 0 <= tail < 1 or head + tail > 1:
        raise ValueError(f"frequency_buckets: need 0 < head < 1, 0 <= tail < 1, head + tail <= 1; got {head}, {tail}")
    vocab = int(vocab if vocab is not None else ids.max() + 1)
    if ids.max() >= vocab:
        raise ValueError(f"frequency_buckets: token id {int(ids.max())} is outside a vocabulary of {vocab}")
    counts = np.bincount(ids, minlength=vocab).astype(np.float64)
    order = np.lexsort((np.arange(vocab), -counts))  # by count descending, then id
    share = np.cumsum(counts[order]) / counts.sum()
    n_head = int(np.searchsorted(share, head - 1e-12) + 1)  # up to the token at which head is reached
    from_bottom = np.cumsum(counts[order][::-1]) / counts.sum()
    n_tail = int(np.searchsorted(from_bottom, tail + 1e-12, side="right"))
    n_tail = min(n_tail, vocab - n_head)
    return {"head": sorted(order[:n_head].tolist()), "mid": sorted(order[n_head:vocab - n_tail].tolist()),
            "tail": sorted(order[vocab - n_tail:].tolist())}


def check_buckets(buckets: Mapping[str, Iterable[int]], where: str = "ActivationSpectra") -> dict[str, list[int]]:
    """The buckets as {name: sorted ids}, or ValueError in one line: names must be non-empty strings other than
    ``all``, ids non-negative integers, no id in two buckets."""
    if not isinstance(buckets, Mapping) or not buckets:
        raise ValueError(f"{where}: buckets must be a non-empty mapping of bucket name -> token ids")
    out: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for name, ids in buckets.items():
        if not isinstance(name, str) or not name or name == ALL:
            raise ValueError(f"{where}: bucket names must be non-empty strings other than {ALL!r}, got {name!r}")
        arr = np.asarray(list(ids), dtype=np.int64) if not isinstance(ids, np.ndarray) else ids.astype(np.int64)
        if arr.size and arr.min() < 0:
            raise ValueError(f"{where}: bucket {name!r} holds a negative token id")
        for t in arr.tolist():
            if t in owner and owner[t] != name:
                raise ValueError(f"{where}: token {t} is in both buckets {owner[t]!r} and {name!r}")
            owner[t] = name
        out[name] = sorted(set(arr.tolist()))
    return out


def bucket_lookup(buckets: Mapping[str, list[int]]) -> np.ndarray:
    """token id → bucket index (the order of ``buckets``), −1 for a token in none of them."""
    size = 1 + max((max(ids) for ids in buckets.values() if ids), default=-1)
    lookup = np.full(size, -1, dtype=np.int64)
    for j, ids in enumerate(buckets.values()):
        lookup[ids] = j
    return lookup
