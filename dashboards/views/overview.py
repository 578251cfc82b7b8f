"""Runs overview: every run under the folder with its size, optimizer, steps, status and last update,
refreshed in place while runs are live; stores that cannot be read are listed with the reason."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from spectralscope.dashboards import common, data

common.header("Runs", "Every store under the runs folder. Live runs refresh in place every few seconds.")
common.selected_runs()  # the sidebar picker, shared with the other pages


@st.fragment(run_every=common.REFRESH)
def table() -> None:
    root = common.runs_dir()
    try:
        entries = data.find_runs(root, storage_options=common.storage_options())  # uncached: the live view
    except FileNotFoundError as exc:
        st.error(str(exc))
        return
    if not entries:
        st.info(f"No runs under {root} yet.")
        return
    frame = data.overview(entries, common.storage_options())
    if len(frame):
        live = int((frame["status"] == "running").sum())
        c1, c2, c3 = st.columns(3)
        c1.metric("runs", len(frame))
        c2.metric("live", live)
        c3.metric("steps recorded", int(frame["steps"].sum()))
        st.table(frame.set_index("run"))
    problems = [e for e in entries if not e.ok]
    if problems:
        st.subheader("Not readable")
        st.table(pd.DataFrame({"store": [e.rel for e in problems], "problem": [e.problem for e in problems]})
                 .set_index("store"))


table()
