"""Plotly figures of the dashboard, as pure functions of the data they show (no Streamlit, no I/O).

Every trace carries the run and the layer in its hover text, with the step and the value; spectra and
scaling plots use log axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import qualitative

from spectralscope.settle import settled_from
from spectralscope.store import unit_dim

PALETTE = qualitative.Plotly + qualitative.D3
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
HEIGHT = 420


def _decades(fig: go.Figure, axis: str) -> float:
    """How many powers of ten the positive finite values along ``axis`` ("x" or "y") of the traces span."""
    values = []
    for trace in fig.data:
        v = getattr(trace, axis, None)
        try:
            a = np.asarray(v, dtype=np.float64).ravel()
        except (TypeError, ValueError):  # category values (layer names)
            continue
        values.append(a[np.isfinite(a) & (a > 0)])
    both = np.concatenate(values) if values else np.empty(0)
    return float(np.log10(both.max() / both.min())) if both.size else 0.0


def log_ticks(fig: go.Figure, axis: str) -> dict:
    """Tick settings that keep a log axis readable: over a decade or more, one labelled tick per power of ten
    written as 10ⁿ with unlabelled minor ticks between (plotly's default crowds in "2" and "5" labels);
    within a decade, plain numbers with at most three significant digits."""
    if _decades(fig, axis) >= 1.0:
        return {"dtick": 1, "exponentformat": "power", "showexponent": "all", "minor": {"ticks": "inside",
                                                                                        "showgrid": True}}
    return {"tickformat": ".3~g"}


def _layout(fig: go.Figure, title: str, x: str, y: str, log_x: bool = False, log_y: bool = False) -> go.Figure:
    fig.update_layout(title=title, height=HEIGHT, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"font": {"size": 10}}, hovermode="closest")
    # type None: plotly picks (category for layer names)
    fig.update_xaxes(title=x, type="log" if log_x else None, **(log_ticks(fig, "x") if log_x else {}))
    fig.update_yaxes(title=y, type="log" if log_y else None, **(log_ticks(fig, "y") if log_y else {}))
    return fig


def heatmap(da: xr.DataArray, title: str, run: str, log: bool = False) -> go.Figure:
    """Layer × step heatmap of a (step, layer) array; ``log`` colours by log10 of the value."""
    unit = unit_dim(da.dims)
    z = da.transpose(unit, "step").values
    names = [str(v) for v in da[unit].values]
    with np.errstate(divide="ignore", invalid="ignore"):
        colour = np.log10(np.where(z > 0, z, np.nan)) if log else z
    fig = go.Figure(go.Heatmap(
        x=da["step"].values, y=names, z=colour, customdata=z, colorscale="Viridis",
        colorbar={"title": "log10" if log else ""},
        hovertemplate=f"run {run}<br>{unit} %{{y}}<br>step %{{x}}<br>value %{{customdata:.4g}}<extra></extra>",
    ))
    _layout(fig, title, "step", unit)
    fig.update_layout(height=max(HEIGHT, 16 * len(names) + 140))  # one readable label per row
    return fig


def lines(series: Mapping[str, xr.DataArray], title: str, y: str, log_y: bool = False,
          threshold: tuple[float, str] | None = None, errors: Mapping[str, xr.DataArray] | None = None,
          burn_in: bool = False) -> go.Figure:
    """One line per (run, layer) of (step, layer) arrays: colour by layer, dash by run.
    ``threshold`` = (value, label) draws a horizontal reference line (e.g. the NS threshold). ``errors``:
    per run, the stored bound on |recorded − true| of an estimated quantile (``*_sv_err``), drawn as error
    bars where it is positive; layers the store marks ``sv_method = "slq"`` are labelled "(estimated)".
    ``burn_in``: a diamond where each line has settled (`spectralscope.settle.settled_from`; none on a line that
    has not)."""
    fig = go.Figure()
    colours: dict[str, str] = {}
    for r, (run, da) in enumerate(series.items()):
        unit = unit_dim(da.dims)
        methods = [str(v) for v in da["sv_method"].values] if "sv_method" in da.coords else []
        err_da = (errors or {}).get(run)
        for j, name in enumerate(str(v) for v in da[unit].values):
            colour = colours.setdefault(name, PALETTE[len(colours) % len(PALETTE)])
            estimated = j < len(methods) and methods[j] == "slq"
            err = None
            if err_da is not None and err_da.sizes.get("step") == da.sizes["step"]:
                values = err_da.isel({unit: j}).values
                err = values if np.nanmax(np.append(values, 0.0)) > 0 else None
            fig.add_trace(go.Scatter(
                x=da["step"].values, y=da.isel({unit: j}).values, mode="lines+markers" if err is not None else "lines",
                name=f"{name}{' (estimated)' if estimated else ''} · {run}",
                line={"color": colour, "dash": DASHES[r % len(DASHES)], "width": 1.5},
                error_y=({"type": "data", "array": err, "visible": True, "thickness": 1, "width": 2}
                         if err is not None else None),
                customdata=err,
                hovertemplate=(f"run {run}<br>{unit} {name}<br>step %{{x}}<br>value %{{y:.4g}}"
                               + (" ± %{customdata:.2g} (SLQ bound)" if err is not None else "") + "<extra></extra>"),
            ))
            if burn_in:
                values = np.asarray(da.isel({unit: j}).values, dtype=np.float64)
                start = settled_from(values).start
                if start is not None:
                    step = int(da["step"].values[start])
                    fig.add_trace(go.Scatter(
                        x=[step], y=[values[start]], mode="markers", name=f"settled · {name} · {run}",
                        marker={"color": colour, "symbol": "diamond", "size": 9}, showlegend=False,
                        hovertemplate=(f"run {run}<br>{unit} {name}<br>settled from step {step} (the burn-in is "
                                       "before it)<extra></extra>")))
    if threshold is not None:
        fig.add_hline(y=threshold[0], line={"color": "crimson", "dash": "dash"}, annotation_text=threshold[1],
                      annotation_position="bottom right")
    return _layout(fig, title, "step", y, log_y=log_y)


def scalar_lines(series: Mapping[str, pd.Series], title: str, y: str, log_y: bool = False) -> go.Figure:
    """One line per named series indexed by step (run-level quantities such as loss or NDS)."""
    fig = go.Figure()
    for i, (name, s) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=s.index.values, y=s.values, mode="lines", name=name,
                                 line={"color": PALETTE[i % len(PALETTE)], "width": 1.5},
                                 hovertemplate=f"{name}<br>step %{{x}}<br>value %{{y:.4g}}<extra></extra>"))
    return _layout(fig, title, "step", y, log_y=log_y)


def spectra(curves: Sequence[tuple[str, str, int, np.ndarray]], title: str, y: str) -> go.Figure:
    """Log-log rank–value plots; each curve is (run, layer or module, step, values by rank)."""
    fig = go.Figure()
    colours: dict[str, str] = {}
    for run, name, step, values in curves:
        v = np.asarray(values, dtype=np.float64)
        keep = np.isfinite(v) & (v > 0)
        rank = np.arange(1, v.size + 1)[keep]
        colour = colours.setdefault(f"{run}|{step}", PALETTE[len(colours) % len(PALETTE)])
        fig.add_trace(go.Scatter(
            x=rank, y=v[keep], mode="lines", name=f"{name} · {run} · step {step}",
            line={"color": colour, "width": 1.5},
            hovertemplate=f"run {run}<br>{name}<br>step {step}<br>rank %{{x}}<br>value %{{y:.4g}}<extra></extra>",
        ))
    return _layout(fig, title, "rank", y, log_x=True, log_y=True)


def scaling(tidy: pd.DataFrame, fits: pd.DataFrame, target_size: float | None, metric: str,
            against: str = "model_size") -> go.Figure:
    """Settled values against model size (or the run attribute ``against``, e.g. ``width``) on log-log axes, per
    layer group: the points, the fitted power law, its 95% band (slope within its t-interval, pivoting at the mean
    log size), extended to ``target_size`` when given."""
    fig = go.Figure()
    for i, (_, fit) in enumerate(fits.iterrows()):
        colour = PALETTE[i % len(PALETTE)]
        pts = tidy[tidy["group"] == fit["group"]] if "group" in tidy.columns else tidy.iloc[:0]
        per_run = pts.groupby(["run", "size"], as_index=False)["value"].median()
        fig.add_trace(go.Scatter(
            x=per_run["size"], y=per_run["value"], mode="markers", name=str(fit["group"]), legendgroup=str(fit["group"]),
            marker={"color": colour, "size": 8}, customdata=np.stack([per_run["run"].astype(str)], axis=-1),
            hovertemplate=(f"group {fit['group']}<br>run %{{customdata[0]}}<br>size %{{x:.4g}}<br>"
                           f"{metric} %{{y:.4g}}<extra></extra>"),
        ))
        sizes = per_run["size"].to_numpy(dtype=float)
        if sizes.size == 0:
            continue
        hi = max(float(sizes.max()), float(target_size or 0))
        xs = np.geomspace(float(sizes.min()), hi, 60)
        u = np.log(xs)
        ubar = float(np.mean(np.log(sizes)))
        centre = fit["intercept"] + fit["slope"] * ubar  # the fitted line passes through (ū, v̄)
        band = np.stack([centre + b * (u - ubar) for b in (fit["ci_low"], fit["ci_high"])])
        fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]),
                                 y=np.exp(np.concatenate([band.max(0), band.min(0)[::-1]])),
                                 fill="toself", fillcolor=colour, opacity=0.15, line={"width": 0},
                                 legendgroup=str(fit["group"]), showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(
            x=xs, y=np.exp(fit["intercept"] + fit["slope"] * u), mode="lines", legendgroup=str(fit["group"]),
            line={"color": colour}, showlegend=False,
            hovertemplate=(f"group {fit['group']}<br>slope {fit['slope']:.3f} "
                           f"[{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]<br>size %{{x:.4g}}<br>fit %{{y:.4g}}"
                           "<extra></extra>"),
        ))
    if target_size:
        fig.add_vline(x=target_size, line={"color": "grey", "dash": "dash"}, annotation_text="target size")
    x_title = "model size (parameters)" if against == "model_size" else against
    return _layout(fig, f"settled {metric} against {x_title.split(' (')[0]}", x_title, metric, log_x=True, log_y=True)


SEVERITY_COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}


def alert_timeline(spans: Sequence[Mapping], last_step: int, run: str) -> go.Figure:
    """One bar per health alert from the step it started to the step it ended (or the run's last record, while
    active), a row per rule and layer, coloured by severity."""
    fig = go.Figure()
    shown: set[str] = set()
    for s in spans:
        end = s["end"] if s["end"] is not None else last_step
        label = f"{s['rule']} · {s['layer']}"
        fig.add_trace(go.Scatter(
            x=[s["start"], max(end, s["start"])], y=[label, label], mode="lines+markers",
            line={"color": SEVERITY_COLOURS.get(s["severity"], "grey"), "width": 8}, name=s["severity"],
            legendgroup=s["severity"], showlegend=s["severity"] not in shown,
            hovertemplate=(f"run {run}<br>{s['severity']} {label}<br>steps {s['start']}–"
                           f"{'active' if s['end'] is None else s['end']}<br>value {s['value']:.4g}<extra></extra>"),
        ))
        shown.add(s["severity"])
    _layout(fig, f"health alerts · {run}", "step", "rule · layer")
    fig.update_layout(height=max(HEIGHT, 22 * len({f"{s['rule']} · {s['layer']}" for s in spans}) + 140))
    return fig
