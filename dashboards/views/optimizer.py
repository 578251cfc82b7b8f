"""Optimizer spectra: the normalised momentum spectrum σ(M/‖M‖_F) at a chosen quantile, as a layer × step
heatmap and as per-layer lines against the NS threshold, and the fraction of σ below it (ns_fail_frac)."""

from __future__ import annotations

import streamlit as st

from spectralscope.dashboards import charts, common, data
from spectralscope.newton_schulz import MUON_COEFFICIENTS, ns_threshold
from spectralscope.store import ns_entry

common.header("Optimizer spectra", "σ(M̃) of the matrix each optimizer step orthogonalises, M̃ = M/‖M‖_F. "
              "Below the dashed NS threshold, Newton–Schulz cannot lift σ to its floor in the configured steps.")
runs = common.selected_runs()


def threshold(entry: data.RunEntry) -> tuple[float, str] | None:
    """ns_threshold(k, coefficients, floor) of the run's optimizer, or None for an optimizer without NS."""
    opt = ns_entry(entry.attrs)
    k = opt.get("ns_steps")
    if not k:
        return None
    coeffs = opt.get("ns_coefficients") or MUON_COEFFICIENTS
    floor = float(entry.attrs.get("ns_floor", 0.5))
    try:
        return ns_threshold(int(k), coeffs, floor), f"NS threshold, {k} steps (floor {floor:g})"
    except ValueError:
        return None


if runs:
    c1, c2, c3 = st.columns([1, 1, 2])
    q = common.quantile_picker(runs, "momentum_sv", "quantile", 0.5, "opt-quantile", container=c1)
    heat_run = c2.selectbox("heatmap run", [e.rel for e in runs], key="opt-heat-run")
    log = c3.toggle("log colour scale", value=True, key="opt-log")
    units = common.layer_picker(runs, "optimizer")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        entry = next(e for e in runs if e.rel == heat_run)
        da = common.read(entry, "optimizer", "momentum_sv", quantile=q)
        if da is None:  # a run that has not committed yet: the other runs' lines are still drawn
            st.info(f"{entry.rel} has no committed optimizer rows yet.")
        else:
            st.plotly_chart(charts.heatmap(da, f"momentum σ̃ at q={q:g} — {entry.rel}", entry.rel, log=log),
                            key="opt-heatmap")
        series = {e.rel: d for e in runs if (d := common.read(e, "optimizer", "momentum_sv", quantile=q,
                                                               units=units)) is not None}
        thr = threshold(runs[0])
        bounds = common.bounds(runs, "momentum_sv", q, units)
        st.plotly_chart(charts.lines(series, f"momentum σ̃ at q={q:g} per layer (◆ settled from)", "σ̃", log_y=True,
                                     threshold=thr, errors=bounds, burn_in=True), key="opt-lines")
        fails = {e.rel: d for e in runs if (d := common.read(e, "optimizer", "ns_fail_frac", units=units)) is not None}
        st.plotly_chart(charts.lines(fails, "fraction of σ̃ below the NS threshold (ns_fail_frac)", "fraction"),
                        key="opt-fail")

    charts_()
