"""Health: the alerts the health rules raised in each selected run (`spectralscope.health`), as a timeline and a
table with what to do about each, and the attention logits that MuonClip watches, against its τ."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from spectralscope import health
from spectralscope.dashboards import charts, common, data

common.header("Health", "Each alert starts at the first record a rule finds it and ends at the first that no longer "
              "does; `spectralscope doctor RUN` prints the same. Severity: info < warning < critical.")
runs = common.selected_runs()


@st.cache_data(show_spinner=False, max_entries=256)
def events(path: str, rows: int) -> list[dict] | None:
    return data.health_events(path, common.storage_options())


if runs:
    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        for e in runs:
            found = events(str(e.path), common.n_rows(str(e.path)).get("health", 0))
            st.subheader(f"{e.rel}: {data.health_badge(found)}")
            if found is None:
                st.caption(f"{e.rel} was recorded without health rules (watch(health=None)); `spectralscope doctor "
                           f"{e.rel}` replays them over its records")
                continue
            spans = health.spans(found)
            if not spans:
                continue
            steps = common.steps(e, "optimizer") or [max(s["start"] for s in spans)]
            st.plotly_chart(charts.alert_timeline(spans, int(max(steps)), e.rel), key=f"health-{e.rel}")
            table = pd.DataFrame(spans, columns=["severity", "rule", "layer", "start", "end", "value", "message"])
            st.dataframe(table.assign(end=table["end"].astype("Int64")), hide_index=True, key=f"health-table-{e.rel}")
        logits = {e.rel: d.max("head", skipna=True) for e in runs
                  if (d := common.read(e, "attention", "attn_logit_max", optional=True)) is not None}
        if logits:
            tau = health.Thresholds().max_logit
            st.plotly_chart(charts.lines(logits, "max attention logit per module (its largest head)", "max q·k scale",
                                         log_y=True, threshold=(tau, f"τ = {tau:g} (MuonClip)")), key="health-logits")

    charts_()
