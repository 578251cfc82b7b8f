"""Gradients: singular values of the per-sample gradient matrix (rows vec(G_s)) at chosen steps, and its
soft rank over time — how many directions the samples of a batch pull in."""

from __future__ import annotations

import streamlit as st

from spectralscope.dashboards import charts, common

common.header("Gradients", "σ of the N × (m·n) matrix of per-sample weight gradients, by rank.")
runs = [e for e in common.selected_runs() if common.steps(e, "gradients")]

if not runs:
    st.info("None of the selected runs recorded per-sample gradient spectra (watch(..., gradients=...)).")
else:
    units = common.layer_picker(runs, "gradients", default=3)
    recorded = common.steps(runs[0], "gradients")
    chosen = st.multiselect("steps", recorded, default=sorted({recorded[0], recorded[-1]}), key="grad-steps")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        curves = common.spectrum_curves(runs, "gradients", "grad_sv", units, chosen)
        st.plotly_chart(charts.spectra(curves, "per-sample gradient spectrum", "σ"), key="grad-spectra")
        series = {e.rel: d for e in runs if (d := common.read(e, "gradients", "grad_soft_rank", units=units)) is not None}
        st.plotly_chart(charts.lines(series, "soft rank of the per-sample gradients", "grad_soft_rank"),
                        key="grad-soft-rank")

    charts_()
