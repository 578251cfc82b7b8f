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
#: Runs selected when the page opens (all of them, up to this many).
MAX_RUNS = 32
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
          quantile: float | None, units: tuple[int, ...] | None, at_steps: tuple[int, ...] | None) -> xr.DataArray | None:
    del rows  # part of the cache key only: new committed rows make a new entry
    return data.read(_where(path), group, var, window=window, max_steps=max_steps, quantile=quantile, units=units,
                     at_steps=at_steps, storage_options=storage_options())


@st.cache_data(show_spinner=False)
def _steps(path: str, rows: int, group: str) -> list[int]:
    del rows
    return [int(s) for s in data.steps(_where(path), group, storage_options())]


def steps(entry: data.RunEntry, group: str) -> list[int]:
    """The committed steps of ``group`` in ``entry``, cached until it commits more."""
    return _steps(str(entry.path), n_rows(str(entry.path)).get(group, 0), group)


def read(entry: data.RunEntry, group: str, var: str, *, window: tuple[float, float] = (0.0, 1.0),
         max_steps: int | None = MAX_STEPS, quantile: float | None = None,
         units: Sequence[int] | None = None, at_steps: Sequence[int] | None = None) -> xr.DataArray | None:
    """`data.read` through the cache; None (and a note on the page) when the store cannot be read."""
    rows = n_rows(str(entry.path)).get(group, 0)
    try:
        return _read(str(entry.path), rows, group, var, tuple(window), max_steps, quantile,
                     tuple(units) if units is not None else None,
                     tuple(int(s) for s in at_steps) if at_steps is not None else None)
    except Exception as exc:  # a store damaged after it was listed: say so, keep the page
        st.warning(f"{entry.rel}: cannot read {group}/{var} ({type(exc).__name__}: {exc})")
        return None


def bounds(runs: Sequence[data.RunEntry], var: str, quantile: float | None,
           units: Sequence[int] | None) -> dict[str, xr.DataArray]:
    """Per run, the stored bound ``{var}_err`` of an estimated quantile (runs with an SLQ-measured layer only)."""
    return {e.rel: d for e in runs
            if (d := read(e, "optimizer", f"{var}_err", quantile=quantile, units=units)) is not None}


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
        st.session_state["runs"] = chosen or list(ok)[:MAX_RUNS]
    st.session_state["runs"] = [r for r in st.session_state["runs"] if r in ok]
    picked = st.sidebar.multiselect("runs", list(ok), key="runs")
    return [ok[r] for r in picked]


def layer_picker(entry: data.RunEntry, group: str, label: str = "layers", default: int = 6,
                 skip_kinds: Sequence[str] = ()) -> list[int] | None:
    """A multiselect of the layer (or module) names of ``group`` in ``entry``; returns their indices. The
    default picks one of each kind first, leaving ``skip_kinds`` out of it."""
    names_of_vars = data.variables(entry.path, group, storage_options())
    da = read(entry, group, names_of_vars[0], max_steps=1) if names_of_vars else None
    if da is None:
        return None
    unit = unit_dim(da.dims)
    names = [str(v) for v in da[unit].values]
    kinds = [str(k) for k in da["kind"].values] if "kind" in da.coords else names
    first = [names[kinds.index(k)] for k in dict.fromkeys(kinds) if k not in skip_kinds]
    rest = [n for n, k in zip(names, kinds, strict=True) if n not in first and k not in skip_kinds]
    picked = st.multiselect(label, names, default=(first + rest)[:default],
                            key=f"{group}-{label}")
    return [names.index(n) for n in picked]


def quantile_picker(entry: data.RunEntry, var: str, label: str, default: float, key: str,
                    container=st) -> float:
    """A selectbox of the quantile levels ``entry`` recorded for ``var`` (SPEC's defaults if unreadable)."""
    probe = read(entry, "optimizer", var, max_steps=1)
    levels = [float(q) for q in probe["quantile"].values] if probe is not None else [default]
    return container.selectbox(label, levels, index=levels.index(default) if default in levels else 0, key=key)


def spectrum_curves(runs: Sequence[data.RunEntry], group: str, var: str, units: Sequence[int] | None,
                    at_steps: Sequence[int]) -> list[tuple[str, str, int, object]]:
    """(run, layer or module, step, values by rank) for each run, unit and chosen step — in each run the
    committed step nearest to the chosen one, so runs recorded on other steps still overlay: the input of
    `charts.spectra`."""
    curves = []
    for e in runs:
        have = steps(e, group)
        if not have:
            continue
        near = sorted({min(have, key=lambda s, t=t: abs(s - t)) for t in at_steps})
        da = read(e, group, var, units=units, at_steps=near, max_steps=None)
        if da is None:
            continue
        unit = unit_dim(da.dims)
        for s in range(da.sizes["step"]):
            for j in range(da.sizes[unit]):
                curves.append((e.rel, str(da[unit].values[j]), int(da["step"].values[s]),
                               da.isel({"step": s, unit: j}).values))
    return curves
