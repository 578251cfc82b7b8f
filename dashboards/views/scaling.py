"""Scaling laws: the settled value of a metric (median over the last half of each run) against model size
on log-log axes, one power law per layer group with its 95% band, extrapolated to a target size, and the
fewest Newton–Schulz steps a model of that size needs (SPEC §7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from spectralscope import schema
from spectralscope.dashboards import charts, common, data
from spectralscope.derived import DERIVED, holds
from spectralscope.fit import INTERVAL_COLUMNS, fit_scaling, group_label, group_of, recommend_ns_steps, run_size
from spectralscope.store import ns_entry

common.header("Scaling laws", "Settled value = median over the chosen window of each run's committed steps; "
              "groups = layer kind @ relative depth; bands = slope within its 95% t-interval.")
runs = common.selected_runs()
SWEPT = ("width", "ffn_width")


@st.cache_data(show_spinner=False, max_entries=256)
def settled(keys: tuple[tuple[str, int], ...], metric: str, quantile: float | None,
            window: tuple[float, float], against: str) -> tuple[pd.DataFrame, list[str]]:
    entries = [e for e in common.find_runs(str(common.runs_dir())) if e.rel in dict(keys)]
    return data.settled(entries, metric, group_of(metric), quantile, window, common.storage_options(), against)


def sizes_of(runs) -> list[str]:
    """What the settled values can be fitted against: model size, and the swept widths every run's meta gives."""
    return ["model_size", *(k for k in SWEPT if all(isinstance((e.attrs.get("meta") or {}).get(k), (int, float))
                                                   for e in runs))]


def default_groups(fits: pd.DataFrame, most: int = 8) -> list[str]:
    """At most ``most`` groups to draw at first (a plot of 48 power laws with their bands is unreadable):
    the shallowest and the deepest group of each kind (of each optimizer, where they are fitted apart)."""
    picked: list[str] = []
    apart = [c for c in ("optimizer", "arch") if c in fits.columns]
    for _, g in fits.sort_values([*apart, "kind", "depth"]).groupby([*apart, "kind"], sort=True):
        picked += list(dict.fromkeys([g["group"].iloc[0], g["group"].iloc[-1]]))
    return picked[:most]


if len(runs) < 3:
    st.info("A power law needs runs of at least 3 model sizes: pick them in the sidebar.")
else:
    metrics = [*(m for names in schema.fit_metrics().values() for m in names), *DERIVED]
    c1, c2, c3, c4, c5 = st.columns(5)
    metric = c1.selectbox("metric", metrics, index=metrics.index("momentum_sv"), key="sc-metric",
                          format_func=lambda m: f"{m} = {DERIVED[m].text}" if m in DERIVED else m)
    levels = list(schema.DEFAULT_QUANTILES)
    quantile = c2.selectbox("quantile", levels, index=levels.index(0.5), key="sc-quantile") if (
        metric not in DERIVED and schema.variable(metric).quantiled) else None
    window = c3.slider("window (fraction of each run)", 0.0, 1.0, (0.5, 1.0), 0.05, key="sc-window")
    options = sizes_of(runs)
    # the μP condition is about width: fitted against it where the runs say theirs
    against = c4.selectbox("against", options, index=options.index("width") if metric in DERIVED and "width" in
                           options else 0, key="sc-against-mup" if metric in DERIVED else "sc-against")
    largest = max(run_size(e.attrs, against, e.rel) for e in runs) if against != "model_size" else max(
        float(e.attrs.get("model_size", 0) or 0) for e in runs)
    target = c5.number_input(f"target {against}", min_value=1.0, value=float(10 ** np.ceil(np.log10(largest * 10))),
                             format="%.3g", key="sc-target")

    @st.fragment(run_every=common.REFRESH)
    def charts_() -> None:
        group = group_of(metric)
        keys = tuple((e.rel, common.n_rows(str(e.path)).get(group, 0)) for e in runs)
        tidy, skipped = settled(keys, metric, quantile, tuple(window), against)
        for line in skipped:
            st.caption(f"skipped {line}")
        if tidy.empty:
            st.info(f"No committed {metric} in the selected runs.")
            return
        try:
            fits = fit_scaling(tidy, metric=metric, quantile=quantile, target_size=target)
        except ValueError as exc:
            st.warning(str(exc))
            return
        if fits.attrs.get("note"):
            st.info(fits.attrs["note"])  # unlike runs (optimizer, meta["arch"]) are fitted apart, and said so
        by = fits.attrs.get("by") or ["kind", "depth"]
        tidy = tidy.assign(group=[group_label(dict(zip(by, keys, strict=True)))
                                  for keys in tidy[by].itertuples(index=False, name=None)])
        labels = list(dict.fromkeys(fits["group"]))
        shown_groups = st.multiselect("groups drawn", labels, default=default_groups(fits), key="sc-groups")
        st.plotly_chart(charts.scaling(tidy, fits[fits["group"].isin(shown_groups)], target, metric, against),
                        key="sc-figure")
        shown = fits.drop(columns=["kind", "depth", "optimizer", "arch", *INTERVAL_COLUMNS], errors="ignore").rename(
            columns={"prediction": "at_target"})
        st.subheader("Fits")
        if metric in DERIVED:
            shown = holds(shown)
            st.caption(f"μP spectral condition: {DERIVED[metric].text} should not change with width; it holds where "
                       f"the exponent's 95% interval contains 0 ({int(shown['holds'].sum())} of {len(shown)} groups)")
        st.dataframe(shown, hide_index=True)
        if metric == "momentum_sv" and against == "model_size":
            steps = {ns_entry(e.attrs).get("ns_steps") for e in runs} - {None}
            fits.attrs["current_steps"] = steps.pop() if len(steps) == 1 else None
            st.subheader(f"Newton–Schulz steps for {target:.3g} parameters")
            try:
                rec = recommend_ns_steps(fits, target, quantile=quantile)
                st.dataframe(rec.drop(columns=["kind", "depth", "optimizer", "arch"], errors="ignore"), hide_index=True)
                if rec.attrs.get("note"):
                    st.info(rec.attrs["note"])
            except ValueError as exc:
                st.warning(str(exc))

    charts_()
