"""Optimizers side by side: the comparisons of the papers this tool serves, read from a sweep of runs.

Per optimizer (the run's ``meta["optimizer"]``, else its class):
- **momentum-quantile exponents**: `fit_scaling` of ``momentum_sv`` against model size, by optimizer, kind and
  depth (the full table), and by optimizer and kind (the summary, the layers of a kind in one run by their median);
- **activation rank exponents**: ``act_soft_rank`` and ``act_hard_rank`` against the swept width (``width`` or
  ``ffn_width`` in meta), by optimizer and kind, with their 95% t-intervals; the FFN activation is the input
  of ``mlp_out``;
- **per token-frequency bucket** (runs recorded with ``ActivationSpectra(buckets=...)``): the same rank exponents
  on the rows of each bucket's tokens (``activations["act_hard_rank@tail"]``), the tail-token question of the
  associative-memory view;
- **the μP spectral condition** (`derived`): exponents of ``mup_weight_ratio`` and ``mup_update_ratio`` against
  the swept width, by optimizer and kind; ``holds`` where the 95% interval contains 0;
- **per run** (the settled window, the second half of the recorded steps, as the fits use): the final loss
  (median of the last tenth of ``loss``), NDS over the first and the second half of the probes, the within-layer
  share Σ_l nds_within[l]/nds over the second half, the update isotropy update_erank/min(rows, cols) and the
  neuron-norm CV (medians over layers of each layer's median over the window; ``neuron_cv_tall`` over the layers
  with rows > cols, where an orthogonalised update's row norms are uneven), the self-check's median.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fit import fit_scaling, recommend_ns_steps, window_rows

#: The momentum quantiles of the summary.
LEVELS = (0.1, 0.5, 0.9)
#: The activation whose rank the spectral-scaling-laws papers fit: the FFN hidden layer, the input of mlp_out.
FFN_KIND = "mlp_out"


@dataclass
class Comparison:
    """What `comparison` read and fitted; every table is a pandas DataFrame."""

    swept: str  # the size the activation ranks are fitted against (``width`` or ``ffn_width``)
    runs: list[str]
    per_run: object  # one row per run
    momentum: object  # fit_scaling(momentum_sv) by optimizer, kind, depth
    momentum_kind: object  # the same by optimizer and kind
    activations: dict[str, object]  # act_soft_rank, act_hard_rank (and "@bucket"): by optimizer and kind, vs ``swept``
    settled: object  # the settled values behind the by-kind fits: optimizer, kind, metric, quantile, size, value
    nds: object  # step, optimizer, size, nds, within, cross
    recommendation: object | None
    target_size: float
    notes: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)  # the token-frequency buckets every run recorded
    mup: dict[str, object] = field(default_factory=dict)  # mup_weight_ratio / mup_update_ratio fits, with ``holds``

    def write_csv(self, folder: str | Path) -> list[Path]:
        """Write the full tables as CSV files into ``folder``; return their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tables = {"runs.csv": self.per_run, "fits_momentum.csv": self.momentum,
                  "fits_momentum_by_kind.csv": self.momentum_kind, "settled.csv": self.settled, "nds.csv": self.nds}
        for metric, t in self.activations.items():
            tables[f"fits_{metric.replace('@', '_')}.csv"] = t
        for metric, t in self.mup.items():
            tables[f"fits_{metric}.csv"] = t
        if self.recommendation is not None:
            tables["ns_steps.csv"] = self.recommendation
        paths = []
        for name, table in tables.items():
            if table is None or len(table) == 0:
                continue
            table.to_csv(folder / name, index=False)
            paths.append(folder / name)
        return paths


def optimizer_name(attrs: dict) -> str:
    """The run's optimizer as the demo names it (``meta["optimizer"]``), else its watched class(es)."""
    from .fit import run_labels

    meta = attrs.get("meta") if isinstance(attrs.get("meta"), dict) else {}
    if meta.get("optimizer"):
        return str(meta["optimizer"])
    label = run_labels(attrs)["optimizer"]
    return "+".join(c.rsplit(".", 1)[-1] for c in label.split("+")) if label else "unknown"


def _median(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmedian(a)) if np.isfinite(a).any() else float("nan")


def _layer_medians(da, i0: int, i1: int) -> np.ndarray:
    v = np.asarray(da.values[i0:i1], dtype=np.float64)
    return np.array([_median(v[:, j]) for j in range(v.shape[1])]) if v.size else np.array([])


def _size_of(attrs: dict, swept: str) -> float:
    meta = attrs.get("meta") if isinstance(attrs.get("meta"), dict) else {}
    return float(attrs[swept] if swept in attrs else meta.get(swept, np.nan))


def run_row(tree, swept: str) -> dict:
    """One run's summary row (see the module docstring); NaN where a group was not recorded."""
    attrs = dict(tree.attrs)
    meta = attrs.get("meta") if isinstance(attrs.get("meta"), dict) else {}
    row = {"optimizer": optimizer_name(attrs), "size": _size_of(attrs, swept),
           "model_size": float(attrs.get("model_size", np.nan)), "lr": meta.get("lr"),
           "final_loss": np.nan, "nds_early": np.nan, "nds_late": np.nan, "within_share": np.nan,
           "update_isotropy": np.nan, "neuron_cv": np.nan, "neuron_cv_tall": np.nan,
           "ns_consistency": np.nan}
    if "scalars" in tree.children and "loss" in tree["scalars"].dataset:
        loss = np.asarray(tree["scalars"].dataset["loss"].values, dtype=np.float64)
        row["final_loss"] = _median(loss[-max(1, len(loss) // 10):])
    if "optimizer" in tree.children:
        ds = tree["optimizer"].dataset
        i0, i1 = window_rows(ds.sizes.get("step", 0), (0.5, 1.0))
        if ds.sizes.get("step", 0):
            r = np.minimum(ds["rows"].values, ds["cols"].values).astype(np.float64)
            row["update_isotropy"] = _median(_layer_medians(ds["update_erank"], i0, i1) / r)
            cv = _layer_medians(ds["neuron_cv"], i0, i1)
            row["neuron_cv"] = _median(cv)
            tall = ds["rows"].values > ds["cols"].values  # where Muon's row norms are leverage scores
            row["neuron_cv_tall"] = _median(cv[tall]) if tall.any() else np.nan
            row["ns_consistency"] = _median(_layer_medians(ds["ns_consistency"], i0, i1))
    probes = nds_series(tree, swept)
    nds, half = probes["nds"].to_numpy(np.float64), len(probes) // 2
    if len(nds) >= 2:
        row["nds_early"], row["nds_late"] = _median(nds[:half]), _median(nds[half:])
    if len(nds) and "sharpness" in tree.children and "nds_within" in tree["sharpness"].dataset:
        row["within_share"] = _median((probes["within"].to_numpy(np.float64) / nds)[half:])
    return row


def nds_series(tree, swept: str):
    """The sharpness probes of one run: step, optimizer, size, nds, within = Σ_l nds_within[l], cross."""
    import pandas as pd

    attrs = dict(tree.attrs)
    cols = ["step", "optimizer", "size", "nds", "within", "cross"]
    if "sharpness" not in tree.children:
        return pd.DataFrame(columns=cols)
    sh = tree["sharpness"].dataset
    nds = np.asarray(sh["nds"].values, dtype=np.float64)
    within = (np.nansum(np.asarray(sh["nds_within"].values, dtype=np.float64), axis=1) if "nds_within" in sh
              else np.full_like(nds, np.nan))
    cross = np.asarray(sh["nds_cross"].values, dtype=np.float64) if "nds_cross" in sh else np.full_like(nds, np.nan)
    return pd.DataFrame({"step": sh["step"].values, "optimizer": optimizer_name(attrs),
                         "size": _size_of(attrs, swept), "nds": nds, "within": within, "cross": cross})


def _with_names(fits, names: dict[str, str]):
    """Replace the optimizer class column of a fit table by the demo's names (``muon``), where the runs say them."""
    if fits is not None and "optimizer" in fits.columns:
        fits = fits.assign(optimizer=fits["optimizer"].map(lambda c: names.get(c, c)))
    return fits


def common_buckets(trees) -> list[str]:
    """The token-frequency buckets (other than ``all``) every run's activations were recorded with."""
    sets = [[str(b) for b in t["activations"]["bucket"].values] if "activations" in t.children
            and "bucket" in t["activations"].dims else [] for t in trees]
    return [b for b in sets[0] if b != "all" and all(b in s for s in sets)] if sets else []


def _settled_points(runs: Sequence[str], trees, metric: str, size: str, levels, names: dict[str, str],
                    bucket: str = "all"):
    """The per-run, per-kind settled values a by-kind fit is made of (the layers of a kind by their median), from
    the runs already opened (``trees``, one per path of ``runs``)."""
    import pandas as pd

    from .fit import run_labels, settled_values

    frames = []
    for path, tree in zip(runs, trees, strict=True):
        try:
            f = settled_values(tree, metric, None, size, (0.5, 1.0), path, bucket)
        except ValueError:
            continue
        if levels is not None:
            f = f[np.isclose(f["quantile"].to_numpy()[:, None], np.asarray(levels)[None]).any(1)]
        f = f.assign(optimizer=names.get(run_labels(dict(tree.attrs))["optimizer"], optimizer_name(dict(tree.attrs))))
        frames.append(f.groupby(["optimizer", "kind", "quantile", "size"], dropna=False)["value"].median()
                      .reset_index().assign(metric=metric, bucket=bucket))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def swept_size(trees) -> str:
    """What a sweep varies, from its runs' meta: ``ffn_width`` for the demo's ffn sweep, else ``width`` where every
    run states it and it differs, else ``model_size``."""
    metas = [t.attrs.get("meta") if isinstance(t.attrs.get("meta"), dict) else {} for t in trees]
    if metas and all(m.get("sweep") == "ffn" for m in metas):
        return "ffn_width"
    if metas and all("width" in m for m in metas) and len({m["width"] for m in metas}) > 1:
        return "width"
    return "model_size"


def comparison(runs: Sequence[str] | Mapping[str, Any], swept: str | None = None,
               target_size: float | None = None) -> Comparison:
    """Read and fit a sweep of runs of several optimizers (see the module docstring): their paths, or a mapping of
    paths to their opened trees (``ss.open_run``). ``swept``: the size the activation ranks are fitted against
    (default `swept_size`); ``target_size``: the model size the NS recommendation is made for (default 10× the
    largest run)."""
    import pandas as pd

    from .fit import run_labels
    from .store import open_run

    # every fit reads these trees: each store is opened and checked once
    opened = {str(r): t for r, t in runs.items()} if isinstance(runs, Mapping) else {str(r): open_run(r) for r in runs}
    runs, trees = list(opened), list(opened.values())
    if not runs:
        raise ValueError("compare: no runs given")
    swept = swept or swept_size(trees)
    names = {run_labels(dict(t.attrs))["optimizer"]: optimizer_name(dict(t.attrs)) for t in trees}
    notes: list[str] = []
    per_run = pd.DataFrame([{**run_row(t, swept), "run": r} for t, r in zip(trees, runs, strict=True)])
    untall = [f"{Path(r).parent.name}/{Path(r).name}" for r, v in zip(runs, per_run["neuron_cv_tall"], strict=True)
              if np.isnan(v)]
    if untall:
        notes.append(f"neuron_cv_tall is NaN where a run has no layer with rows > cols or no update recorded: "
                     f"{', '.join(untall[:6])}{' …' if len(untall) > 6 else ''}")
    order = {o: i for i, o in enumerate(dict.fromkeys(per_run["optimizer"]))}  # as the runs were given
    per_run = per_run.sort_values(["optimizer", "size"], key=lambda s: s.map(order) if s.name == "optimizer" else s)
    nds = pd.concat([nds_series(t, swept) for t in trees], ignore_index=True)
    by3, by2 = ("optimizer", "kind", "depth"), ("optimizer", "kind")
    momentum = _with_names(fit_scaling(opened, "momentum_sv", by=by3), names)
    momentum_kind = _with_names(fit_scaling(opened, "momentum_sv", by=by2), names)
    activations = {}
    for metric in ("act_soft_rank", "act_hard_rank"):
        try:
            activations[metric] = _with_names(fit_scaling(opened, metric, by=by2, size=swept), names)
        except ValueError as exc:
            notes.append(f"{metric} against {swept} not fitted: {exc}")
    from .derived import DERIVED, holds

    mup = {}
    for metric in DERIVED:
        try:
            fits = _with_names(fit_scaling(opened, metric, by=by2, size=swept), names)
            mup[metric] = holds(fits)
        except ValueError as exc:
            notes.append(f"{metric} against {swept} not fitted: {exc}")
    buckets = common_buckets(trees)
    for metric in ("act_soft_rank", "act_hard_rank"):
        for b in buckets:
            try:
                activations[f"{metric}@{b}"] = _with_names(fit_scaling(opened, metric, by=by2, size=swept, bucket=b),
                                                           names)
            except ValueError as exc:
                notes.append(f"{metric} of bucket {b} against {swept} not fitted: {exc}")
    settled = pd.concat([_settled_points(runs, trees, "momentum_sv", "model_size", LEVELS, names),
                         *(_settled_points(runs, trees, m.split("@")[0], swept, None, names,
                                           m.split("@")[1] if "@" in m else "all") for m in activations)],
                        ignore_index=True)
    sizes = per_run["model_size"].dropna()
    target = float(target_size or 10 * sizes.max())
    ns_fits = momentum[momentum["optimizer"].isin(
        [optimizer_name(dict(t.attrs)) for t in trees if any(e.get("ns_steps") for e in _entries(t))])]
    recommendation = None
    if len(ns_fits):
        ns_fits.attrs.update(momentum.attrs)
        recommendation = recommend_ns_steps(ns_fits, target, quantile=0.5)
    return Comparison(swept, runs, per_run.reset_index(drop=True), momentum, momentum_kind, activations, settled,
                      nds, recommendation, target, notes, buckets, mup)


def _entries(tree) -> list[dict]:
    from .store import optimizer_entries

    return optimizer_entries(dict(tree.attrs))


def _ci(fits, optimizer: str, kind: str) -> str:
    if fits is None:
        return "—"
    sel = fits[(fits["optimizer"] == optimizer) & (fits["kind"] == kind)]
    if sel.empty:
        return "—"
    r = sel.iloc[0]
    return f"{r['slope']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def summary_text(c: Comparison) -> str:
    """The comparison on one screen: exponents per optimizer, then the training-time quantities at the largest
    size, then the NS recommendation."""
    import pandas as pd

    opts = list(dict.fromkeys(c.per_run["optimizer"]))
    exp_rows = []
    for o in opts:
        mk = c.momentum_kind[c.momentum_kind["optimizer"] == o]
        row = {"optimizer": o}
        for q in LEVELS:
            s = mk[np.isclose(mk["quantile"], q)]["slope"]
            row[f"σ q{q:g}"] = f"{s.median():+.3f}" if len(s) else "—"
        row[f"soft rank β ({FFN_KIND})"] = _ci(c.activations.get("act_soft_rank"), o, FFN_KIND)
        row[f"hard rank β ({FFN_KIND})"] = _ci(c.activations.get("act_hard_rank"), o, FFN_KIND)
        if "tail" in c.buckets:
            row["tail hard β"] = _ci(c.activations.get("act_hard_rank@tail"), o, FFN_KIND)
        exp_rows.append(row)
    largest = c.per_run.loc[c.per_run.groupby("optimizer")["size"].idxmax()].set_index("optimizer").loc[opts]
    late = pd.DataFrame({
        "final loss": largest["final_loss"].map("{:.3f}".format),
        "NDS early → late": [f"{a:.3g} → {b:.3g}" for a, b in zip(largest["nds_early"], largest["nds_late"],
                                                                     strict=True)],
        "within share": largest["within_share"].map("{:.2f}".format),
        "update erank/r": largest["update_isotropy"].map("{:.3f}".format),
        "neuron CV (tall)": [f"{a:.3f} ({b:.3f})" for a, b in zip(largest["neuron_cv"], largest["neuron_cv_tall"],
                                                                  strict=True)],
    })
    lines = [
        "exponents β: momentum σ quantiles ~ model size^β (median over layer kinds);",
        f"activation ranks of the FFN hidden layer ~ {c.swept}^β [95% t-interval]:",
        pd.DataFrame(exp_rows).to_string(index=False),
        "",
        f"at the largest {c.swept} ({int(largest['size'].max())}), settled (second half of the run):",
        late.to_string(),
    ]
    if c.recommendation is not None and len(c.recommendation):
        now = c.recommendation["current_steps"].dropna()
        lines += ["", f"Newton–Schulz steps for σ_0.5 at {c.target_size:.3g} parameters (the most any layer group "
                      f"needs{f'; the runs use {int(now.iloc[0])}' if len(now) else ''}):"]
        for o, g in c.recommendation.groupby("optimizer", sort=False):
            steps = g["ns_steps"].dropna()
            worst = g.loc[g["sigma"].idxmin()]
            lines.append(f"  {o}: {int(steps.max()) if len(steps) else '—'} steps (lowest σ_0.5 "
                         f"{worst['sigma']:.3g} in {worst['group']})")
    if c.mup:
        lines += ["", f"μP spectral condition: exponent of the ratio against {c.swept}, per layer kind (holds: its 95% "
                      "interval contains 0):"]
        for o in opts:
            for metric, label in (("mup_weight_ratio", "‖W‖₂/sqrt(rows/cols) "),
                                  ("mup_update_ratio", "‖ΔW‖₂·sqrt(cols/rows)")):
                t = c.mup.get(metric)
                if t is None:
                    continue
                t = t[t["optimizer"] == o]
                fails = ", ".join(f"{r.kind} {r.slope:+.2g}" for r in t.itertuples() if not r.holds)
                lines.append(f"  {o:<8} {label} holds in {int(t['holds'].sum())}/{len(t)} kinds"
                             + (f"; not in {fails}" if fails else ""))
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)
