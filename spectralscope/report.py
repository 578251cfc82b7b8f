"""`report.html`: a `compare.Comparison` as one self-contained page of Plotly figures (plotly.js inlined once,
so the file opens offline), written by the demo and by ``spectralscope report RUN… -o report.html``."""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path

import numpy as np

from .compare import FFN_KIND, LEVELS, Comparison
from .fit import confidence_band

#: One colour per optimizer, the same on every figure (and on the dashboard's compare page).
COLOURS = {"muon": "#1f77b4", "adamw": "#ff7f0e", "normuon": "#2ca02c"}
_PALETTE = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def colour(optimizer: str, order: list[str]) -> str:
    """The optimizer's colour: a fixed one for the demo's, else the palette in the order the runs name them."""
    if optimizer in COLOURS:
        return COLOURS[optimizer]
    others = [o for o in order if o not in COLOURS]
    return _PALETTE[others.index(optimizer) % len(_PALETTE)] if optimizer in others else _PALETTE[0]


def _fit_traces(fig, points, optimizers: list[str], row: int, col: int, legend: bool) -> None:
    """Points, the fitted power law and its 95% confidence band, per optimizer, on one log-log panel."""
    import plotly.graph_objects as go

    for o in optimizers:
        p = points[points["optimizer"] == o].sort_values("size")
        x, y = p["size"].to_numpy(float), p["value"].to_numpy(float)
        c = colour(o, optimizers)
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=dict(color=c, size=7), name=o, legendgroup=o,
                                 showlegend=legend), row=row, col=col)
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        if np.unique(x[ok]).size < 3:
            continue
        grid = np.geomspace(x[ok].min(), x[ok].max(), 40)
        line, lo, hi = confidence_band(x, y, grid)
        fig.add_trace(go.Scatter(x=np.r_[grid, grid[::-1]], y=np.r_[hi, lo[::-1]], fill="toself", fillcolor=c,
                                 opacity=0.18, line=dict(width=0), hoverinfo="skip", legendgroup=o,
                                 showlegend=False), row=row, col=col)
        fig.add_trace(go.Scatter(x=grid, y=line, mode="lines", line=dict(color=c), legendgroup=o, showlegend=False,
                                 hoverinfo="skip"), row=row, col=col)
    fig.update_xaxes(type="log", row=row, col=col)
    fig.update_yaxes(type="log", row=row, col=col)


def momentum_figure(c: Comparison, optimizers: list[str], quantile: float = 0.5):
    """σ_q of the momentum (settled) against model size, one panel per layer kind, a fit per optimizer."""
    from plotly.subplots import make_subplots

    pts = c.settled[(c.settled["metric"] == "momentum_sv") & np.isclose(c.settled["quantile"].astype(float), quantile)]
    kinds = sorted(pts["kind"].unique())
    cols = min(3, max(1, len(kinds)))
    rows = max(1, -(-len(kinds) // cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=kinds)
    for i, k in enumerate(kinds):
        _fit_traces(fig, pts[pts["kind"] == k], optimizers, i // cols + 1, i % cols + 1, legend=i == 0)
    fig.update_layout(title=f"Momentum σ_{quantile:g} (Frobenius-normalised, settled) against model size, "
                            f"with 95% bands of the fitted line", height=300 * rows + 80)
    return fig


def activation_figure(c: Comparison, optimizers: list[str]):
    """Soft and hard rank of the FFN hidden activation against the swept width, a fit per optimizer."""
    from plotly.subplots import make_subplots

    metrics = [m for m in ("act_soft_rank", "act_hard_rank") if m in c.activations]
    fig = make_subplots(rows=1, cols=max(1, len(metrics)), subplot_titles=[m.replace("act_", "") for m in metrics])
    for i, m in enumerate(metrics):
        pts = c.settled[(c.settled["metric"] == m) & (c.settled["kind"] == FFN_KIND) & (c.settled["bucket"] == "all")]
        _fit_traces(fig, pts, optimizers, 1, i + 1, legend=i == 0)
    fig.update_xaxes(title_text=c.swept)
    fig.update_layout(title=f"Activation rank of the FFN hidden layer (input of {FFN_KIND}) against {c.swept}",
                      height=380)
    return fig


def bucket_rank_figure(c: Comparison, optimizers: list[str], metric: str = "act_hard_rank"):
    """``metric`` of the FFN hidden activation per token-frequency bucket against the swept width, a fit per
    optimizer, one panel per bucket."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(c.buckets), subplot_titles=c.buckets)
    for i, b in enumerate(c.buckets):
        pts = c.settled[(c.settled["metric"] == metric) & (c.settled["kind"] == FFN_KIND) & (c.settled["bucket"] == b)]
        _fit_traces(fig, pts, optimizers, 1, i + 1, legend=i == 0)
    fig.update_xaxes(title_text=c.swept)
    fig.update_layout(title=f"{metric.replace('act_', '')} of the FFN hidden activation per token-frequency bucket "
                            f"against {c.swept}", height=380)
    return fig


def bucket_spectra_figure(c: Comparison, optimizers: list[str]):
    """λ_i/Σλ of the FFN hidden activation (the last block's ``mlp_out`` input) at the last recorded step of each
    optimizer's largest run, one panel per token-frequency bucket."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .store import open_run

    fig = make_subplots(rows=1, cols=len(c.buckets), subplot_titles=c.buckets)
    for o in optimizers:
        d = c.per_run[c.per_run["optimizer"] == o]
        if d.empty:
            continue
        best = d.loc[d["size"].idxmax()]
        ds = open_run(best["run"])["activations"].dataset
        mods = [j for j, k in enumerate(ds["kind"].values) if str(k) == FFN_KIND]
        if not mods or not ds.sizes.get("step"):
            continue
        last = ds["act_eig"].isel(step=-1, module=mods[-1])
        for i, b in enumerate(c.buckets):
            lam = np.asarray(last.sel(bucket=b).values, dtype=np.float64)
            lam = lam[np.isfinite(lam) & (lam > 0)]
            if lam.size == 0:
                continue
            fig.add_trace(go.Scatter(x=np.arange(1, lam.size + 1), y=lam / lam.sum(), mode="lines", name=o,
                                     legendgroup=o, showlegend=i == 0, line=dict(color=colour(o, optimizers))),
                          row=1, col=i + 1)
    fig.update_xaxes(type="log", title_text="rank")
    fig.update_yaxes(type="log")
    fig.update_layout(title=f"Covariance spectrum λ_i/Σλ of the FFN hidden activation per bucket, at the largest "
                            f"{c.swept}, last recorded step", height=380)
    return fig


def nds_figure(c: Comparison, optimizers: list[str]):
    """NDS over training per optimizer (the largest size bold, the others faint), and its within-layer share."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["NDS = uᵀHu/‖u‖²", "within-layer share Σ_l nds_within/nds"])
    for o in optimizers:
        d = c.nds[c.nds["optimizer"] == o]
        sizes = sorted(d["size"].dropna().unique())
        for s in sizes:
            g = d[d["size"] == s].sort_values("step")
            big = bool(s == sizes[-1])
            style = dict(color=colour(o, optimizers), width=2.5 if big else 1)
            kw = dict(legendgroup=o, opacity=1.0 if big else 0.35, line=style, mode="lines+markers")
            fig.add_trace(go.Scatter(x=g["step"], y=g["nds"], name=f"{o} {c.swept} {s:g}", showlegend=big, **kw),
                          row=1, col=1)
            fig.add_trace(go.Scatter(x=g["step"], y=g["within"] / g["nds"], name=f"{o} {c.swept} {s:g}",
                                     showlegend=False, **kw), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title="Directional sharpness of the applied update over training", height=400)
    return fig


def balance_figure(c: Comparison, optimizers: list[str]):
    """Update isotropy (update_erank/r) and neuron-norm CV against the swept size, per optimizer."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["update isotropy: update_erank / min(rows, cols)",
                                                        "neuron-norm CV of the update"])
    for o in optimizers:
        d = c.per_run[c.per_run["optimizer"] == o].sort_values("size")
        for col, var in ((1, "update_isotropy"), (2, "neuron_cv")):
            fig.add_trace(go.Scatter(x=d["size"], y=d[var], mode="lines+markers", name=o, legendgroup=o,
                                     line=dict(color=colour(o, optimizers)), showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text=c.swept, type="log")
    fig.update_layout(title="Update isotropy and neuron balance (settled, median over layers)", height=380)
    return fig


def _table(df, floats: str = "{:.4g}") -> str:
    return df.to_html(index=False, float_format=floats.format, border=0, classes="t", na_rep="—")


def exponents_table(c: Comparison):
    """One row per optimizer and layer kind: the momentum-quantile exponents and the activation rank exponents
    with their 95% t-intervals."""
    import pandas as pd

    rows = []
    order = {o: i for i, o in enumerate(dict.fromkeys(c.per_run["optimizer"]))}
    for (_, o, k), g in c.momentum_kind.assign(order=c.momentum_kind["optimizer"].map(order)).groupby(
            ["order", "optimizer", "kind"], sort=True):
        row = {"optimizer": o, "kind": k}
        for q in LEVELS:
            s = g[np.isclose(g["quantile"], q)]
            row[f"momentum σ q{q:g} β"] = float(s["slope"].iloc[0]) if len(s) else np.nan
        for m, t in c.activations.items():
            s = t[(t["optimizer"] == o) & (t["kind"] == k)]
            row[f"{m.replace('act_', '')} β [95% CI]"] = (f"{s['slope'].iloc[0]:.3f} [{s['ci_low'].iloc[0]:.3f}, "
                                                          f"{s['ci_high'].iloc[0]:.3f}]") if len(s) else "—"
        rows.append(row)
    return pd.DataFrame(rows)


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}table.t{border-collapse:collapse;font-size:.9em}
table.t td,table.t th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}
.note{color:#666;font-size:.9em}"""


def report_html(c: Comparison, title: str = "spectralscope: optimizers compared") -> str:
    """The page: the exponents table, the scaling fits with bands, NDS over steps, update isotropy and neuron CV,
    and the per-run table; plotly.js inlined with the first figure."""
    import plotly.io as pio

    optimizers = list(dict.fromkeys(c.per_run["optimizer"]))
    figures = [("Scaling of the momentum spectrum", momentum_figure(c, optimizers)),
               ("Activation rank against the swept width", activation_figure(c, optimizers)),
               ("Curvature", nds_figure(c, optimizers)),
               ("Update isotropy and neuron balance", balance_figure(c, optimizers))]
    if c.buckets:
        figures += [("Token-frequency buckets: rank against the swept width", bucket_rank_figure(c, optimizers)),
                    ("Token-frequency buckets: spectra", bucket_spectra_figure(c, optimizers))]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>{len(c.runs)} runs, optimizers {', '.join(optimizers)}, swept {c.swept}; written "
             f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC.</p>",
             "<h2>Exponents</h2>", _table(exponents_table(c))]
    for i, (head, fig) in enumerate(figures):
        parts += [f"<h2>{html.escape(head)}</h2>",
                  pio.to_html(fig, include_plotlyjs=i == 0, full_html=False, default_width="100%")]
    parts += ["<h2>Runs</h2>", _table(c.per_run.drop(columns=["run"]))]
    parts += [f"<p class='note'>note: {html.escape(n)}</p>" for n in c.notes]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(c: Comparison, path: str | Path) -> Path:
    """Write `report_html` to ``path`` (its folder created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(c), encoding="utf-8")
    return path
