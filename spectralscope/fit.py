"""Power-law fits (SPEC §7), as pure functions on arrays.

`power_law` fits y ≈ e^a · x^b by ordinary least squares of ln y on ln x over the finite positive pairs,
with the standard error of b and its 95% t-interval on n − 2 degrees of freedom; ``offset=True`` fits
y = A·x^b + c by nonlinear least squares instead.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.stats

from . import schema


@dataclass(frozen=True)
class PowerLawFit:
    """y ≈ exp(intercept) · x^slope (+ offset). ``ci_low``/``ci_high``: the 95% t-interval of the slope;
    ``u_mean``, ``sxx``: the mean and the sum of squared deviations of ln x over the fitted pairs (for
    prediction intervals; NaN for an offset fit)."""

    slope: float
    intercept: float
    r2: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int
    offset: float = 0.0
    u_mean: float = float("nan")
    sxx: float = float("nan")

    def predict(self, x: np.ndarray | float, interval: float | None = None):
        """exp(intercept) · x^slope + offset; with ``interval`` (e.g. 0.95) the tuple (point, low, high) of the
        t-based prediction interval for a new observation at x, on the log scale:
        exp(a + b·u₀ ± t·s·sqrt(1 + 1/n + (u₀ − ū)²/Sxx)), u₀ = ln x, s = stderr·sqrt(Sxx) the residual standard
        deviation, t the two-sided ``interval`` quantile on n − 2 degrees of freedom."""
        point = np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.slope + self.offset
        if interval is None:
            return point
        if not 0 < interval < 1:
            raise ValueError(f"predict: interval must be in (0, 1), got {interval!r}")
        if self.offset != 0.0 or not np.isfinite(self.sxx):
            raise ValueError("predict: prediction intervals are for log-log fits (offset=False)")
        _, low, high = self.band(x, interval, new=True)
        return point, low, high

    def band(self, x: np.ndarray | float, level: float = 0.95, new: bool = False):
        """The log-log line at x and its ``level`` t-interval: of the mean, exp(a + b·u₀ ± t·s·sqrt(1/n +
        (u₀ − ū)²/Sxx)), or with ``new`` of a new observation (1 + 1/n + …). Returns (line, low, high)."""
        u0 = np.log(np.asarray(x, dtype=np.float64))
        s = self.stderr * np.sqrt(self.sxx)  # stderr = s/sqrt(Sxx)
        half = float(scipy.stats.t.ppf(0.5 + level / 2, self.n - 2)) * s * np.sqrt(
            float(new) + 1 / self.n + (u0 - self.u_mean) ** 2 / self.sxx)
        mid = self.intercept + self.slope * u0
        return np.exp(mid), np.exp(mid - half), np.exp(mid + half)


def power_law(x: np.ndarray, y: np.ndarray, offset: bool = False) -> PowerLawFit:
    """Fit y ≈ e^a·x^b: OLS of ln y on ln x over the pairs with both values finite and positive.

    b = Σ(u − ū)(v − v̄)/Σ(u − ū)², a = v̄ − b·ū (u = ln x, v = ln y); r² of the log-log fit;
    stderr = sqrt(Σ residual² / (n − 2) / Σ(u − ū)²); CI = b ± t_{0.975, n−2}·stderr.
    With ``offset=True``: y = A·x^b + c by least squares over the pairs with x > 0 (started from the
    log-log fit), the slope's standard error from the Jacobian and its t-interval on n − 3 degrees of
    freedom (three parameters). Raises ``ValueError`` with fewer than 3 usable pairs.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"power_law: x and y differ in length ({x.size} vs {y.size})")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    if not offset:  # y > 0 for its logarithm; with an offset y may be anything finite
        keep &= y > 0
    n = int(keep.sum())
    if n < 3:
        raise ValueError(f"power_law needs at least 3 finite positive (x, y) pairs, got {n}")
    x, y = x[keep], y[keep]
    if offset:
        return _power_law_offset(x, y)
    u, v = np.log(x), np.log(y)
    du = u - u.mean()
    sxx = float(du @ du)
    if sxx == 0:
        raise ValueError("power_law: all x are equal; the slope is undefined")
    slope = float(du @ (v - v.mean())) / sxx
    intercept = float(v.mean() - slope * u.mean())
    resid = v - (intercept + slope * u)
    ss_res, ss_tot = float(resid @ resid), float(((v - v.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    stderr = float(np.sqrt(ss_res / (n - 2) / sxx)) if n > 2 else float("nan")
    t = float(scipy.stats.t.ppf(0.975, n - 2))
    return PowerLawFit(slope, intercept, r2, stderr, slope - t * stderr, slope + t * stderr, n, u_mean=float(u.mean()),
                       sxx=sxx)


def confidence_band(x: np.ndarray, y: np.ndarray, at: np.ndarray, level: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitted line of `power_law` at ``at`` and its ``level`` t-interval (of the mean, not of a new point):
    exp(a + b·u₀ ± t·s·sqrt(1/n + (u₀ − ū)²/Sxx)), u₀ = ln at, s² = Σ residual²/(n − 2), t on n − 2 degrees of
    freedom, over the same finite positive pairs. Returns (line, low, high)."""
    return power_law(x, y).band(at, level)


def aicc(rss: float, n: int, k: int) -> float:
    """The small-sample Akaike criterion of a least-squares fit with k parameters: n·ln(RSS/n) + 2k +
    2k(k + 1)/(n − k − 1); NaN when n ≤ k + 1."""
    if n <= k + 1 or not rss > 0:
        return float("nan")
    return n * float(np.log(rss / n)) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def offset_gain(x: np.ndarray, y: np.ndarray) -> float:
    """How much the data favour y = A·x^b + c over y = A·x^b: AICc(plain) − AICc(offset), both on the residuals of
    ln y (so the two models are judged on one scale; the offset model where its prediction is positive). > 2: the
    offset is favoured. NaN with fewer than 5 pairs (AICc of 3 parameters needs n > 4) or when the offset fit fails
    or predicts a non-positive value."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if x.size < 5:
        return float("nan")
    plain = power_law(x, y)
    try:
        off = power_law(x, y, offset=True)
    except (ValueError, RuntimeError):
        return float("nan")
    pred = off.predict(x)
    if not (pred > 0).all():
        return float("nan")
    r_plain = np.log(y) - np.log(plain.predict(x))
    r_off = np.log(y) - np.log(pred)
    return aicc(float(r_plain @ r_plain), x.size, 2) - aicc(float(r_off @ r_off), x.size, 3)


def _power_law_offset(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    n = x.size
    if n < 4:
        raise ValueError(f"power_law(offset=True) needs at least 4 pairs for 3 parameters, got {n}")
    pos = y > 0
    start = power_law(x[pos], y[pos]) if pos.sum() >= 3 else PowerLawFit(-0.5, float(np.log(np.abs(y).mean())),
                                                                          0, 0, 0, 0, n)
    u = np.log(x)

    def resid(p: np.ndarray) -> np.ndarray:
        return np.exp(p[0] + p[1] * u) + p[2] - y

    sol = scipy.optimize.least_squares(resid, [start.intercept, start.slope, 0.0], method="lm")
    a, b, c = (float(v) for v in sol.x)
    r = sol.fun
    dof = n - 3
    ss_res = float(r @ r)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    try:
        cov = np.linalg.inv(sol.jac.T @ sol.jac) * ss_res / dof
        stderr = float(np.sqrt(cov[1, 1])) if cov[1, 1] >= 0 else float("nan")  # an ill-conditioned Jacobian
    except np.linalg.LinAlgError:
        stderr = float("nan")
    t = float(scipy.stats.t.ppf(0.975, dof))
    return PowerLawFit(b, a, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, stderr, b - t * stderr, b + t * stderr,
                       n, offset=c)


# ---- scaling laws across runs -------------------------------------------------------------------------------
def group_of(metric: str) -> str:
    """The store group that records ``metric``, or that a `derived` quantity is read from (``ValueError`` listing
    the per-layer metrics if none)."""
    from .derived import DERIVED

    if metric in DERIVED:
        return DERIVED[metric].group
    for group, names in schema.fit_metrics().items():
        if metric in names:
            return group
    known = ", ".join([*(m for names in schema.fit_metrics().values() for m in names), *DERIVED])
    raise ValueError(f"fit_scaling: unknown metric {metric!r}; per-layer metrics are: {known}")


def run_size(attrs: dict, size: str, where: str) -> float:
    if size in attrs:
        return float(attrs[size])
    meta = attrs.get("meta", {})
    if isinstance(meta, dict) and size in meta:
        return float(meta[size])
    raise ValueError(f"fit_scaling: {where} has no {size!r} attribute (neither at the root nor in meta)")


def window_rows(n: int, window: tuple[float, float]) -> tuple[int, int]:
    """Rows [i0, i1) of ``n`` recorded steps inside ``window`` (fractions): i0 = ⌊lo·n⌋, i1 = ⌈hi·n⌉, and at
    least one row when there is any."""
    lo, hi = window
    i0 = int(np.floor(lo * n))
    return i0, min(n, max(int(np.ceil(hi * n)), i0 + 1))


def settled_values(tree, metric: str, quantile: float | None = None, size: str = "model_size",
                   window: tuple[float, float] | str = (0.5, 1.0), where: str = "run", bucket: str = "all"):
    """A tidy DataFrame (layer, kind, depth, quantile, size, value, settled, burn_in) of one run: for each layer
    (and quantile), the median of ``metric`` over the recorded steps in ``window`` (fractions of the recorded
    steps), or with ``window="settled"`` over that series' own settled records (`settle.settled_from`). For
    activations recorded per token-frequency bucket, the values of ``bucket`` (default ``all``: every token)."""
    own = isinstance(window, str)
    if own and window != "settled":
        raise ValueError(f"fit_scaling: window must be (start, end) fractions or 'settled', got {window!r}")
    lo, hi = (0.0, 1.0) if own else window
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"fit_scaling: window must satisfy 0 <= start < end <= 1, got {window!r}")
    group = group_of(metric)
    if group not in tree.children:
        raise ValueError(f"fit_scaling: {where} has no {group!r} group (metric {metric!r})")
    ds = tree[group].dataset
    n = ds.sizes.get("step", 0)
    if n == 0:
        raise ValueError(f"fit_scaling: {where} has no recorded steps in {group!r}")
    i0, i1 = window_rows(n, (lo, hi))
    from .derived import DERIVED, derive

    da = (derive(ds, metric) if metric in DERIVED else ds[metric]).isel(step=slice(i0, i1))
    if "bucket" in da.dims:
        have = [str(b) for b in da["bucket"].values]
        if bucket not in have:
            raise ValueError(f"fit_scaling: {where} has no bucket {bucket!r} (recorded: {', '.join(have)})")
        da = da.sel(bucket=bucket)
    elif bucket != "all":
        raise ValueError(f"fit_scaling: {where} recorded no token-frequency buckets (ActivationSpectra(buckets=...))")
    if "quantile" in da.dims:
        levels = [quantile] if quantile is not None else list(da["quantile"].values)
        missing = [q for q in levels if not np.isclose(da["quantile"].values, q).any()]
        if missing:
            raise ValueError(f"fit_scaling: {where} did not record quantile {missing[0]} "
                             f"(recorded: {list(da['quantile'].values)})")
    else:
        levels = None
    attrs = dict(tree.attrs)
    return settled_frame(da, run_size(attrs, size, where), run_labels(attrs), levels, quantile, own=own)


def settled_frame(da, size: float, labels: dict[str, str | None], levels: list[float] | None = None,
                  quantile: float | None = None, own: bool = False):
    """The tidy rows (layer, kind, depth, quantile, size, value, settled, burn_in, and ``labels``) of one run's
    windowed metric ``da`` (step, layer or module[, quantile]), at each of ``levels`` (the quantile axis), else at
    ``quantile`` (a level already selected, or None). value = the median over its steps, NaNs skipped, and
    ``settled`` says whether the series has settled by `settle.settled_from` within them (``burn_in``: the step it
    settled from, NaN if not). With ``own``: value = the median over the series' own settled records, from
    ``burn_in`` on; a series that never settled takes the second half of its records and ``settled`` False. The
    one definition of a settled value: `fit_scaling` and the dashboard's scaling page both use it."""
    import pandas as pd

    from .settle import settled_starts
    from .store import unit_dim

    unit = unit_dim(da.dims)
    if levels is not None:
        idx = [int(np.argmin(np.abs(da["quantile"].values - q))) for q in levels]
        da = da.isel(quantile=idx).transpose("step", unit, "quantile")
        qs = [float(q) for q in levels]
    else:
        da = da.transpose("step", unit)
        qs = [np.nan if quantile is None else float(quantile)]
    values = np.asarray(da.values, dtype=np.float64).reshape(da.sizes["step"], -1)  # one read of the window
    n = values.shape[0]
    starts = settled_starts(values)
    settled = starts >= 0
    first = np.where(settled, starts, n // 2) if own else np.zeros_like(starts)
    keep = np.arange(n)[:, None] >= first[None, :]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN series: NaN
        medians = np.nanmedian(np.where(keep, values, np.nan), axis=0)
    steps = np.asarray(da["step"].values, dtype=np.float64)
    burn_in = np.where(settled, steps[np.clip(starts, 0, n - 1)], np.nan) if n else np.full(starts.shape, np.nan)
    names = [str(v) for v in da[unit].values.tolist()]
    nq = len(qs)
    frame = pd.DataFrame({
        "layer": np.repeat(names, nq), "kind": np.repeat([str(v) for v in da["kind"].values.tolist()], nq),
        "depth": np.repeat(np.asarray(da["depth"].values, dtype=np.float64), nq),
        "quantile": np.tile(np.asarray(qs, dtype=np.float64), len(names)), "size": float(size), "value": medians,
        "settled": settled, "burn_in": burn_in})
    return frame.assign(**labels)


def run_labels(attrs: dict) -> dict[str, str | None]:
    """What makes runs unlike, beside their size: ``optimizer`` (the class the run's root attribute names;
    several joined by ``+``) and ``arch`` (``meta["arch"]``, when the user gave it)."""
    from .store import optimizer_entries

    classes = sorted({str(o["class"]) for o in optimizer_entries(attrs) if o.get("class")})
    meta = attrs.get("meta") if isinstance(attrs.get("meta"), dict) else {}
    arch = meta.get("arch")
    return {"optimizer": "+".join(classes) or None, "arch": None if arch is None else str(arch)}


def resolve_by(tidy, by) -> tuple[list[str], str | None]:
    """The grouping keys: ``by`` as given, or by default ``("kind", "depth")`` preceded by ``optimizer`` and
    ``arch`` where the runs differ in them; and a note saying what was done about unlike runs (None if all alike)."""
    unlike = [c for c in ("optimizer", "arch") if c in tidy.columns and tidy[c].nunique(dropna=True) > 1]
    if by is None:
        keys = [*unlike, "kind", "depth"]
        note = (f"the runs differ in {' and '.join(unlike)} "
                f"({'; '.join(', '.join(sorted(tidy[c].dropna().unique())) for c in unlike)}): "
                f"fitted separately by {' and '.join(unlike)}") if unlike else None
        return keys, note
    keys = [by] if isinstance(by, str) else list(by)
    mixed = [c for c in unlike if c not in keys]
    note = (f"the runs differ in {' and '.join(mixed)} and are fitted together, as by={tuple(keys)} asks"
            if mixed else None)
    return keys, note


def combine_runs(frames, round_depth: bool = True):
    """Concatenate per-run tidy frames; when the runs' depth grids differ (e.g. 4 blocks against 6) and
    ``round_depth``, depth is rounded to the nearest 0.25 so that layers group across runs."""
    import pandas as pd

    tidy = pd.concat(frames, ignore_index=True)
    grids = {tuple(sorted(set(np.round(f["depth"].dropna(), 6)))) for f in frames}
    if round_depth and len(grids) > 1:
        tidy["depth"] = np.round(tidy["depth"] * 4) / 4
    return tidy


def group_label(keys: dict) -> str:
    """A readable name of a layer group, e.g. ``attn_o@0.5`` for {kind: attn_o, depth: 0.5}, ``Muon/attn_o@0.5``
    with an ``optimizer`` key (the class name without its module)."""
    parts = [str(v).rsplit(".", 1)[-1] if k == "optimizer" else str(v) for k, v in keys.items() if k != "depth"]
    depth = keys.get("depth")
    label = "/".join(parts)
    return label if depth is None or (isinstance(depth, float) and np.isnan(depth)) else f"{label}@{depth:.3g}"


#: the columns a fit table carries for prediction intervals (not shown by the CLI and the dashboard)
INTERVAL_COLUMNS = ("u_mean", "sxx", "n_points", "max_size")
#: a recommendation more than this factor beyond the largest fitted size is flagged as a far extrapolation
FAR = 10.0


def open_runs(runs, caller: str, storage_options=None, chunks=None) -> list[tuple[str, object]]:
    """(where, tree) of every run ``runs`` names: paths, globs, opened trees (``ss.open_run``), or a mapping of
    paths to their opened trees (read as they are, named by their paths); ``ValueError`` (prefixed with
    ``caller``) for a pattern that matches none."""
    from collections.abc import Mapping

    import xarray as xr

    from .store import expand_runs, open_run

    if isinstance(runs, Mapping):
        return [(str(where), tree) for where, tree in runs.items()]
    items = [runs] if isinstance(runs, (str, xr.DataTree)) or hasattr(runs, "__fspath__") else list(runs)
    trees: list[tuple[str, object]] = []
    for item in items:
        if isinstance(item, xr.DataTree):
            trees.append((f"tree{len(trees)}", item))
            continue
        text = str(item)
        paths = expand_runs(text, storage_options)
        if not paths:
            raise ValueError(f"{caller}: no run matches {text!r}")
        trees += [(p, open_run(p, storage_options, chunks)) for p in paths]
    return trees


def fit_scaling(runs, metric: str = "momentum_sv", quantile: float | None = None, by=None,
                size: str = "model_size", window: tuple[float, float] = (0.5, 1.0), storage_options=None,
                chunks=None, bucket: str = "all", target_size: float | None = None, interval: float = 0.95):
    """One `power_law` of the settled value against model size per layer group (and quantile).

    ``runs``: run paths, globs, opened trees (``ss.open_run``), a mapping of paths to opened trees (`open_runs`),
    or a tidy DataFrame with the ``by`` columns,
    ``size``, ``value`` (and optionally ``quantile``). For each run the settled value of a layer is the
    median over the steps in ``window``; layers are grouped across runs by ``by`` (depth rounded to the
    nearest 0.25 when the runs' depth grids differ), several layers of one group in one run by their median.
    By default ``by`` is ``("kind", "depth")``, preceded by ``optimizer`` (the optimizer class) and ``arch``
    (``meta["arch"]``) where the runs differ in them, so unlike runs are never fitted together; the table's
    ``.attrs["note"]`` says so (or that an explicit ``by`` mixes them), ``.attrs["by"]`` holds the keys used.
    ``bucket``: for activations recorded per token-frequency bucket, which one (default ``all``).
    Stores are opened lazily (``chunks`` as `open_run` takes it: None, or ``{}`` for dask arrays), and only
    the window's chunks of ``metric`` are read. ``window="settled"``: each layer's own settled records
    (`settle.settled_from`; a series that never settled takes its second half). Returns a DataFrame: the ``by``
    columns, ``group``, ``quantile``, ``slope``, ``intercept``, ``r2``, ``stderr``, ``ci_low``, ``ci_high``,
    ``n_sizes``, ``settled`` (whether every run's series of the group settled within the window), ``offset_gain``
    (AICc of the plain law minus that of y = A·x^b + c, `offset_gain`: above 2 the data favour an offset; NaN below
    5 runs), and for
    prediction intervals ``u_mean``, ``sxx`` (of ln size), ``n_points``, ``max_size``; with ``target_size`` also
    ``prediction``, ``pred_low``, ``pred_high``: the fitted value there and its ``interval`` prediction interval
    (`PowerLawFit.predict`);
    ``.attrs["current_steps"]`` and ``["current_coefficients"]`` hold the runs' NS steps and coefficients (None
    where the runs differ).
    """
    import pandas as pd

    from .store import ns_entry

    given = [by] if isinstance(by, str) else None if by is None else list(by)
    current_steps = current_coefficients = None
    if not isinstance(runs, pd.DataFrame):
        group_of(metric)  # an unknown metric is reported before any run is opened
    if isinstance(runs, pd.DataFrame):
        tidy = runs.copy()
        missing = [c for c in [*(given or ["kind", "depth"]), "value"] if c not in tidy.columns]
        if missing:
            raise ValueError(f"fit_scaling: the DataFrame lacks column(s) {missing}")
        if "size" not in tidy.columns and size in tidy.columns:
            tidy = tidy.rename(columns={size: "size"})
        if "size" not in tidy.columns:
            raise ValueError(f"fit_scaling: the DataFrame lacks the size column {size!r}")
        if "quantile" not in tidy.columns:
            tidy["quantile"] = np.nan
        tidy["run"] = tidy["size"]
    else:
        trees = open_runs(runs, "fit_scaling", storage_options, chunks)
        frames, steps, schedules = [], set(), set()
        for i, (where, tree) in enumerate(trees):
            frame = settled_values(tree, metric, quantile, size, window, where, bucket)
            frame["run"] = i
            frames.append(frame)
            entry = ns_entry(dict(tree.attrs))
            if entry.get("ns_steps") is not None:
                steps.add(int(entry["ns_steps"]))
            if entry.get("ns_coefficients") is not None:
                schedules.add(json.dumps(entry["ns_coefficients"]))
        tidy = combine_runs(frames, round_depth="depth" in (given or ["depth"]))
        current_steps = steps.pop() if len(steps) == 1 else None
        current_coefficients = json.loads(schedules.pop()) if len(schedules) == 1 else None
    by, note = resolve_by(tidy, given)
    if quantile is not None:
        tidy = tidy[np.isclose(tidy["quantile"], quantile) | tidy["quantile"].isna()]
    keys = [*by, "quantile"]
    if "settled" not in tidy.columns:
        tidy["settled"] = True  # a tidy frame given without it: taken as settled
    per_run = tidy.groupby([*keys, "run"], dropna=False, sort=True).agg(
        size=("size", "first"), value=("value", "median"), settled=("settled", "all")).reset_index()
    rows = []
    too_few = []
    for group_keys, g in per_run.groupby(keys, dropna=False, sort=True):
        kv = dict(zip(keys, group_keys, strict=True))
        label = group_label({k: kv[k] for k in by})
        n_sizes = g["size"].nunique()
        if n_sizes < 3:
            if f"{label} ({n_sizes})" not in too_few:  # one entry per group, not one per quantile
                too_few.append(f"{label} ({n_sizes})")
            continue
        bad = g[~(np.isfinite(g["value"]) & (g["value"] > 0))]
        if len(bad):
            raise ValueError(f"fit_scaling: group {label} has non-positive or missing {metric} values at size(s) "
                             f"{sorted(bad['size'].tolist())}; a power law needs positive values")
        fit = power_law(g["size"].to_numpy(), g["value"].to_numpy())
        row = {**{k: kv[k] for k in by}, "group": label, "quantile": kv["quantile"], "slope": fit.slope,
               "intercept": fit.intercept, "r2": fit.r2, "stderr": fit.stderr, "ci_low": fit.ci_low,
               "ci_high": fit.ci_high, "n_sizes": int(n_sizes), "settled": bool(g["settled"].all()),
               "offset_gain": offset_gain(g["size"].to_numpy(), g["value"].to_numpy()),
               "u_mean": fit.u_mean, "sxx": fit.sxx, "n_points": fit.n, "max_size": float(g["size"].max())}
        if target_size is not None:
            point, low, high = fit.predict(float(target_size), interval)
            row.update(prediction=float(point), pred_low=float(low), pred_high=float(high))
        rows.append(row)
    if not rows:
        raise ValueError("fit_scaling: no layer group has runs of at least 3 sizes"
                         + (f" (sizes per group: {', '.join(too_few[:6])}{', …' if len(too_few) > 6 else ''})"
                            if too_few else "") + (f"; {note}" if note else ""))
    out = pd.DataFrame(rows)
    out.attrs.update(current_steps=current_steps, current_coefficients=current_coefficients, by=by, note=note,
                     target_size=target_size, interval=interval)
    return out


def fit_of(row) -> PowerLawFit:
    """The `PowerLawFit` of one row of a `fit_scaling` table."""
    return PowerLawFit(float(row["slope"]), float(row["intercept"]), float(row["r2"]), float(row["stderr"]),
                       float(row["ci_low"]), float(row["ci_high"]), int(row["n_points"]), u_mean=float(row["u_mean"]),
                       sxx=float(row["sxx"]))


def recommend_ns_steps(fits, model_size: float, quantile: float = 0.5, floor: float = 0.5,
                       coefficients=None, interval: float = 0.95):
    """Per group: ``sigma`` = the fitted settled σ_q extrapolated to ``model_size`` (exp(intercept)·size^slope),
    ``ns_steps`` = the fewest k with ns_threshold(k, coefficients, floor) ≤ sigma, ``sigma_low`` = the lower end of
    its ``interval`` prediction interval (`PowerLawFit.predict`) and ``ns_steps_conservative`` = the steps for it,
    ``current_steps`` = the k of the recorded optimizer (from ``fits.attrs``), ``extrapolation`` = model_size over
    the largest fitted size and ``far`` = whether that exceeds `FAR` (10×; the recommendation is then a long
    extrapolation, said in ``.attrs["note"]``). ``coefficients``: one (a, b, c) triple or a per-step schedule (run
    for k steps as `newton_schulz.run_for` says); by default the recorded optimizer's
    (``fits.attrs["current_coefficients"]``, when the runs agree on one), else Muon's quintic."""
    import pandas as pd

    from .newton_schulz import MUON_COEFFICIENTS, fewest_ns_steps

    if not model_size > 0:
        raise ValueError(f"recommend_ns_steps: model_size must be > 0, got {model_size!r}")
    coefficients = coefficients or fits.attrs.get("current_coefficients") or MUON_COEFFICIENTS
    sel = fits[np.isclose(fits["quantile"], quantile)] if fits["quantile"].notna().any() else fits
    if sel.empty:
        raise ValueError(f"recommend_ns_steps: the fits hold no quantile {quantile} "
                         f"(they hold {sorted(set(fits['quantile'].dropna()))})")
    by = [c for c in fits.columns if c not in ("group", "quantile", "slope", "intercept", "r2", "stderr", "ci_low",
                                                "ci_high", "n_sizes", "settled", "offset_gain", "prediction",
                                                "pred_low", "pred_high",
                                                *INTERVAL_COLUMNS)]

    def steps_for(sigma: float) -> int | None:
        if not sigma > 0:
            return None
        try:
            return fewest_ns_steps(min(sigma, 1.0), coefficients, floor)
        except ValueError:  # no k up to 100 lifts it
            return None

    rows = []
    for _, r in sel.iterrows():
        sigma = float(np.exp(r["intercept"]) * model_size ** r["slope"])
        low = float(fit_of(r).predict(model_size, interval)[1]) if all(c in r for c in INTERVAL_COLUMNS) else np.nan
        factor = float(model_size / r["max_size"]) if "max_size" in r else np.nan
        rows.append({**{k: r[k] for k in by}, "group": r["group"], "quantile": r["quantile"], "sigma": sigma,
                     "ns_steps": steps_for(sigma), "sigma_low": low, "ns_steps_conservative": steps_for(low),
                     "current_steps": fits.attrs.get("current_steps"), "extrapolation": factor,
                     "far": bool(factor > FAR)})
    out = pd.DataFrame(rows)
    far = out[out["far"]]
    if len(far):
        out.attrs["note"] = (f"{model_size:g} is {far['extrapolation'].max():.3g}× the largest fitted size (more than "
                             f"{FAR:g}×): a long extrapolation; trust ns_steps_conservative over ns_steps")
    return out


def backtest(runs, metric: str = "momentum_sv", quantile: float | None = None, by=None, size: str = "model_size",
             window: tuple[float, float] | str = (0.5, 1.0), each: bool = False, interval: float = 0.95,
             storage_options=None, bucket: str = "all"):
    """How well the power laws extrapolate on these runs: refit without the largest size (``each``: without each
    size in turn) and predict the held-out size. Per held-out size, group and quantile: ``predicted`` (with
    ``pred_low``/``pred_high``, the ``interval`` prediction interval), ``actual`` (the held-out runs' settled value,
    their layers' median as `fit_scaling` takes it), ``error`` = predicted/actual, ``fold`` = max(error, 1/error)
    and ``inside`` (actual within the interval). ``.attrs["coverage"]``: the share inside. Groups with fewer than 3
    sizes left are not backtested."""
    import pandas as pd

    frames = [settled_values(tree, metric, quantile, size, window, where, bucket).assign(run=i)
              for i, (where, tree) in enumerate(open_runs(runs, "backtest", storage_options))]
    tidy = combine_runs(frames)
    sizes = sorted(tidy["size"].unique())
    if len(sizes) < 4:
        raise ValueError(f"backtest: needs runs of at least 4 sizes (3 to fit, 1 to predict), got {len(sizes)}")
    rows = []
    for held in (sizes if each else sizes[-1:]):
        train, test = tidy[tidy["size"] != held], tidy[tidy["size"] == held]
        try:
            fits = fit_scaling(train.drop(columns="run"), metric, quantile, by=by, target_size=float(held),
                               interval=interval)
        except ValueError:
            continue
        keys = [*fits.attrs["by"], "quantile"]
        actual = test.groupby(keys, dropna=False).agg(actual=("value", "median")).reset_index()
        merged = fits.merge(actual, on=keys, how="inner")
        for _, r in merged.iterrows():
            err = float(r["prediction"] / r["actual"]) if r["actual"] > 0 else float("nan")
            rows.append({**{k: r[k] for k in keys}, "group": r["group"], "held_out": float(held),
                         "predicted": float(r["prediction"]), "pred_low": float(r["pred_low"]),
                         "pred_high": float(r["pred_high"]), "actual": float(r["actual"]), "error": err,
                         "fold": max(err, 1 / err) if err > 0 else float("nan"),
                         "inside": bool(r["pred_low"] <= r["actual"] <= r["pred_high"]),
                         "settled": bool(r["settled"])})
    out = pd.DataFrame(rows)
    if out.empty:
        raise ValueError("backtest: no group has runs of 3 sizes besides the held-out one")
    out.attrs.update(coverage=float(out["inside"].mean()), interval=interval, sizes=[float(s) for s in sizes])
    return out
