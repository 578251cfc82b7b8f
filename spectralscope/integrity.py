"""Is a stored run whole, and is its writer alive? What readers say instead of guessing.

- `damaged_metadata`: the first Zarr metadata document (``zarr.json``) that cannot be decoded, named.
- `damaged_rows`: the committed rows of each group that cannot be read back as written: a chunk file that
  is missing (Zarr would hand back its fill value, NaN, as if it had been recorded) or, with
  ``decode=True``, one that cannot be decompressed or decoded.
- `run_status`: ``finished``, ``running``, or ``stopped`` for a run whose writer stopped refreshing its
  ``heartbeat`` (killed, out of power) without marking it finished.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .store import HEARTBEAT_SECONDS, _keys, _read_key, beside_a_writer, committed_rows, open_store


@dataclass(frozen=True)
class Damage:
    """Rows ``start``..``stop`` − 1 of ``group`` (row indices below its ``n_rows``) cannot be read back: ``why``
    names the first file that shows it; ``steps`` are their recorded steps where the step array is intact."""

    group: str
    start: int
    stop: int
    why: str
    steps: tuple[int, int] | None = None

    def describe(self) -> str:
        where = f"steps {self.steps[0]}..{self.steps[1]}" if self.steps else f"rows {self.start}..{self.stop - 1}"
        return f"{self.group} {where} ({self.stop - self.start} rows): {self.why}"


def damaged_metadata(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """``"<key> is damaged (…)"`` for the first ``zarr.json`` under ``path`` that is not a JSON object, else None."""
    keys = _keys(path, storage_options) or []
    for key in [k for k in keys if k == "zarr.json" or k.endswith("/zarr.json")]:
        try:
            doc = json.loads(_read_key(path, key, storage_options))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return f"{key} is damaged ({type(exc).__name__}: {exc})"
        if not isinstance(doc, dict):
            return f"{key} is damaged (a JSON {type(doc).__name__}, not a Zarr metadata object)"
    return None


def _chunk_keys(name: str, arr: zarr.Array, n: int) -> list[tuple[int, str]]:
    """(first row, key) of every chunk of ``arr`` that holds rows below ``n``."""
    chunks, shape = arr.chunks, arr.shape
    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    inner = [range(math.ceil(s / c)) if s else range(1) for s, c in zip(shape[1:], chunks[1:], strict=True)]
    out = []
    for i in range(math.ceil(n / chunks[0]) if shape else 1):
        for rest in itertools.product(*inner):
            out.append((i * chunks[0], f"{name}/{encode((i, *rest))}"))
    return out


def _merge(found: Sequence[Damage]) -> list[Damage]:
    """Overlapping damaged ranges of a group as one, with the first reason (and how many more files show it)."""
    out: list[Damage] = []
    for d in sorted(found, key=lambda d: (d.group, d.start)):
        if out and out[-1].group == d.group and d.start < out[-1].stop:
            last = out[-1]
            out[-1] = Damage(last.group, last.start, max(last.stop, d.stop), last.why)
        else:
            out.append(d)
    return out


def damaged_rows(path: str | Path, storage_options: Mapping[str, Any] | None = None,
                 decode: bool = False) -> list[Damage]:
    """Every range of committed rows (below each group's ``n_rows``) whose data cannot be read back: a chunk file
    missing from the listing, an array shorter than ``n_rows``, or (``decode=True``: each chunk read once) a
    chunk that fails to decompress or decode. Empty for an intact run."""
    root = zarr.open_group(open_store(path, storage_options, read_only=True), mode="r")
    # every chunk is written by runs that say so; before, Zarr skipped all-NaN ones, and only the step array
    # (never all fill) shows a lost file
    every_chunk = (root.attrs.get("spectralscope") or {}).get("chunks") == "all"
    with beside_a_writer():
        # n_rows before the listing: chunks below n_rows were written before it, so they are listed
        groups = [(gname, committed_rows(group), list(group.arrays())) for gname, group in root.groups()]
    keys = set(_keys(path, storage_options) or [])
    found: list[Damage] = []
    for gname, n, arrays in groups:
        for aname, arr in arrays:
            dims = arr.metadata.dimension_names or ()
            if not dims or dims[0] != "step" or n == 0 or not (every_chunk or aname == "step"):
                continue
            if arr.shape[0] < n:
                found.append(Damage(gname, arr.shape[0], n, f"{gname}/{aname} holds {arr.shape[0]} rows of {n}"))
            step_chunk = arr.chunks[0]
            for first, key in _chunk_keys(f"{gname}/{aname}", arr, min(n, arr.shape[0])):
                stop = min(first + step_chunk, n)
                if key not in keys:
                    found.append(Damage(gname, first, stop, f"chunk {key} is missing"))
                elif decode:
                    try:
                        arr[first:stop]
                    except Exception as exc:  # a codec's own error, whatever its type
                        found.append(Damage(gname, first, stop, f"chunk {key} cannot be decoded "
                                                                 f"({type(exc).__name__}: {exc})"))
    merged = _merge(found)
    return [_with_steps(root, d) for d in merged]


def _with_steps(root: zarr.Group, d: Damage) -> Damage:
    try:
        steps = np.asarray(root[d.group]["step"][d.start:d.stop])
    except Exception:  # the step array is itself damaged there
        return d
    if len(steps) == 0 or (steps < 0).any():
        return d
    return Damage(d.group, d.start, d.stop, d.why, (int(steps[0]), int(steps[-1])))


#: A "running" run whose heartbeat is older than this many of its intervals, and at least `STALE_SECONDS`
#: (clocks of the writer's and the reader's hosts differ by seconds), reads as stopped.
STALE_BEATS = 4
STALE_SECONDS = 20.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def run_status(attrs: Mapping[str, Any], now: _dt.datetime | None = None) -> str:
    """``finished`` / ``running`` as the run says, or ``stopped`` when it says ``running`` but its writer is gone:
    its heartbeat is older than `STALE_BEATS` intervals (and `STALE_SECONDS`), or its process no longer exists on
    this host."""
    status = str(attrs.get("status", "unknown"))
    beat = attrs.get("heartbeat")
    if status != "running" or not isinstance(beat, Mapping):
        return status
    try:
        when = _dt.datetime.fromisoformat(str(beat["time"]))
        interval = float(beat.get("interval", HEARTBEAT_SECONDS))
    except (KeyError, TypeError, ValueError):
        return status
    now = now or _dt.datetime.now(_dt.UTC)
    if (now - when).total_seconds() > max(STALE_BEATS * interval, STALE_SECONDS):
        return "stopped"
    if beat.get("host") == socket.gethostname() and isinstance(beat.get("pid"), int) and not _pid_alive(beat["pid"]):
        return "stopped"
    return status


def stopped_note(attrs: Mapping[str, Any]) -> str:
    """Why a run reads as stopped, in words (for ``info`` and the dashboard)."""
    beat = attrs.get("heartbeat") or {}
    return (f"stopped: its writer (pid {beat.get('pid')} on {beat.get('host')}) last beat at {beat.get('time')} and "
            "did not close the run")
