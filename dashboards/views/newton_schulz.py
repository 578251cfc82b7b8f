"""NS residuals: how far the Newton–Schulz output O is from an orthogonal matrix, per layer over time —
ns_polar_err = sqrt(mean (σ_i(O) − 1)²), ns_orth_err = ‖O Oᵀ − I‖_F/√r — and σ(O) at a chosen quantile."""

from __future__ import annotations

import streamlit as st

from spectralscope.dashboards import charts, common

common.header("NS residuals", "Distance of the Newton–Schulz output O from the polar factor UVᵀ (NaN for "
              "optimizers without NS).")
runs = common.selected_runs()

if runs:
    q = common.quantile_picker(runs, "ns_out_sv", "quantile of σ(O)", 0.0, "ns-quantile")
    units = common.layer_picker(runs, "optimizer")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        for var, title, log in (("ns_polar_err", "polar error sqrt(mean (σ(O) − 1)²)", True),
                                ("ns_orth_err", "orthogonality error ‖O Oᵀ − I‖_F / √r", True)):
            series = {e.rel: d for e in runs if (d := common.read(e, "optimizer", var, units=units)) is not None}
            st.plotly_chart(charts.lines(series, title, var, log_y=log), key=f"ns-{var}")
        series = {e.rel: d for e in runs
                  if (d := common.read(e, "optimizer", "ns_out_sv", quantile=q, units=units)) is not None}
        st.plotly_chart(charts.lines(series, f"σ(O) at q={q:g}", "σ(O)", threshold=(1.0, "orthogonal"),
                                     errors=common.bounds(runs, "ns_out_sv", q, units)), key="ns-out-sv")

    charts_()
