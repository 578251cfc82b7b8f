"""Neurons and updates: the realised step ΔW per layer — rms, effective rank, σ at a quantile — the balance
of its rows across output neurons (neuron_cv, neuron_norm), σ_1 of the weights, and the μP spectral condition's two
ratios (`spectralscope.derived`), which stay O(1) and flat across widths where it holds."""

from __future__ import annotations

import streamlit as st

from spectralscope.dashboards import charts, common
from spectralscope.derived import DERIVED

common.header("Neurons and updates", "ΔW = W_after − W_before. neuron_cv = std/mean of the row norms of ΔW: "
              "0 when every output neuron moves by the same amount.")
runs = common.selected_runs()

if runs:
    q = common.quantile_picker(runs, "neuron_norm", "quantile", 0.1, "upd-quantile")
    units = common.layer_picker(runs, "optimizer")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        left, right = st.columns(2)
        panels = [
            ("neuron_cv", None, "neuron balance: std(ρ)/mean(ρ) of the row norms ρ", False),
            ("neuron_norm", q, f"row norm / mean row norm at q={q:g}", False),
            ("update_rms", None, "update rms", True),
            ("update_erank", None, "effective rank of ΔW", False),
            ("update_sv", q, f"σ(ΔW) at q={q:g}", True),
            ("weight_spectral_norm", None, "σ_1(W)", True),
            ("mup_weight_ratio", None, f"μP: {DERIVED['mup_weight_ratio'].text}", True),
            ("mup_update_ratio", None, f"μP: {DERIVED['mup_update_ratio'].text}", True),
        ]
        for i, (var, level, title, log) in enumerate(panels):
            series = {e.rel: d for e in runs
                      if (d := common.read(e, "optimizer", var, quantile=level, units=units)) is not None}
            errors = common.bounds(runs, var, level, units) if var == "update_sv" else None
            (left if i % 2 == 0 else right).plotly_chart(charts.lines(series, title, var, log_y=log, errors=errors),
                                                         key=f"upd-{var}")

    charts_()
