"""The Streamlit side shared by every page: the runs folder, cached reads, the run picker.

Reads are cached by (store, committed rows, slice): a finished run is read once, a live run again only
when it has committed new rows; the committed row counts themselves are re-read every ``REFRESH`` seconds.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import streamlit as st
import xarray as xr

from spectralscope.dashboards import data
from spectralscope.store import is_url, unit_dim

#: Seconds between refreshes of the live parts of a page (``SPECTRALSCOPE_REFRESH`` overrides).
REFRESH = float(os.environ.get("SPECTRALSCOPE_REFRESH", "3"))
#: Runs selected when the page opens: the newest, up to this many (a legend of 30 runs × 6 layers is unreadable).
DEFAULT_RUNS = 8
#: Steps drawn per line at most; longer runs are strided evenly.
MAX_STEPS = 1500


def runs_dir() -> data.Where:
    """The folder the app serves: ``SPECTRALSCOPE_RUNS_DIR`` (set by ``spectralscope dashboard``), else the
    first argument after ``--`` of ``streamlit run app.py -- RUNS_DIR``, else the working directory. An
    fsspec URL (``s3://bucket/runs``) is served as it is."""
    arg = os.environ.get("SPECTRALSCOPE_RUNS_DIR") or (sys.argv[1] if len(sys.argv) > 1 else ".")
    return arg.rstrip("/") if is_url(arg) else Path(arg).resolve()


def storage_options() -> dict | None:
    """fsspec options for a remote runs folder: the JSON object in ``SPECTRALSCOPE_STORAGE_OPTIONS``."""
    text = os.environ.get("SPECTRALSCOPE_STORAGE_OPTIONS")
    return json.loads(text) if text else None


@st.cache_data(ttl=REFRESH, show_spinner=False)
def find_runs(root: str) -> list[data.RunEntry]:
    return data.find_runs(root, storage_options=storage_options())


@st.cache_data(ttl=REFRESH, show_spinner=False)
def n_rows(path: str) -> dict[str, int]:
    return data.n_rows(_where(path), storage_options())


def _where(path: str) -> data.Where:
    return path if is_url(path) else Path(path)


@st.cache_data(max_entries=2048, show_spinner=False)
def _read(path: str, rows: int, group: str, var: str, window: tuple[float, float], max_steps: int | None,
          quantile: float | None, units: tuple[int, ...] | None, at_steps: tuple[int, ...] | None,
          bucket: str | None = "all") -> xr.DataArray | None:
    del rows  # part of the cache key only: new committed rows make a new entry
    return data.read(_where(path), group, var, window=window, max_steps=max_steps, quantile=quantile, units=units,
                     at_steps=at_steps, storage_options=storage_options(), bucket=bucket)


@st.cache_data(show_spinner=False)
def buckets(path: str) -> list[str]:
    """The token-frequency buckets a run's activations were recorded with ([] without; fixed for a run)."""
    return data.buckets(_where(path), "activations", storage_options())


@st.cache_data(show_spinner=False)
def _steps(path: str, rows: int, group: str) -> list[int]:
    del rows
    return [int(s) for s in data.steps(_where(path), group, storage_options())]


@st.cache_data(show_spinner=False)
def _units(path: str, group: str) -> tuple[list[str], list[str]]:
    return data.unit_names(_where(path), group, storage_options())


def unit_names(entry: data.RunEntry, group: str) -> tuple[list[str], list[str]]:
    """The layer (or module) names of ``group`` in ``entry`` and their kinds (fixed for a run: cached)."""
    return _units(str(entry.path), group)


def steps(entry: data.RunEntry, group: str) -> list[int]:
    """The committed steps of ``group`` in ``entry``, cached until it commits more."""
    return _steps(str(entry.path), n_rows(str(entry.path)).get(group, 0), group)


def read(entry: data.RunEntry, group: str, var: str, *, window: tuple[float, float] = (0.0, 1.0),
         max_steps: int | None = MAX_STEPS, quantile: float | None = None,
         units: Sequence[str] | None = None, at_steps: Sequence[int] | None = None,
         optional: bool = False, bucket: str = "all") -> xr.DataArray | None:
    """`data.read` through the cache, ``units`` given by name: the layers (or modules) of that name this run
    has, wherever they sit in it (runs of other models have other layers). None when the run has none of
    them, no committed rows, or no such variable (said in a one-line note, unless the variable is
    ``optional``: one that only some runs record), or cannot be read (a warning)."""
    rows = n_rows(str(entry.path)).get(group, 0)
    index = None
    if units is not None:
        names = unit_names(entry, group)[0]
        index = tuple(names.index(u) for u in units if u in names)
        if not index:
            return None
    try:
        da = _read(str(entry.path), rows, group, var, tuple(window), max_steps, quantile, index,
                   tuple(int(s) for s in at_steps) if at_steps is not None else None, bucket)
    except Exception as exc:  # a store damaged after it was listed: say so, keep the page
        st.warning(f"{entry.rel}: cannot read {group}/{var} ({type(exc).__name__}: {exc})")
        return None
    if da is None and rows and not optional and var not in data.variables(entry.path, group, storage_options()):
        st.caption(f"{entry.rel}: this store has no {group}/{var} (recorded by another version or setting)")
    return da


def bounds(runs: Sequence[data.RunEntry], var: str, quantile: float | None,
           units: Sequence[int] | None) -> dict[str, xr.DataArray]:
    """Per run, the stored bound ``{var}_err`` of an estimated quantile (runs with an SLQ-measured layer only)."""
    return {e.rel: d for e in runs
            if (d := read(e, "optimizer", f"{var}_err", quantile=quantile, units=units, optional=True)) is not None}


def header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def selected_runs() -> list[data.RunEntry]:
    """The sidebar's run picker (shared by every page): the readable runs under the folder, preselected
    from the ``runs`` query parameter when given; runs outside the folder are refused with a message."""
    root = runs_dir()
    try:
        entries = find_runs(str(root))
    except FileNotFoundError as exc:
        st.error(str(exc))
        return []
    ok = {e.rel: e for e in entries if e.ok}
    st.sidebar.caption(f"runs folder: `{root}`")
    if not ok:
        st.info(f"No spectralscope runs under {root} yet. Record one with `ss.watch(...)` or `spectralscope demo`.")
        return []
    wanted = [r for r in st.query_params.get_all("run") if r]
    chosen = []
    for rel in wanted:
        try:
            data.resolve(root, rel)
        except ValueError as exc:
            st.error(str(exc))
            continue
        if rel in ok:
            chosen.append(rel)
        else:
            st.warning(f"{rel!r} is not a readable run under {root}")
    if "runs" not in st.session_state:
        newest = sorted(ok, key=lambda rel: str(ok[rel].attrs.get("created", "")), reverse=True)[:DEFAULT_RUNS]
        st.session_state["runs"] = chosen or [rel for rel in ok if rel in newest]
    st.session_state["runs"] = [r for r in st.session_state["runs"] if r in ok]
    picked = st.sidebar.multiselect("runs", list(ok), key="runs")
    return [ok[r] for r in picked]


def layer_picker(runs: Sequence[data.RunEntry], group: str, label: str = "layers", default: int = 6,
                 skip_kinds: Sequence[str] = ()) -> list[str] | None:
    """A multiselect of the layer (or module) names of ``group`` over ``runs`` (each name once, in the order the
    runs hold them); returns the names picked (None when no run has the group). The default picks one of each
    kind first, leaving ``skip_kinds`` out of it."""
    names, kinds = [], []
    for e in runs:
        for n, k in zip(*unit_names(e, group), strict=True):
            if n not in names:
                names.append(n)
                kinds.append(k)
    if not names:
        return None
    first = [names[kinds.index(k)] for k in dict.fromkeys(kinds) if k not in skip_kinds]
    rest = [n for n, k in zip(names, kinds, strict=True) if n not in first and k not in skip_kinds]
    return st.multiselect(label, names, default=(first + rest)[:default], key=f"{group}-{label}")


def with_rows(runs: Sequence[data.RunEntry], group: str) -> list[data.RunEntry]:
    """The runs that have committed rows of ``group`` (a run just started has none yet)."""
    return [e for e in runs if n_rows(str(e.path)).get(group, 0)]


def quantile_picker(runs: Sequence[data.RunEntry], var: str, label: str, default: float, key: str,
                    container=st) -> float:
    """A selectbox of the quantile levels recorded for ``var`` by the first run that has rows (SPEC's default
    level alone if none has)."""
    probe = next((d for e in with_rows(runs, "optimizer") if (d := read(e, "optimizer", var, max_steps=1))
                  is not None), None)
    levels = [float(q) for q in probe["quantile"].values] if probe is not None else [default]
    return container.selectbox(label, levels, index=levels.index(default) if default in levels else 0, key=key)


def spectrum_curves(runs: Sequence[data.RunEntry], group: str, var: str, units: Sequence[int] | None,
                    at_steps: Sequence[int], bucket: str = "all") -> list[tuple[str, str, int, object]]:
    """(run, layer or module, step, values by rank) for each run, unit and chosen step — in each run the
    committed step nearest to the chosen one, so runs recorded on other steps still overlay: the input of
    `charts.spectra`."""
    curves = []
    for e in runs:
        have = steps(e, group)
        if not have:
            continue
        near = sorted({min(have, key=lambda s, t=t: abs(s - t)) for t in at_steps})
        da = read(e, group, var, units=units, at_steps=near, max_steps=None, bucket=bucket)
        if da is None:
            continue
        unit = unit_dim(da.dims)
        for s in range(da.sizes["step"]):
            for j in range(da.sizes[unit]):
                curves.append((e.rel, str(da[unit].values[j]), int(da["step"].values[s]),
                               da.isel({"step": s, unit: j}).values))
    return curves
