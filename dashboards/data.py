"""What the dashboard reads: the runs under a folder, and small slices of their committed rows.

Plain functions over the file system and Zarr, no Streamlit, so they are tested on their own. Stores are
opened read-only: the dashboard never writes into a run. A slice reads ``n_rows`` first and then only rows
below it (SPEC §5), so a live run is read without torn rows, and only the chunks of the one variable, the
step range and the quantile a chart shows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from spectralscope import health, schema
from spectralscope.derived import DERIVED, ratio
from spectralscope.fit import combine_runs, run_labels, run_size, settled_frame, window_rows
from spectralscope.integrity import run_status
from spectralscope.store import beside_a_writer, check_run, committed_rows, is_url, ns_entry, open_store, optimizer_entries

#: A run's location: a local folder, or an fsspec URL (``s3://bucket/runs/w64.zarr``).
Where = Path | str
Options = dict[str, Any] | None

#: Folders are searched this deep below RUNS_DIR (runs/sweep/w64.zarr is depth 2).
MAX_DEPTH = 4
GROUPS = schema.GROUP_NAMES


@dataclass(frozen=True)
class RunEntry:
    """One store found under the runs folder: ``rel`` (its path relative to the folder, the run's id in the
    app), ``path`` (absolute, or a URL), and either its root attributes (``problem`` None) or what is wrong with it."""

    rel: str
    path: Where
    attrs: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def name(self) -> str:
        return str(self.attrs.get("name") or Path(self.rel).stem)


def _fs(url: str, storage_options: Options):
    import fsspec  # remote runs folders only (the `s3` extra)

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def join(root: Where, rel: str) -> Where:
    """``root/rel`` for a folder or a URL."""
    return f"{str(root).rstrip('/')}/{rel}" if is_url(root) else Path(root) / rel


def resolve(root: Where, rel: str) -> Where:
    """``root/rel`` as an absolute path (or URL); ``ValueError`` when it lies outside ``root`` (``..``, absolute
    paths, symbolic links that leave the folder): the app reads nothing but the runs folder."""
    if is_url(root):
        parts = rel.split("/")
        if "://" in rel or rel.startswith("/") or any(p in ("..", ".") for p in parts):
            raise ValueError(f"{rel!r} is outside the runs folder {root}; refused")
        return join(root, rel)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{rel!r} is outside the runs folder {base}; refused")
    return target


def _probe(rel: str, folder: Where, storage_options: Options = None, read=None) -> RunEntry:
    try:
        text = read(f"{folder}/zarr.json") if read else (Path(folder) / "zarr.json").read_text()
        doc = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return RunEntry(rel, folder, problem=f"corrupt store: cannot read zarr.json ({type(exc).__name__}: {exc})")
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        kind = doc.get("node_type") if isinstance(doc, dict) else type(doc).__name__
        return RunEntry(rel, folder, problem=f"a Zarr {kind}, not a spectralscope run")
    try:
        root_group = zarr.open_group(open_store(folder, storage_options, read_only=True), mode="r")
        attrs = check_run(root_group, rel)
    except ValueError as exc:
        return RunEntry(rel, folder, problem=str(exc))
    except Exception as exc:  # a store broken in a way Zarr reports itself
        return RunEntry(rel, folder, problem=f"corrupt store ({type(exc).__name__}: {exc})")
    return RunEntry(rel, folder, attrs=attrs)


def find_runs(root: Where, max_depth: int = MAX_DEPTH, storage_options: Options = None) -> list[RunEntry]:
    """Every Zarr group (a folder with ``zarr.json``) and every ``*.zarr`` folder under ``root`` (a folder or an
    fsspec URL), sorted by relative path; a group's own sub-folders are not searched. Each entry is a run or
    says why it is not."""
    if is_url(root):
        return _find_remote(str(root).rstrip("/"), max_depth, storage_options)
    base = Path(root).resolve()
    if not base.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist or is not a folder")
    found: list[RunEntry] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(base).parts)
        if here != base and ("zarr.json" in filenames or here.suffix == ".zarr"):
            rel = here.relative_to(base).as_posix()
            found.append(_probe(rel, here) if "zarr.json" in filenames else
                         RunEntry(rel, here, problem="not a Zarr store (no zarr.json)"))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
    return sorted(found, key=lambda e: e.rel)


def _find_remote(root: str, max_depth: int, storage_options: Options) -> list[RunEntry]:
    """`find_runs` on object storage: one listing per folder level, as os.walk does locally."""
    fs, base = _fs(root, storage_options)
    fs.invalidate_cache()  # new runs appear between refreshes
    if not fs.isdir(base):
        raise FileNotFoundError(f"runs folder {root} does not exist or is not a folder")

    def read(url: str) -> str:
        return fs.cat_file(url).decode()  # the filesystem strips its own protocol

    found: list[RunEntry] = []
    level = [base.rstrip("/")]
    for depth in range(max_depth + 1):
        nxt = []
        for folder in level:
            for info in sorted(fs.ls(folder, detail=True), key=lambda i: i["name"]):
                name = info["name"].rstrip("/")
                leaf = name.rsplit("/", 1)[-1]
                if info["type"] != "directory" or leaf.startswith("."):
                    continue
                rel = name[len(base.rstrip("/")) + 1:]
                url = f"{root}/{rel}"
                if fs.exists(f"{name}/zarr.json"):
                    found.append(_probe(rel, url, storage_options, read))
                elif leaf.endswith(".zarr"):
                    found.append(RunEntry(rel, url, problem="not a Zarr store (no zarr.json)"))
                elif depth < max_depth - 1:
                    nxt.append(name)
        level = nxt
    return sorted(found, key=lambda e: e.rel)


def n_rows(path: Where, storage_options: Options = None) -> dict[str, int]:
    """Committed rows per sub-group (its ``n_rows`` attribute), read afresh."""
    out = {}
    if is_url(path):
        fs, base = _fs(str(path), storage_options)
        docs = fs.cat([f"{base}/{g}/zarr.json" for g in GROUPS], on_error="omit")  # one round of requests
        texts = {k.rstrip("/").split("/")[-2]: v for k, v in docs.items()}
    else:
        texts = {}
        for g in GROUPS:
            try:
                texts[g] = (Path(path) / g / "zarr.json").read_bytes()
            except OSError:
                continue
    for g, text in texts.items():
        try:
            out[g] = int(json.loads(text).get("attributes", {}).get("n_rows", 0))
        except (ValueError, AttributeError):
            continue
    return out


def last_update(path: Where, storage_options: Options = None) -> _dt.datetime | None:
    """When the run last committed rows: the newest modification time of its groups' metadata (each commit sets
    ``n_rows`` there; the root's document changes with every heartbeat too, so it counts only before the
    first commit)."""
    if is_url(path):
        fs, base = _fs(str(path), storage_options)

        def stamps(keys: list[str]) -> list[_dt.datetime]:
            out = []
            for key in keys:
                try:
                    stamp = fs.modified(key)
                except (OSError, NotImplementedError, KeyError):
                    continue
                out.append(stamp if stamp.tzinfo else stamp.replace(tzinfo=_dt.UTC))
            return out

        times = stamps([f"{base}/{g}/zarr.json" for g in GROUPS]) or stamps([f"{base}/zarr.json"])
        return max(times) if times else None
    p = Path(path)
    times = ([f.stat().st_mtime for f in (p / g / "zarr.json" for g in GROUPS) if f.exists()]
             or [f.stat().st_mtime for f in [p / "zarr.json"] if f.exists()])
    return _dt.datetime.fromtimestamp(max(times), tz=_dt.UTC) if times else None


def overview(entries: Sequence[RunEntry], storage_options: Options = None) -> pd.DataFrame:
    """One row per readable run: name, folder, model size, optimizer, NS steps, training steps seen, optimizer
    records committed, status, last update, the number of metric values that came out NaN (the run's ``errors``),
    its health (`health_badge`) and what the run does not record by construction, with why (its ``notes``)."""
    rows = []
    for e in entries:
        if not e.ok:
            continue
        a = e.attrs
        opts = optimizer_entries(a)
        rows_by_group = n_rows(e.path, storage_options)
        errors = a.get("errors") or {}
        updated = last_update(e.path, storage_options)
        rows.append({
            "run": e.rel,
            "name": e.name,
            "model_size": a.get("model_size"),
            "optimizer": " + ".join(str(o.get("class")) for o in opts) or None,
            "ns_steps": ns_entry(a).get("ns_steps"),
            "steps": int(a.get("steps", 0)),
            "records": rows_by_group.get("optimizer", 0),
            "status": run_status(a),
            "last_update": updated.strftime("%Y-%m-%d %H:%M:%S UTC") if updated else None,
            "nan_values": int(sum(sum(v.values()) for v in errors.values() if isinstance(v, dict))),
            "health": health_badge(health_events(e.path, storage_options)),
            "notes": "; ".join(f"{k}: {v}" for k, v in (a.get("notes") or {}).items()),
        })
    return pd.DataFrame(rows, columns=["run", "name", "model_size", "optimizer", "ns_steps", "steps", "records",
                                       "status", "last_update", "nan_values", "health", "notes"])


HEALTH_TEXT = schema.HEALTH.strings()


def health_events(path: Where, storage_options: Options = None) -> list[dict[str, Any]] | None:
    """The committed rows of a run's ``health`` group (an alert starting or ending each: step, rule, group, layer,
    value, severity, state, message), in order; None when the run was recorded without health rules."""
    g = _group(path, "health", storage_options)
    if g is None:
        return None
    n = committed_rows(g)
    if n == 0:
        return []
    return health.events({v: g[v][:n] for v in ("step", "value", *HEALTH_TEXT)})


def health_badge(events: list[dict[str, Any]] | None) -> str:
    """A run's health in a few characters: the alerts still active at its last record, by severity, and how many
    there were in all ("not recorded" without health rules)."""
    if events is None:
        return "not recorded"
    spans = health.spans(events)
    if not spans:
        return "✅ healthy"
    active = [s["severity"] for s in spans if s["end"] is None]
    icons = {"critical": "🔴", "warning": "🟠", "info": "🔵"}
    now = " ".join(f"{icons[s]} {active.count(s)} {s}" for s in reversed(health.SEVERITIES) if active.count(s))
    return f"{now or '✅ none active'} ({len(spans)} alert{'s' if len(spans) != 1 else ''} in all)"


def _group(path: Where, group: str, storage_options: Options = None) -> zarr.Group | None:
    root = zarr.open_group(open_store(path, storage_options, read_only=True), mode="r")
    return root[group] if group in root else None


def variables(path: Where, group: str, storage_options: Options = None) -> list[str]:
    """The data variables of ``group`` (everything with a leading ``step`` dimension but ``step`` itself), and the
    `spectralscope.derived` quantities made from them."""
    g = _group(path, group, storage_options)
    if g is None:
        return []
    with beside_a_writer():
        arrays = list(g.arrays())
    stored = {name for name, arr in arrays if name != "step" and (arr.metadata.dimension_names or ("",))[0] == "step"}
    return sorted(stored | {n for n, d in DERIVED.items() if d.group == group and d.source in stored})


def unit_names(path: Where, group: str, storage_options: Options = None) -> tuple[list[str], list[str]]:
    """The names along ``group``'s layer (or module) axis and their kinds ([] and [] without one)."""
    g = _group(path, group, storage_options)
    unit = next((d for d in ("layer", "module") if g is not None and d in g), None)
    if unit is None:
        return [], []
    names = [str(v) for v in _plain(g[unit][...])]
    kinds = [str(v) for v in _plain(g["kind"][...])] if "kind" in g else names
    return names, kinds


def buckets(path: Where, group: str = "activations", storage_options: Options = None) -> list[str]:
    """The token-frequency buckets ``group`` was recorded with (``all`` first), [] without."""
    g = _group(path, group, storage_options)
    return [str(v) for v in _plain(g["bucket"][...])] if g is not None and "bucket" in g else []


def _plain(values: np.ndarray) -> np.ndarray:
    """Zarr hands strings back as numpy's variable-width StringDType; pandas and plotly want plain ``str``."""
    return np.array(values.tolist(), dtype=str) if values.dtype.kind == "T" else values


def steps(path: Where, group: str, storage_options: Options = None) -> np.ndarray:
    """The committed steps of ``group`` (empty when it has none)."""
    g = _group(path, group, storage_options)
    if g is None:
        return np.empty(0, dtype=np.int64)
    return np.asarray(g["step"][: committed_rows(g)])


def read(path: Where, group: str, var: str, *, window: tuple[float, float] = (0.0, 1.0), max_steps: int | None = None,
         quantile: float | None = None, units: Sequence[int] | None = None,
         at_steps: Sequence[int] | None = None, storage_options: Options = None,
         bucket: str | None = "all") -> xr.DataArray | None:
    """Committed rows of one variable as a DataArray with its named dimensions and coordinates
    (``step``; ``layer``/``module`` with ``kind``, ``depth`` and, where stored, ``sv_method``; ``quantile``; ``rank``).

    ``window``: fractions of the committed rows; ``max_steps``: keep at most that many, evenly strided;
    ``quantile``: only the nearest recorded level (that dimension dropped); ``units``: only these layer or
    module indices; ``at_steps``: only the committed rows of these steps (instead of the window); ``bucket``: for
    activations recorded per token-frequency bucket, that bucket (that dimension dropped; None keeps it). None when
    the group or variable does not exist or has no committed rows. ``var`` may be a `spectralscope.derived`
    quantity (``mup_weight_ratio``), made from the variable it is derived from."""
    if var in DERIVED:
        d = DERIVED[var]
        g = _group(path, group, storage_options)
        if group != d.group or g is None or d.source not in g:
            return None
        if d.level is not None and ("quantile" not in g or not np.isclose(g["quantile"][...], d.level).any()):
            raise ValueError(f"{var} needs {d.source} at quantile {d.level:g}, which this run did not record")
        src = read(path, group, d.source, window=window, max_steps=max_steps, quantile=d.level, units=units,
                   at_steps=at_steps, storage_options=storage_options, bucket=bucket)
        return None if src is None else ratio(src, var)
    g = _group(path, group, storage_options)
    if g is None or var not in g:
        return None
    n = committed_rows(g)
    i0, i1 = window_rows(n, window)
    if n == 0 or i1 <= i0:
        return None
    stride = max(1, -(-(i1 - i0) // max_steps)) if max_steps else 1
    rows: Any = slice(i0, i1, stride)
    if at_steps is not None:
        committed = np.asarray(g["step"][:n])
        rows = [int(i) for i in np.flatnonzero(np.isin(committed, np.asarray(list(at_steps))))]
        if not rows:
            return None
    arr = g[var]
    dims = list(arr.metadata.dimension_names)
    if bucket not in (None, "all") and "bucket" not in dims:
        raise ValueError(f"{group}/{var} was recorded without token-frequency buckets")
    sel: list[Any] = [rows]
    coords: dict[str, Any] = {"step": ("step", g["step"].get_orthogonal_selection((rows,)))}
    keep_dims = ["step"]
    for d in dims[1:]:
        values = _plain(g[d][...]) if d in g else np.arange(arr.shape[dims.index(d)])
        if d == "quantile" and quantile is not None:
            sel.append(int(np.argmin(np.abs(values - quantile))))
            continue
        if d == "bucket" and bucket is not None:
            names = [str(v) for v in values]
            if bucket not in names:
                raise ValueError(f"{group}/{var} has no bucket {bucket!r} (recorded: {', '.join(names)})")
            sel.append(names.index(bucket))
            continue
        idx = list(units) if units is not None and d in ("layer", "module") else None
        sel.append(idx if idx is not None else slice(None))
        keep_dims.append(d)
        coords[d] = (d, values[idx] if idx is not None else values)
        if d in ("layer", "module"):
            for aux in schema.UNIT_COORDS:
                if aux in g:
                    av = _plain(g[aux][...])
                    coords[aux] = (d, av[idx] if idx is not None else av)
    data = arr.get_orthogonal_selection(tuple(sel))
    return xr.DataArray(np.asarray(data, dtype=np.float64), dims=keep_dims, coords=coords, name=var)


def settled(entries: Sequence[RunEntry], metric: str, group: str, quantile: float | None,
            window: tuple[float, float] = (0.5, 1.0), storage_options: Options = None,
            size: str = "model_size") -> tuple[pd.DataFrame, list[str]]:
    """The settled value (median over ``window`` of the committed rows) of ``metric`` per run and layer, as
    the tidy frame `spectralscope.fit_scaling` takes (``run``, ``layer``, ``kind``, ``depth``, ``quantile``,
    ``size``, ``value``, and the run's ``optimizer`` and ``arch``: `fit.run_labels`), depth rounded to 0.25 when
    the runs' depth grids differ; ``size`` is the run attribute (root or ``meta``) named by ``size``; plus one line
    per run that could not be used."""
    frames, skipped = [], []
    for e in entries:
        try:
            da = read(e.path, group, metric, window=window, quantile=quantile, storage_options=storage_options)
        except Exception as exc:
            skipped.append(f"{e.rel}: {type(exc).__name__}: {exc}")
            continue
        try:
            value = run_size(e.attrs, size, e.rel)
        except (TypeError, ValueError):
            value = None
        if da is None or value is None:
            skipped.append(f"{e.rel}: no committed {metric}" if da is None else f"{e.rel}: no {size}")
            continue
        frames.append(settled_frame(da, value, run_labels(e.attrs), quantile=quantile).assign(run=e.rel))
    if not frames:
        return pd.DataFrame(columns=["run", "layer", "kind", "depth", "quantile", "size", "value", "optimizer",
                                     "arch"]), skipped
    return combine_runs(frames), skipped
