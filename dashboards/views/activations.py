"""Activations: covariance spectra λ of the inputs of linear layers on log-log axes at chosen steps, and
their soft rank exp(H(λ/Σλ)), hard rank (Σλ)²/Σλ², tail exponent α and top-10 share over time."""

from __future__ import annotations

import streamlit as st

from spectralscope.dashboards import charts, common

common.header("Activations", "Eigenvalues of the input covariance of each watched linear layer, by rank.")
runs = [e for e in common.selected_runs() if common.steps(e, "activations")]

if not runs:
    st.info("None of the selected runs recorded activation spectra (watch(..., activations=...)).")
else:
    # q, k and v of a block read one input, so their spectra coincide: the default shows q for the three
    units = common.layer_picker(runs, "activations", label="modules", default=3, skip_kinds=("attn_k", "attn_v"))
    recorded = common.steps(runs[0], "activations")
    chosen = st.multiselect("steps", recorded, default=sorted({recorded[0], recorded[-1]}), key="act-steps")
    offered = list(dict.fromkeys(b for e in runs for b in common.buckets(str(e.path))))
    # recorded with ActivationSpectra(buckets=...): the spectra of one token-frequency bucket's rows
    bucket = st.selectbox("token bucket", offered, key="act-bucket") if offered else "all"

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        curves = common.spectrum_curves(runs, "activations", "act_eig", units, chosen, bucket)
        st.plotly_chart(charts.spectra(curves, "covariance spectrum λ_i", "λ"), key="act-spectra")
        left, right = st.columns(2)
        for i, (var, title) in enumerate((("act_soft_rank", "soft rank exp(H)"), ("act_hard_rank", "hard rank (Σλ)²/Σλ²"),
                                          ("act_tail_alpha", "tail exponent α"), ("act_top10_share", "top-10 share"))):
            series = {e.rel: d for e in runs
                      if (d := common.read(e, "activations", var, units=units, bucket=bucket)) is not None}
            (left if i % 2 == 0 else right).plotly_chart(charts.lines(series, title, var), key=f"act-{var}")

    charts_()
