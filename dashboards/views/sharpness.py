"""Sharpness: normalised directional sharpness nds = uᵀHu/‖u‖² along each update u, the first-order gain
−gᵀu against the curvature penalty ½uᵀHu, predicted against actual loss change, and the split of nds into
within-layer and cross-layer parts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from spectralscope.dashboards import charts, common

common.header("Sharpness", "From the probe on a fixed batch: u = θ_after − θ_before, H the loss Hessian.")
runs = [e for e in common.selected_runs() if common.steps(e, "sharpness")]


def series(entry, var: str) -> pd.Series | None:
    da = common.read(entry, "sharpness", var)
    return None if da is None else pd.Series(da.values, index=da["step"].values)


if not runs:
    st.info("None of the selected runs recorded sharpness (watch(..., sharpness=ss.Sharpness(loss_fn, batch))).")
else:

    log = st.toggle("log y axis (values ≤ 0 are not drawn on it)", value=False, key="sh-log")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        nds = {e.rel: s for e in runs if (s := series(e, "nds")) is not None}
        st.plotly_chart(charts.scalar_lines(nds, "normalised directional sharpness uᵀHu/‖u‖²", "nds", log_y=log),
                        key="sh-nds")
        left, right = st.columns(2)
        gain_penalty, deltas = {}, {}
        for e in runs:
            g, c = series(e, "grad_dot_update"), series(e, "curvature")
            if g is not None and c is not None:
                gain_penalty[f"gain −gᵀu · {e.rel}"] = -g
                gain_penalty[f"penalty ½uᵀHu · {e.rel}"] = 0.5 * c
            p, a = series(e, "predicted_delta"), series(e, "actual_delta")
            if p is not None and a is not None:
                deltas[f"predicted · {e.rel}"] = p
                deltas[f"actual · {e.rel}"] = a
        left.plotly_chart(charts.scalar_lines(gain_penalty, "gain against curvature penalty", "loss units",
                                              log_y=log), key="sh-gain")
        right.plotly_chart(charts.scalar_lines(deltas, "predicted gᵀu + ½uᵀHu against actual ΔL", "ΔL"),
                           key="sh-delta")
        within = {e.rel: d for e in runs if (d := common.read(e, "sharpness", "nds_within")) is not None}
        if within:
            st.plotly_chart(charts.lines(within, "within-layer nds u_lᵀHu_l/‖u‖² (per_layer=True)", "nds_within",
                                         log_y=log), key="sh-within")
            cross = {e.rel: s for e in runs if (s := series(e, "nds_cross")) is not None}
            st.plotly_chart(charts.scalar_lines(cross, "cross-layer part nds − Σ_l within", "nds_cross"),
                            key="sh-cross")

    charts_()
