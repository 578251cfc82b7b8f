"""The run store: one Zarr v3 group per run, written by a background thread (SPEC §5).

Commit protocol. Rows are buffered in memory; the writer thread writes them when they complete a chunk
of the step axis (``chunk_steps`` ≥ 256 rows) and every ``flush_seconds`` (the partial tail chunk), then
sets the group's ``n_rows`` attribute — after the data. Zarr writes every chunk and metadata document
to a temporary file and renames it into place, so a reader sees each file old or new, never half
written; reading ``n_rows`` first and then only rows below it therefore never shows a torn row, and a
process killed at any instant leaves every committed row intact. Arrays are allocated ahead of the
data along ``step`` and trimmed to ``n_rows`` on close, so a finished run opens with plain
``xarray.open_zarr(path, group=...)``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.storage

from . import __version__
from .schema import SCHEMA

log = logging.getLogger("spectralscope")

#: Zarr skips (and deletes) chunks that hold only the fill value by default; a run writes every chunk.
WRITE_CONFIG = {"write_empty_chunks": True}
#: Arrays start with room for this many chunks of steps (missing chunks cost nothing on disk) and
#: double when full, so resizes — the one multi-file change — are rare.
INITIAL_CHUNKS = 16
#: The writer keeps a copy of the chunk being filled for every array whose chunk is at most this big, so a
#: commit writes whole chunks: Zarr writes part of a chunk by reading, decompressing and merging the old
#: one first, a third of what an array costs per commit.
TAIL_BYTES = 4 << 20


#: A live writer refreshes the run's heartbeat at least this often (s); more often with a shorter flush interval.
HEARTBEAT_SECONDS = 10.0


def heartbeat(interval: float) -> dict[str, Any]:
    """The ``heartbeat`` root attribute (SPEC §9): when, where and by which process the run was last known alive,
    and how often the writer refreshes it (readers call a ``running`` run whose beat is several intervals old
    stopped: `integrity.run_status`)."""
    return {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"), "host": socket.gethostname(),
            "pid": os.getpid(), "interval": float(interval)}


def unit_dim(dims) -> str | None:
    """The per-matrix axis among ``dims``: ``layer`` (optimizer, gradients, sharpness) or ``module``
    (activations); None for a group without one (scalars)."""
    return next((d for d in ("layer", "module") if d in dims), None)


@dataclass
class GroupSpec:
    """Layout of one sub-group: its non-step coordinates and its variables' dimensions.

    ``coords`` maps a coordinate name to (dimension, values); the dimension coordinates (``layer``,
    ``quantile``, ...) have the dimension's own name. ``variables`` maps a variable name to its dims,
    the first of which is always ``step``. With ``dynamic=True`` variables unknown in advance
    (``rec.log`` scalars) are added, as (step,) float64, when first appended.
    """

    name: str
    coords: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    variables: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dynamic: bool = False
    strings: tuple[str, ...] = ()  # variables stored as (variable-length UTF-8) strings, "" where missing

    def axes(self) -> tuple[list[str], list[float]]:
        """The names along the group's ``layer`` (or ``module``) axis and its quantile levels (empty if none)."""
        unit = unit_dim(self.coords)
        names = [str(v) for v in self.coords[unit][1]] if unit else []
        levels = [float(q) for q in self.coords["quantile"][1]] if "quantile" in self.coords else []
        return names, levels

    def shape(self, var: str) -> tuple[int, ...]:
        sizes = {dim: len(vals) for name, (dim, vals) in self.coords.items() if name == dim}
        return tuple(sizes[d] for d in self.variables[var][1:])


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def open_store(path: str | Path, storage_options: Mapping[str, Any] | None = None, read_only: bool = False):
    """A Zarr store for a local directory or an fsspec URL (``s3://bucket/run.zarr``)."""
    if is_url(path):
        return zarr.storage.FsspecStore.from_url(
            str(path), storage_options=dict(storage_options or {}), read_only=read_only
        )
    return zarr.storage.LocalStore(str(path), read_only=read_only)


def expand_runs(pattern: str | Path, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The run paths a glob names (``runs/*.zarr``, ``s3://bucket/sweep/*.zarr``), sorted; a pattern without
    wildcards is returned as it is. URLs are listed through fsspec with ``storage_options``."""
    text = str(pattern)
    if not any(ch in text for ch in "*?["):
        return [text]
    if not is_url(text):
        import glob

        return sorted(glob.glob(text))
    import fsspec  # installed with zarr's remote support (the `s3` extra)

    fs, path = fsspec.core.url_to_fs(text, **dict(storage_options or {}))
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))


def _keys(path: str | Path, storage_options: Mapping[str, Any] | None) -> list[str] | None:
    """What lies under ``path``, as '/'-separated keys relative to it: every file, and every empty folder
    with a trailing '/'; [] when there is nothing (or no ``path``), None when ``path`` is itself a file."""
    if not is_url(path):
        p = Path(path)
        if not p.exists():
            return None if p.is_symlink() else []
        if not p.is_dir():
            return None
        return sorted(f.relative_to(p).as_posix() + ("/" if f.is_dir() else "") for f in p.rglob("*")
                      if not f.is_dir() or not any(f.iterdir()))
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    root = root.rstrip("/")
    if fs.isfile(root):
        return None
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(f[len(root):].lstrip("/") for f in found if f.rstrip("/") != root)


def _read_key(path: str | Path, key: str, storage_options: Mapping[str, Any] | None) -> bytes:
    if not is_url(path):
        return (Path(path) / key).read_bytes()
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    return fs.cat_file(f"{root.rstrip('/')}/{key}")


_CHUNK = re.compile(r"^(?P<array>.+)/c(/\d+)*$")
_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def foreign_entry(keys: Sequence[str], root_meta: Mapping[str, Any] | None) -> str | None:
    """The first of ``keys`` that shows a store is not entirely a spectralscope run, or None.

    ``root_meta`` is the decoded root ``zarr.json`` (None when missing or undecodable). A run is a root
    group whose attributes carry ``spectralscope``; its keys are Zarr metadata documents (``zarr.json``) of
    nodes inside that hierarchy, chunks of its arrays (``<array>/c/0/0…``), and Zarr's temporary files of
    either (``zarr.<uuid>.partial``, ``0.<uuid>.partial``: a writer killed mid-write leaves them). Anything else
    is the user's."""
    attrs = root_meta.get("attributes") if isinstance(root_meta, dict) else None
    if not (isinstance(attrs, dict) and root_meta.get("node_type") == "group" and "spectralscope" in attrs):
        return "zarr.json, which is not a spectralscope run's" if "zarr.json" in keys else keys[0]
    nodes = {k.removesuffix("zarr.json").rstrip("/") for k in keys if k == "zarr.json" or k.endswith("/zarr.json")}
    for key in keys:
        name = _TEMPORARY.sub("", key)  # Zarr writes X as X.stem + ".<uuid hex>.partial", then renames it
        if name != key and name.rpartition("/")[2] == "zarr":
            name += ".json"
        parent, _, base = name.rpartition("/")
        if base == "zarr.json" and (parent == "" or parent.rpartition("/")[0] in nodes):
            continue
        chunk = _CHUNK.match(name)
        if chunk and chunk["array"] in nodes:
            continue
        return key
    return None


def _exists(path: str | Path, storage_options: Mapping[str, Any] | None) -> bool:
    keys = _keys(path, storage_options)
    return keys is None or len(keys) > 0


def check_overwritable(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
    """``FileExistsError`` naming ``path`` and what is there, unless it is empty, missing, or a spectralscope
    run and nothing else (`foreign_entry`): ``overwrite=True`` never removes anything of the user's."""
    keys = _keys(path, storage_options)
    if keys is None:
        raise FileExistsError(f"{path} is a file, not a spectralscope run: overwrite=True replaces runs only")
    if not keys:
        return
    meta = None
    if "zarr.json" in keys:
        try:
            meta = json.loads(_read_key(path, "zarr.json", storage_options))
        except (OSError, ValueError):  # unreadable or not JSON: not provably a run
            meta = None
    foreign = foreign_entry(keys, meta)
    if foreign is not None:
        raise FileExistsError(f"{path} holds what is not a spectralscope run ({foreign}): overwrite=True replaces "
                              "runs only, and nothing was removed")


def _plain_list(values: Any) -> list:
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(values).tolist()]


def layout_change(spec: GroupSpec, stored: Mapping[str, np.ndarray]) -> str | None:
    """How a group laid out as ``spec`` differs from the one in the store (``stored``: its coordinate arrays),
    in words, or None when a resumed run can append to it: the same layers or modules, each of the same shape,
    measured the same way, and the same quantile levels."""
    unit = unit_dim(spec.coords)
    if unit is not None and unit in stored:
        old, new = _plain_list(stored[unit]), _plain_list(spec.coords[unit][1])
        if old != new:
            gone, added = [n for n in old if n not in new], [n for n in new if n not in old]
            what = "; ".join(filter(None, [f"{len(added)} not recorded before ({', '.join(map(str, added[:3]))}"
                                           f"{', …' if len(added) > 3 else ''})" if added else "",
                                           f"{len(gone)} no longer watched ({', '.join(map(str, gone[:3]))}"
                                           f"{', …' if len(gone) > 3 else ''})" if gone else ""]))
            return f"its {spec.name} {unit}s differ from the watched ones: {what or 'the same names in another order'}"
        if "rows" in stored and "cols" in stored and "rows" in spec.coords and "cols" in spec.coords:
            shapes = zip(new, _plain_list(stored["rows"]), _plain_list(stored["cols"]),
                         _plain_list(spec.coords["rows"][1]), _plain_list(spec.coords["cols"][1]), strict=True)
            for name, r0, c0, r1, c1 in shapes:
                if (r0, c0) != (r1, c1):
                    return f"its {spec.name} {unit} {name} was {r0}×{c0}, the watched one is {r1}×{c1}"
        for name in ("width", "sv_method"):
            if name in stored and name in spec.coords:
                for n, a, b in zip(new, _plain_list(stored[name]), _plain_list(spec.coords[name][1]), strict=True):
                    if a != b:
                        return f"its {spec.name} {unit} {n} has {name} {a}, the watched one {b}"
    for name in ("quantile", "rank"):
        if name in stored and name in spec.coords:
            old, new = _plain_list(stored[name]), _plain_list(spec.coords[name][1])
            if old != new:
                return f"its {spec.name} {name} levels are {old[:12]}, the watched ones {new[:12]}"
    return None


class _GroupState:
    def __init__(self, spec: GroupSpec, group: zarr.Group, n_rows: int, capacity: int):
        self.spec = spec
        self.group = group
        self.n = n_rows
        self.capacity = capacity
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self._arrays: dict[str, zarr.Array] = {}
        self._tails: dict[str, tuple[int, np.ndarray]] = {}  # array → (chunk index, that chunk's rows)

    def array(self, name: str) -> zarr.Array:
        """The group's array ``name``, opened once: ``group[name]`` re-reads its metadata document each time
        (a good part of a commit's cost); a cached handle sees its own resizes."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name].with_config(WRITE_CONFIG)
        return arr

    def write(self, name: str, start: int, block: np.ndarray, chunk: int) -> None:
        """arr[start : start + len(block)] = block, as whole chunks where the chunk fits in `TAIL_BYTES`: the
        rows before ``start`` in its chunk come from the kept copy (read from the store once, on resume)."""
        arr = self.array(name)
        stop = start + len(block)
        if chunk * block[:1].nbytes > TAIL_BYTES:
            arr[start:stop] = block
            return
        for c in range(start // chunk, (stop - 1) // chunk + 1):
            c0 = c * chunk
            lo, hi = max(start, c0), min(stop, c0 + chunk)
            kept = self._tails.get(name)
            if kept is None or kept[0] != c:
                buf = np.full((chunk, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
                if lo > c0:
                    buf[: lo - c0] = arr[c0:lo]
                kept = self._tails[name] = (c, buf)
            buf = kept[1]
            buf[lo - c0 : hi - c0] = block[lo - start : hi - start]
            end = min(c0 + chunk, arr.shape[0])
            arr[c0:end] = buf[: end - c0]


def _known_variables(spec: GroupSpec, g: Any) -> None:
    """A dynamic group (``scalars``) reopened: register the arrays already in the store as its variables."""
    if spec.dynamic:
        for name in g.array_keys():
            if name != "step" and name not in spec.coords and name not in spec.variables:
                spec.variables[name] = ("step",)


class RunWriter:
    """Owns a run's Zarr group and the thread that commits rows to it.

    ``append`` and ``update_attrs`` only enqueue and return at once; all I/O happens on the writer
    thread. Errors while writing are logged once and retried at the next flush, never raised to the
    caller.
    """

    def __init__(
        self,
        path: str | Path,
        groups: Sequence[GroupSpec],
        attrs: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        flush_seconds: float = 5.0,
        chunk_steps: int = 256,
        initial_chunks: int = INITIAL_CHUNKS,
        storage_options: Mapping[str, Any] | None = None,
        must_match: Sequence[str] = (),
    ):
        """``must_match``: root attributes that a resumed run must have kept (``every``), else ``ValueError``."""
        if chunk_steps < 256:
            raise ValueError(f"chunk_steps must be >= 256, got {chunk_steps}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {flush_seconds}")
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other")
        self.path = str(path)
        self.chunk = int(chunk_steps)
        self.initial_chunks = max(1, int(initial_chunks))
        self.flush_seconds = float(flush_seconds)
        store = open_store(path, storage_options)
        exists = _exists(path, storage_options)
        if exists and not (resume or overwrite):
            raise FileExistsError(f"{self.path} already exists; pass resume=True to append or overwrite=True")
        if exists and overwrite:
            check_overwritable(path, storage_options)
        self._groups: dict[str, _GroupState] = {}
        if exists and resume:
            self.root = zarr.open_group(store, mode="r+")
            stored = check_run(self.root, self.path)
            for key in must_match:
                if key in stored and key in attrs and stored[key] != attrs[key]:
                    raise ValueError(f"cannot resume {self.path}: it was recorded with {key}={stored[key]!r}, "
                                     f"not {key}={attrs[key]!r}")
            for spec in groups:
                self._groups[spec.name] = self._resume_group(spec)
            self._attrs = dict(self.root.attrs)
            self._attrs.update({k: v for k, v in attrs.items() if k not in ("created", "errors")})
        else:
            self.root = zarr.open_group(store, mode="w", zarr_format=3)
            self._attrs = {
                # "chunks": every chunk below n_rows is written, all-NaN ones too (`WRITE_CONFIG`), so a reader
                # can tell a lost chunk file from rows that were NaN (`integrity.damaged_rows`)
                "spectralscope": {"schema": SCHEMA, "version": __version__, "chunks": "all"},
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "errors": {},
                **dict(attrs),
            }
            for spec in groups:
                self._groups[spec.name] = self._create_group(spec)
        self._attrs["status"] = "running"
        self.beat_seconds = min(self.flush_seconds, HEARTBEAT_SECONDS)
        self._attrs["heartbeat"] = heartbeat(self.beat_seconds)
        # Last: a root with these attributes is a complete run layout.
        self.root.attrs.put(self._attrs)
        self._stored = dict(self._attrs)  # the root attributes as last written
        self.owns_root = True
        self._start()

    @classmethod
    def attach(
        cls,
        path: str | Path,
        groups: Sequence[GroupSpec],
        *,
        flush_seconds: float = 5.0,
        chunk_steps: int = 256,
        storage_options: Mapping[str, Any] | None = None,
    ) -> RunWriter:
        """A writer for ``groups`` of an existing run that another writer laid out and handed over (`release`):
        it appends after each group's committed ``n_rows`` under the same commit protocol, and never writes
        the run's root attributes (its owner does)."""
        self = cls.__new__(cls)
        self.path = str(path)
        self.chunk = int(chunk_steps)
        self.initial_chunks = INITIAL_CHUNKS
        self.flush_seconds = float(flush_seconds)
        self.root = zarr.open_group(open_store(path, storage_options), mode="r+")
        self._groups = {spec.name: self._reopen_group(spec) for spec in groups}
        self._attrs = {}
        self.owns_root = False
        self._start()
        return self

    def _start(self) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._error_logged = False
        self._attrs_dirty = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"spectralscope-writer:{self.path}", daemon=True)
        self._thread.start()

    # ---- layout ---------------------------------------------------------------------------------
    def _create_array(self, group: zarr.Group, name: str, shape, dims, dtype, chunks, fill):
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=dims, overwrite=True,
            config=WRITE_CONFIG,
        )

    def _create_group(self, spec: GroupSpec) -> _GroupState:
        g = self.root.create_group(spec.name)
        for name, (dim, values) in spec.coords.items():
            values = np.asarray(values)
            dtype = str if values.dtype.kind in "US" else values.dtype
            a = self._create_array(g, name, values.shape, (dim,), dtype, values.shape or None, None)
            if values.size:
                a[...] = values
        capacity = self.chunk * self.initial_chunks
        self._create_array(g, "step", (capacity,), ("step",), "int64", (self.chunk,), -1)
        for var in spec.variables:
            self._add_variable(g, spec, var, capacity)
        g.attrs.put({"n_rows": 0})
        return _GroupState(spec, g, 0, capacity)

    def _add_variable(self, g: zarr.Group, spec: GroupSpec, var: str, capacity: int) -> None:
        dims = spec.variables[var]
        inner = spec.shape(var)
        text = var in spec.strings
        a = self._create_array(g, var, (capacity, *inner), dims, str if text else "float64", (self.chunk, *inner),
                               "" if text else np.nan)
        aux = [c for c, (d, _) in spec.coords.items() if c != d and d in dims]
        if aux:
            a.attrs["coordinates"] = " ".join(aux)

    def _resume_group(self, spec: GroupSpec) -> _GroupState:
        if spec.name not in self.root:
            return self._create_group(spec)
        g = self.root[spec.name]
        change = layout_change(spec, {name: np.asarray(g[name][...]) for name in spec.coords if name in g})
        if change is not None:
            raise ValueError(f"cannot resume {self.path}: {change}")
        n = committed_rows(g)
        capacity = g["step"].shape[0]
        for var in spec.variables:
            if var not in g:
                self._add_variable(g, spec, var, capacity)
        _known_variables(spec, g)
        return _GroupState(spec, g, n, capacity)

    def _reopen_group(self, spec: GroupSpec) -> _GroupState:
        """A group another writer has committed to (and may have died resizing): its committed rows and the
        room every array has for sure, so the next growth brings all of them to one length."""
        g = self.root[spec.name]
        n = committed_rows(g)
        _known_variables(spec, g)
        capacity = min(g[name].shape[0] for name in ["step", *spec.variables])
        return _GroupState(spec, g, n, capacity)

    def release(self, names: Sequence[str]) -> dict[str, int]:
        """Commit ``names`` and stop writing them (another writer attaches to them); their committed row
        counts. Waits for the writer thread."""
        done: queue.Queue[dict[str, int]] = queue.Queue()
        self._queue.put(("release", (list(names), done)))
        return done.get()

    def adopt(self, specs: Sequence[GroupSpec]) -> dict[str, int]:
        """Take groups back from a writer that stopped (or died): reopened at their committed ``n_rows``, which
        are returned. Waits for the writer thread."""
        done: queue.Queue[dict[str, int]] = queue.Queue()
        self._queue.put(("adopt", (list(specs), done)))
        counts = done.get()
        if isinstance(counts, Exception):
            raise counts
        return counts

    # ---- public, called from the training thread -----------------------------------------------
    def append(self, group: str, step: int, values: Mapping[str, Any]) -> None:
        """Queue one row of ``group`` at ``step``; values are numpy arrays or floats shaped as the spec says."""
        if self._closed:
            return
        self._queue.put(("row", (group, int(step), dict(values))))

    def update_attrs(self, **attrs: Any) -> None:
        """Merge JSON-serialisable root attributes; written with the next flush."""
        self._queue.put(("attrs", attrs))

    def flush(self, timeout: float | None = None) -> None:
        """Write everything queued so far and wait until it is committed."""
        done = threading.Event()
        self._queue.put(("flush", done))
        done.wait(timeout)

    def close(self, status: str = "finished") -> None:
        """Commit every queued row, trim the arrays to ``n_rows``, mark the run ``status``, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("close", status))
        self._thread.join()

    def n_rows(self, group: str) -> int:
        st = self._groups[group]
        return st.n + len(st.pending)

    def last_step(self, group: str) -> int | None:
        st = self._groups[group]
        if st.pending:
            return st.pending[-1][0]
        if st.n == 0:
            return None
        return int(st.array("step")[st.n - 1])

    def committed(self, group: str, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` (negative: from the end) of ``group`` already in the store, a resumed run's
        earlier rows: ``step`` and each variable. Empty for a group the store does not hold."""
        st = self._groups.get(group)
        if st is None or st.n == 0:
            return {}
        rows = slice(*slice(start, stop).indices(st.n))
        return {name: np.asarray(st.array(name)[rows]) for name in ("step", *st.spec.variables)}

    # ---- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        deadline = time.monotonic() + self.flush_seconds
        beat = time.monotonic() + self.beat_seconds if self.owns_root else math.inf
        while True:
            try:
                kind, item = self._queue.get(timeout=max(0.0, min(deadline, beat) - time.monotonic()))
            except queue.Empty:  # time to commit, or to beat
                kind, item = None, None
            if kind == "row":
                name, step, values = item
                st = self._groups.get(name)
                if st is None:  # a group handed over to another writer (or never taken back): not ours to write
                    continue
                st.pending.append((step, values))
                if (st.n + len(st.pending)) % self.chunk == 0:
                    self._guard(self._commit, st)
            elif kind == "attrs":
                if any(self._attrs.get(k) != v for k, v in item.items()):
                    self._attrs.update(item)
                    self._attrs_dirty = True
            elif kind == "flush":
                self._commit_all()
                item.set()
            elif kind == "release":
                names, done = item
                counts = {}
                for name in names:
                    st = self._groups.pop(name, None)
                    if st is None:
                        continue
                    if st.pending:
                        self._guard(self._commit, st)
                    counts[name] = st.n  # rows that could not be committed are the caller's to count
                done.put(counts)
            elif kind == "adopt":
                specs, done = item
                try:
                    for spec in specs:
                        self._groups[spec.name] = self._reopen_group(spec)
                    done.put({spec.name: self._groups[spec.name].n for spec in specs})
                except Exception as exc:  # raised to the caller; this thread goes on with the other groups
                    done.put(exc)
            elif kind == "close":
                self._commit_all()
                self._attrs["status"] = item
                self._guard(self._finish)
                return
            if time.monotonic() >= deadline:
                self._commit_all()
                deadline = time.monotonic() + self.flush_seconds
            if time.monotonic() >= beat:  # alive, whether there is anything to commit or not
                self._beat()
                beat = time.monotonic() + self.beat_seconds

    def _guard(self, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # a full disk or a lost bucket must not take training down
            if not self._error_logged:
                log.warning("spectralscope: writing %s failed (%s: %s); will retry", self.path, type(exc).__name__, exc)
                self._error_logged = True
            return False

    def _beat(self) -> None:
        """Refresh the heartbeat in the stored root attributes, and only it: the other attributes (steps,
        errors) go with the rows they describe, at the next commit."""
        self._attrs["heartbeat"] = heartbeat(self.beat_seconds)
        if self._guard(self.root.attrs.put, {**self._stored, "heartbeat": self._attrs["heartbeat"]}):
            self._stored["heartbeat"] = self._attrs["heartbeat"]

    def _commit_all(self) -> None:
        for st in self._groups.values():
            if st.pending:
                self._guard(self._commit, st)
        if self.owns_root and self._attrs_dirty and self._guard(self.root.attrs.put, self._attrs):
            self._attrs_dirty = False  # an idle run (or a remote store) is not rewritten every flush
            self._stored = dict(self._attrs)

    def _commit(self, st: _GroupState) -> None:
        rows = st.pending
        spec = st.spec
        start, stop = st.n, st.n + len(rows)
        if spec.dynamic:
            for _, values in rows:
                for var in values:
                    if var not in spec.variables:
                        spec.variables[var] = ("step",)
                        self._add_variable(st.group, spec, var, st.capacity)
        if stop > st.capacity:
            new = max(2 * st.capacity, math.ceil(stop / self.chunk) * self.chunk)
            for name in ["step", *spec.variables]:
                arr = st.array(name)
                arr.resize((new, *arr.shape[1:]))
            st.capacity = new
        for var in spec.variables:
            shape = spec.shape(var)
            if var in spec.strings:  # (step,) strings: numpy sizes the array to the longest
                block = np.array([str(values.get(var, "")) for _, values in rows], dtype=str)
                st.write(var, start, block, self.chunk)
                continue
            block = np.full((len(rows), *shape), np.nan)
            for i, (_, values) in enumerate(rows):
                if var in values:
                    block[i] = values[var]
            st.write(var, start, block, self.chunk)
        st.write("step", start, np.array([s for s, _ in rows], dtype=np.int64), self.chunk)
        st.group.attrs.put({**dict(st.group.attrs), "n_rows": stop})
        st.n = stop
        st.pending = []

    def _finish(self) -> None:
        for st in self._groups.values():
            for name in ["step", *st.spec.variables]:
                arr = st.array(name)
                if arr.shape[0] != st.n:
                    arr.resize((st.n, *arr.shape[1:]))
            st.capacity = st.n
        if self.owns_root:
            self.root.attrs.put(self._attrs)


# ---- reading ----------------------------------------------------------------------------------------
class DiscardWriter:
    """The writer of a process that does not write (a rank other than 0 under torch.distributed): the same
    calls as `RunWriter`, no store, no thread."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._attrs: dict[str, Any] = {}

    def append(self, group: str, step: int, values: Mapping[str, Any]) -> None:
        pass

    def update_attrs(self, **attrs: Any) -> None:
        pass

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass

    def n_rows(self, group: str) -> int:
        return 0

    def last_step(self, group: str) -> int | None:
        return None

    def committed(self, group: str, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        return {}


def optimizer_entries(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's ``optimizer`` root attribute as a list, one entry per watched optimizer (runs written before
    several optimizers could be watched hold a single dict)."""
    value = attrs.get("optimizer")
    entries = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    return [e for e in entries if isinstance(e, dict)]


def ns_entry(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The entry of the first watched optimizer that applies Newton–Schulz (``ns_steps``), else the first (or {})."""
    entries = optimizer_entries(attrs)
    return next((e for e in entries if e.get("ns_steps")), entries[0] if entries else {})


def check_run(root: zarr.Group, path: str) -> dict[str, Any]:
    """The run's root attributes, or ``ValueError`` naming ``path`` when it is not a spectralscope run
    of a schema this version reads."""
    attrs = dict(root.attrs)
    info = attrs.get("spectralscope")
    if not isinstance(info, dict) or "schema" not in info:
        raise ValueError(f"{path} is a Zarr group but not a spectralscope run (no 'spectralscope' attribute)")
    if info["schema"] != SCHEMA:
        raise ValueError(f"{path} has store schema {info['schema']}; this spectralscope reads schema {SCHEMA}")
    return attrs


def committed_rows(group: zarr.Group) -> int:
    """How many leading rows of ``group`` are committed (its ``n_rows``). The commit protocol's reading rule:
    read this first and then only rows below it — they were complete before it was written. Every reader
    (`open_run`, the dashboard's slices, `integrity`) goes through here."""
    return int(group.attrs.get("n_rows", 0))


def _open_group(store, group: zarr.Group, name: str, chunks: Any = None) -> xr.Dataset:
    """One sub-group cut to its committed rows, read lazily."""
    n = committed_rows(group)
    # Arrays are resized one after another (growth, and the trim on close); a reader in between, or a
    # writer killed in between, leaves them with different step lengths, all ≥ n_rows. Open each
    # length class on its own and join them once cut to n_rows.
    by_length: dict[int, list[str]] = {}
    for key, arr in group.arrays():
        dims = arr.metadata.dimension_names or ()
        if dims and dims[0] == "step":
            by_length.setdefault(arr.shape[0], []).append(key)
    every = [k for keys in by_length.values() for k in keys]
    parts = []
    for keys in by_length.values() or [[]]:
        drop = [k for k in every if k not in keys]
        ds = xr.open_zarr(store, group=name, consolidated=False, chunks=chunks, zarr_format=3, drop_variables=drop)
        parts.append(ds.isel(step=slice(0, n)) if "step" in ds.dims else ds)
    ds = parts[0] if len(parts) == 1 else xr.merge(parts, compat="override", join="override",
                                                   combine_attrs="override")
    ds.attrs.pop("n_rows", None)
    return ds


@contextlib.contextmanager
def beside_a_writer() -> Iterator[None]:
    """Listing a group while a writer is live: its temporary files (``*.partial``, renamed into place when
    written) are not part of the hierarchy, and Zarr's warning about each is noise to a reader."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr hierarchy")
        yield


def open_run(path: str | Path, storage_options: Mapping[str, Any] | None = None, chunks: Any = None,
             check: str = "keys") -> xr.DataTree:
    """The committed prefix of a run as an ``xarray.DataTree``: the root holds the run's attributes,
    one child per sub-group, each cut to its ``n_rows`` committed steps. Data are read lazily: by xarray's
    lazy indexing (``chunks=None``), or as dask arrays (``chunks={}``: one task per Zarr chunk, or any
    ``chunks`` that ``xarray.open_zarr`` takes); either way only the chunks a computation touches are read.

    ``check``: "keys" (default) lists the store's files and leaves out of each group the committed rows whose
    chunk files are missing (Zarr would read them as NaN); "full" also decodes every chunk once and leaves out
    rows that cannot be decoded; "none" trusts the store. Rows left out are described in the root attribute
    ``damaged`` (a list of one-line texts) and logged. A metadata document that cannot be decoded raises
    ``ValueError`` naming it."""
    from .integrity import damaged_metadata, damaged_rows

    if check not in ("keys", "full", "none"):
        raise ValueError(f"open_run: check must be 'keys', 'full' or 'none', got {check!r}")
    store = open_store(path, storage_options, read_only=True)
    try:
        root = zarr.open_group(store, mode="r")
        attrs = check_run(root, str(path))
        with beside_a_writer():
            names = sorted(root.group_keys())
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise FileNotFoundError(f"{path}: no spectralscope run there") from exc
    except ValueError as exc:
        if "spectralscope" in str(exc):
            raise
        raise ValueError(f"{path}: {damaged_metadata(path, storage_options) or exc}") from None
    try:
        damage = [] if check == "none" else damaged_rows(path, storage_options, decode=check == "full")
    except ValueError as exc:  # a metadata document that does not decode
        raise ValueError(f"{path}: {damaged_metadata(path, storage_options) or exc}") from None
    tree: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=attrs)}
    with beside_a_writer():
        for name in names:
            for attempt in range(100):
                try:
                    ds = _open_group(store, root[name], name, chunks)
                    break
                except ValueError as exc:  # a live writer resized arrays between our two metadata reads
                    if "conflicting sizes" in str(exc) and attempt < 99:
                        time.sleep(0.01)
                        continue
                    raise ValueError(f"{path}: {damaged_metadata(path, storage_options) or exc}") from None
            bad = [d for d in damage if d.group == name]
            if bad and "step" in ds.dims:
                keep = np.ones(ds.sizes["step"], dtype=bool)
                for d in bad:
                    keep[d.start:d.stop] = False
                ds = ds.isel(step=np.flatnonzero(keep))
            tree[f"/{name}"] = ds
    if damage:
        tree["/"].attrs["damaged"] = [d.describe() for d in damage]
        log.warning("spectralscope: %s is damaged, %d row ranges left out: %s", path, len(damage),
                    "; ".join(d.describe() for d in damage[:3]) + ("; …" if len(damage) > 3 else ""))
    return xr.DataTree.from_dict(tree)
