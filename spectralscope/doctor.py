"""``spectralscope doctor RUN``: a run's health alerts (`spectralscope.health`) with what to do about each, and an
exit status a CI pipeline can use: 0 when nothing is above ``warning``, 1 on a ``critical`` alert (2, a usage
error, is the CLI's).

A run recorded with the health rules (the default) holds its alerts in the ``health`` group. A run recorded without
them (``watch(health=None)``, or before they existed) is checked now: the built-in rules are replayed over its
stored records in step order, as the recorder would have run them (rules a user passed to ``watch`` are not known
here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import health, schema
from .store import optimizer_entries, unit_dim

#: the groups the built-in rules read
RULE_GROUPS = ("optimizer", "sharpness", "attention", "weights", "scalars")


def _text(values) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def recorded_events(tree) -> list[dict[str, Any]]:
    """The start/end rows of a run's ``health`` group, in order."""
    ds = tree["health"].dataset
    return health.events({v: ds[v].values for v in ("step", "value", *schema.HEALTH.strings())})


def _layer_info(tree) -> dict[str, health.LayerInfo]:
    """Each optimizer-group layer's shape and the NS steps/coefficients its optimizer's entry records."""
    if "optimizer" not in tree.children:
        return {}
    ds = tree["optimizer"].dataset
    entries = optimizer_entries(dict(tree.attrs))
    by_class = {e.get("class"): e for e in entries}
    names = _text(ds["layer"].values)
    owners = _text(ds["optimizer"].values) if "optimizer" in ds.coords else [entries[0].get("class")] * len(names)
    out = {}
    for i, name in enumerate(names):
        e = by_class.get(owners[i], entries[0] if entries else {})
        coeffs = e.get("ns_coefficients")
        out[name] = health.LayerInfo(int(ds["rows"].values[i]), int(ds["cols"].values[i]), e.get("ns_steps"),
                                     tuple(tuple(c) for c in coeffs) if isinstance(coeffs, list) and coeffs and
                                     isinstance(coeffs[0], list) else coeffs)
    return out


def replayed_events(tree) -> list[dict[str, Any]]:
    """The events the built-in rules raise over a run's stored records, replayed in step order."""
    monitor = health.Monitor(health.RULES, _layer_info(tree), float(tree.attrs.get("ns_floor", 0.5)))
    records = []
    for group in RULE_GROUPS:
        if group not in tree.children:
            continue
        ds = tree[group].dataset
        if "bucket" in ds.dims:
            ds = ds.sel(bucket="all")
        unit = unit_dim(ds.dims)
        units = _text(ds[unit].values) if unit else []
        levels = ds["quantile"].values.tolist() if "quantile" in ds.dims else []
        data = {v: np.asarray(ds[v].values) for v in ds.data_vars}
        for i, step in enumerate(ds["step"].values.tolist()):
            records.append((step, group, {v: a[i] for v, a in data.items()}, units, levels))
    events = []
    for step, group, row, units, levels in sorted(records, key=lambda r: (r[0], RULE_GROUPS.index(r[1]))):
        events += [{"step": e.step, **e.row()} for e in monitor.observe(group, step, row, units, levels)]
    return events


def alerts(tree) -> tuple[pd.DataFrame, str]:
    """The run's alerts as spans (`health.spans`: rule, group, layer, severity, start, end, value, message), most
    severe first, and where they come from: ``recorded`` or ``replayed``."""
    recorded = "health" in tree.children
    spans = health.spans(recorded_events(tree) if recorded else replayed_events(tree))
    cols = ["severity", "rule", "group", "layer", "start", "end", "value", "message"]
    frame = pd.DataFrame(spans, columns=cols)
    if len(frame):
        rank = frame["severity"].map({s: -i for i, s in enumerate(health.SEVERITIES)})
        frame = frame.assign(_r=rank).sort_values(["_r", "start", "rule", "layer"], kind="stable").drop(columns="_r")
    return frame.reset_index(drop=True), "recorded" if recorded else "replayed"


def report(tree, name: str) -> tuple[str, int]:
    """``doctor``'s text and exit status (0: nothing above warning; 1: a critical alert)."""
    frame, source = alerts(tree)
    counts = frame["severity"].value_counts().to_dict() if len(frame) else {}
    said = ", ".join(f"{counts[s]} {s}" for s in reversed(health.SEVERITIES) if counts.get(s))
    how = ("from its health group" if source == "recorded" else
           "replayed now over its stored records (recorded without health rules)")
    lines = [f"{name}: {len(frame)} alert{'s' if len(frame) != 1 else ''}{f' ({said})' if said else ''}, {how}"]
    if len(frame):
        by_rule = frame.groupby(["severity", "rule"], sort=False).size()
        lines.append("by rule: " + ", ".join(f"{rule} ×{n} ({sev})" for (sev, rule), n in by_rule.items()))
    for r in frame.itertuples():
        until = "still active at the last record" if r.end is None or pd.isna(r.end) else f"ended at step {int(r.end)}"
        where = "" if r.layer == "*" else f" {r.layer}"
        lines += [f"{r.severity.upper():<8} {r.rule}{where}: from step {r.start}, {until} (value {r.value:.4g})",
                  f"         {r.message}"]
    if not len(frame):
        lines.append("healthy: no rule raised an alert")
    return "\n".join(lines), 1 if counts.get("critical") else 0
