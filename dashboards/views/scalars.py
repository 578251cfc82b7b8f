"""Scalars: what ``rec.log`` recorded (the loss, a learning rate, …) per run over the steps, runs overlaid,
with an optional moving average and log axis."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from spectralscope.dashboards import charts, common, data

common.header("Scalars", "Values passed to rec.log(name=value) at each step, per run.")
runs = [e for e in common.selected_runs() if common.steps(e, "scalars")]

if not runs:
    st.info("None of the selected runs logged scalars yet (rec.log(loss=loss) after each step).")
else:
    names = list(dict.fromkeys(v for e in runs for v in data.variables(e.path, "scalars", common.storage_options())))
    c1, c2, c3 = st.columns([2, 1, 1])
    chosen = c1.multiselect("scalars", names, default=names[:4], key="sc-names")
    smooth = c2.slider("moving average (steps)", 1, 200, 1, key="sc-smooth")
    log = c3.toggle("log y axis", value=False, key="sc-log")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        for name in chosen:
            series = {}
            for e in runs:
                da = common.read(e, "scalars", name, optional=True)  # runs log different names
                if da is None or da.sizes["step"] == 0:
                    continue
                s = pd.Series(da.values, index=da["step"].values)
                series[e.rel] = s.rolling(smooth, min_periods=1).mean() if smooth > 1 else s
            if not series:
                st.caption(f"{name}: not logged by the selected runs")
                continue
            st.plotly_chart(charts.scalar_lines(series, name + (f" (moving average of {smooth})" if smooth > 1 else ""),
                                                name, log_y=log), key=f"scalar-{name}")

    charts_()
