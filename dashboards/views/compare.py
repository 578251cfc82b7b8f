"""Compare optimizers: the selected runs grouped by optimizer (the demo's ``meta["optimizer"]``, else the class),
the same figures as ``report.html`` (`spectralscope.report`), coloured by optimizer, and the summary tables of
`spectralscope.compare`."""

from __future__ import annotations

import streamlit as st

from spectralscope.compare import comparison
from spectralscope.dashboards import common
from spectralscope.report import (
    activation_figure,
    balance_figure,
    bucket_rank_figure,
    bucket_spectra_figure,
    exponents_table,
    momentum_figure,
    nds_figure,
)

common.header("Compare optimizers", "Runs grouped by optimizer; fits per optimizer with 95% bands; settled = the "
              "second half of each run's recorded steps.")
runs = [e for e in common.selected_runs() if not isinstance(e.path, str)]  # local stores (compare reads paths)


@st.cache_data(show_spinner="fitting…", max_entries=32)
def compared(keys: tuple[tuple[str, int], ...], swept: str | None):
    return comparison([k for k, _ in keys], swept=swept)


if len(runs) < 3:
    st.info("Pick runs of at least 3 sizes per optimizer in the sidebar (e.g. everything under runs/demo).")
else:
    swept = st.selectbox("activation ranks against", ["(from the runs)", "width", "ffn_width", "model_size"],
                         key="cmp-swept")

    @st.fragment(run_every=common.REFRESH)
    def page() -> None:
        keys = tuple((str(e.path), sum(common.n_rows(str(e.path)).values())) for e in runs)
        try:
            c = compared(keys, None if swept.startswith("(") else swept)
        except ValueError as exc:
            st.warning(str(exc))
            return
        optimizers = list(dict.fromkeys(c.per_run["optimizer"]))
        st.caption(f"{len(c.runs)} runs · optimizers {', '.join(optimizers)} · swept {c.swept}")
        for note in c.notes:
            st.info(note)
        st.subheader("Exponents")
        st.dataframe(exponents_table(c), hide_index=True)
        st.plotly_chart(momentum_figure(c, optimizers), key="cmp-momentum")
        st.plotly_chart(activation_figure(c, optimizers), key="cmp-act")
        st.plotly_chart(nds_figure(c, optimizers), key="cmp-nds")
        st.plotly_chart(balance_figure(c, optimizers), key="cmp-balance")
        if c.buckets:  # recorded with ActivationSpectra(buckets=...)
            st.plotly_chart(bucket_rank_figure(c, optimizers), key="cmp-bucket-rank")
            st.plotly_chart(bucket_spectra_figure(c, optimizers), key="cmp-bucket-spectra")
        st.subheader("Runs")
        st.dataframe(c.per_run, hide_index=True)

    page()
