"""Entry point of the dashboard: ``spectralscope dashboard RUNS_DIR`` runs ``streamlit run`` on this file.

Every page lives in ``views/``; `st.navigation` lists them in the sidebar, above the run picker. Each has a
URL of its own (``/optimizer``, ``/scaling``, …); the runs overview is served at ``/`` and at ``/runs``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="spectralscope", layout="wide")

PAGES = [
    st.Page(HERE / "views" / "overview.py", title="Runs", url_path="overview", default=True),
    # the default page is served at "/" whatever its url_path: this hidden twin makes /runs a link that works
    st.Page(HERE / "views" / "overview.py", title="Runs", url_path="runs", visibility="hidden"),
    st.Page(HERE / "views" / "optimizer.py", title="Optimizer spectra", url_path="optimizer"),
    st.Page(HERE / "views" / "newton_schulz.py", title="NS residuals", url_path="newton-schulz"),
    st.Page(HERE / "views" / "updates.py", title="Neurons and updates", url_path="updates"),
    st.Page(HERE / "views" / "activations.py", title="Activations", url_path="activations"),
    st.Page(HERE / "views" / "gradients.py", title="Gradients", url_path="gradients"),
    st.Page(HERE / "views" / "sharpness.py", title="Sharpness", url_path="sharpness"),
    st.Page(HERE / "views" / "scalars.py", title="Scalars", url_path="scalars"),
    st.Page(HERE / "views" / "scaling.py", title="Scaling laws", url_path="scaling"),
    st.Page(HERE / "views" / "health.py", title="Health", url_path="health"),
    st.Page(HERE / "views" / "compare.py", title="Compare optimizers", url_path="compare"),
]

st.navigation(PAGES).run()
