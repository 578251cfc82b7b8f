"""The Streamlit dashboard of spectralscope (installed as ``spectralscope.dashboards``)."""
