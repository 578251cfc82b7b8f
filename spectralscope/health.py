"""Training health: a small set of documented rules over the committed records, and the alerts they raise.

A rule is a function ``check(record) -> iterable of Finding``: it reads one committed `Record` (a group's row at a
step, the group's coordinates, the last few rows of that group and what the run knows about its layers) and says
which layers are out of the regime their optimizer works in, with the value, a severity (``info`` | ``warning`` |
``critical``) and what to do. `Monitor` turns findings into alerts: an alert of (rule, layer) *starts* at the first
record that finds it and *ends* at the first record of that rule's group that no longer does; each start and end is
one log line and one row of the ``health`` group (`schema.HEALTH`). ``spectralscope doctor RUN`` prints them.

The built-in rules (`RULES`; thresholds in `Thresholds`), each with the evidence behind it:

- ``ns_undershoot`` (optimizer, warning): from step `Thresholds.ns_burn_in` (50) on, the median over the last
  `Thresholds.settle` records of ``ns_fail_frac`` is above `Thresholds.ns_fail_frac` (0.5: the median singular value
  of M/‖M‖_F is below the NS threshold, so k Newton–Schulz steps leave most directions of the momentum under the f_k
  floor, SPEC §4). The first steps are not judged: a momentum that has seen few batches is low-rank, and the
  directions it has not seen yet are ones no step count helps. Action: raise ns_steps
  to the fewest k that lift that median σ to the floor (`newton_schulz.fewest_ns_steps`; ``recommend_ns_steps``
  for a larger model).
- ``curvature`` (sharpness, warning): ``predicted_delta`` = gᵀu + ½uᵀHu > 0 on `Thresholds.curvature_probes`
  successive probes: along the step actually taken the quadratic model's curvature penalty beats the first-order
  gain, so the step overshoots (the edge-of-stability regime, Cohen et al. 2021). Action: lower the learning rate
  (or warm up longer) for the layers whose ``nds_within`` is largest.
- ``attention_logit`` (attention): a head's max logit above τ = `Thresholds.max_logit` (100, where Kimi K2's MuonClip
  clips; its Muon runs diverged past it) is critical; one that grew monotonically by ×`Thresholds.logit_growth` or
  more over the last `Thresholds.settle` + 1 records, all of them above `Thresholds.logit_floor` (10), is a warning
  (the exponential growth MuonClip was made for; logits rising from their initial O(1) as attention sharpens early
  in training are not it). Action: MuonClip-style qk clipping (rescale W_q, W_k of that head when its max logit
  exceeds τ), or QK-norm.
- ``weight_alpha`` (weights, warning): a layer's ``weight_alpha`` below `Thresholds.alpha` (2): WeightWatcher's
  heavy-tailed self-regularisation reads α < 2 as over-trained/over-fit (well-trained layers lie in 2–6, Martin &
  Mahoney 2021). Action: lower that layer's learning rate, add weight decay, or stop earlier.
- ``mup_drift`` (optimizer, info): a layer's ``mup_weight_ratio`` = ‖W‖₂/sqrt(rows/cols) has grown or shrunk by
  more than ×`Thresholds.mup_drift` (4) since its first record: under μP's spectral condition (Yang, Simon &
  Bernstein 2023) ‖W‖₂ stays Θ(sqrt(fan_out/fan_in)) through training, so hyper-parameters tuned here will not
  transfer across widths as they are. Action: scale this layer's learning rate with fan_out/fan_in, or check its
  initialisation.
- ``non_finite`` (every group, critical): a training quantity (‖W‖₂, ‖M‖_F, ΔW's rms, the probe's loss, a logged
  scalar) that was finite in an earlier record is not finite now, or is infinite. NaN by construction (a metric this
  run cannot record, said in its notes) is never finite, so never alerts. Action: find the first step where it
  happened (the store's step of the alert), lower the learning rate, check for overflow in mixed precision.

Users add rules as small functions: ``watch(health=[my_rule])`` runs them after the built-in ones, e.g.

    def loss_spike(record):
        if record.group == "scalars" and record.row.get("loss", 0) > 10:
            yield Finding("*", record.row["loss"], "warning", "loss above 10: lower the learning rate")

Pure functions and a small state machine; the recorder feeds the monitor, the store keeps its events.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import schema

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Thresholds:
    """The built-in rules' thresholds (module docstring)."""

    settle: int = 3
    ns_fail_frac: float = 0.5
    ns_burn_in: int = 50
    curvature_probes: int = 2
    max_logit: float = 100.0
    logit_growth: float = 4.0
    logit_floor: float = 10.0
    alpha: float = 2.0
    mup_drift: float = 4.0


@dataclass(frozen=True)
class LayerInfo:
    """What a rule may know about a layer besides its rows: its shape and, where its optimizer applies NS, the
    step count and coefficients (`newton_schulz.NSConfig`)."""

    rows: int | None = None
    cols: int | None = None
    ns_steps: int | None = None
    ns_coefficients: Any = None


@dataclass
class Record:
    """One committed row of ``group`` at ``step``: ``row`` {variable: array shaped as the schema says}, ``units``
    (the names along its layer/module axis), ``quantiles`` (its quantile levels), ``history`` (this group's earlier
    rows, oldest first, at most `HISTORY`), ``first`` (its first row in this run), ``layers`` ({name: LayerInfo})
    and ``floor`` (the f_k floor of ns_fail_frac)."""

    group: str
    step: int
    row: Mapping[str, Any]
    units: Sequence[str] = ()
    quantiles: Sequence[float] = ()
    history: Sequence[Mapping[str, Any]] = ()
    first: Mapping[str, Any] | None = None
    layers: Mapping[str, LayerInfo] = field(default_factory=dict)
    floor: float = 0.5
    thresholds: Thresholds = field(default_factory=Thresholds)

    def values(self, var: str, level: float | None = None) -> np.ndarray | None:
        """``var`` of this row as float64 (at the quantile level nearest ``level``); None when not in the row."""
        return _values(self.row, var, level, self.quantiles)

    def series(self, var: str, n: int, level: float | None = None) -> np.ndarray | None:
        """The last ``n`` rows of ``var`` (this one last), shape (≤ n, …); None when this row lacks it."""
        rows = [*self.history, self.row][-n:]
        got = [_values(r, var, level, self.quantiles) for r in rows]
        got = [g for g in got if g is not None and g.shape == got[-1].shape] if got[-1] is not None else []
        return np.stack(got) if got else None


def _values(row: Mapping[str, Any], var: str, level: float | None, levels: Sequence[float]) -> np.ndarray | None:
    if var not in row:
        return None
    v = np.asarray(row[var], dtype=np.float64)
    if level is not None and len(levels):
        v = v[..., int(np.argmin(np.abs(np.asarray(levels) - level)))]
    return v


@dataclass(frozen=True)
class Finding:
    """What a rule found at one record: the ``layer`` (``*``: the whole model), the ``value`` that tripped it,
    the ``severity`` and the ``message``: what it means and what to do."""

    layer: str
    value: float
    severity: str
    message: str


Check = Callable[[Record], Iterable[Finding]]


@dataclass(frozen=True)
class Rule:
    """A named check over the records of ``groups`` (empty: every group)."""

    name: str
    groups: tuple[str, ...]
    check: Check


def _settled(rec: Record, var: str, level: float | None = None) -> np.ndarray | None:
    """The median of ``var`` (at the quantile ``level``) over the last `Thresholds.settle` records, NaN-skipping;
    None before there are that many."""
    s = rec.series(var, rec.thresholds.settle, level)
    if s is None or len(s) < rec.thresholds.settle:
        return None
    with np.errstate(all="ignore"):
        return np.nanmedian(np.where(np.isfinite(s), s, np.nan), axis=0) if np.isfinite(s).any() else None


def ns_undershoot(rec: Record) -> Iterable[Finding]:
    from .newton_schulz import MUON_COEFFICIENTS, fewest_ns_steps

    if rec.step < rec.thresholds.ns_burn_in:
        return
    frac = _settled(rec, "ns_fail_frac")
    if frac is None:
        return
    median = _settled(rec, "momentum_sv", 0.5) if "momentum_sv" in rec.row and len(rec.quantiles) else None
    for i, name in enumerate(rec.units):
        f = frac[i]
        if not (np.isfinite(f) and f > rec.thresholds.ns_fail_frac):
            continue
        info = rec.layers.get(name, LayerInfo())
        k = info.ns_steps
        advice = "raise ns_steps"
        s = float(median[i]) if median is not None else float("nan")
        if 0 < s <= 1:
            try:
                need = fewest_ns_steps(s, info.ns_coefficients or MUON_COEFFICIENTS, rec.floor)
                advice = f"raise ns_steps{f' from {k}' if k else ''} to {need}"
            except ValueError:
                advice = "raise ns_steps (no k up to 100 lifts it: the momentum is close to rank-deficient)"
        yield Finding(name, float(f), "warning",
                      f"ns_fail_frac {f:.2f} > {rec.thresholds.ns_fail_frac:g} over the last {rec.thresholds.settle} "
                      f"records: the median σ of M/‖M‖_F ({s:.3g}) stays under the {rec.floor:g} floor after "
                      f"{k or 'its'} NS steps; {advice} (ss.fewest_ns_steps; ss.recommend_ns_steps for a larger model)")


def curvature(rec: Record) -> Iterable[Finding]:
    n = rec.thresholds.curvature_probes
    s = rec.series("predicted_delta", n)
    if s is None or len(s) < n or not (np.isfinite(s) & (s > 0)).all():
        return
    within = rec.values("nds_within")
    where = ""
    if within is not None and len(rec.units) and np.isfinite(within).any():
        top = [rec.units[j] for j in np.argsort(np.where(np.isfinite(within), -within, np.inf))[:2]]
        where = f"; the most curved layers along the step: {', '.join(top)}"
    yield Finding("*", float(s[-1]), "warning",
                  f"predicted_delta = gᵀu + ½uᵀHu > 0 on {n} successive probes ({float(s[-1]):.3g} now): the "
                  f"curvature penalty beats the gain, the step is too large for this curvature; lower the learning "
                  f"rate or warm up longer{where}")


def attention_logit(rec: Record) -> Iterable[Finding]:
    t = rec.thresholds
    top = rec.values("attn_logit_max")
    if top is None:
        return
    series = rec.series("attn_logit_max", t.settle + 1)
    for i, name in enumerate(rec.units):
        for h in range(top.shape[1]):
            v = top[i, h]
            if not np.isfinite(v):
                continue
            if v > t.max_logit:
                yield Finding(f"{name}[head {h}]", float(v), "critical",
                              f"max attention logit {v:.3g} > τ = {t.max_logit:g}: past where Kimi K2's Muon runs "
                              f"blew up; clip q·k MuonClip-style (rescale W_q, W_k of this head by sqrt(τ/max) when "
                              f"over τ) or add QK-norm")
                continue
            if series is None or len(series) < t.settle + 1:
                continue
            s = series[:, i, h]
            if np.isfinite(s).all() and (np.diff(s) > 0).all() and s[0] > t.logit_floor and \
                    s[-1] >= t.logit_growth * s[0]:
                rate = math.log(s[-1] / s[0]) / (len(s) - 1)
                left = math.log(t.max_logit / s[-1]) / rate
                yield Finding(f"{name}[head {h}]", float(v), "warning",
                              f"max attention logit growing ×{s[-1] / s[0]:.3g} over {len(s) - 1} records ({v:.3g} "
                              f"now): at this rate it passes τ = {t.max_logit:g} in about {left:.0f} records; clip "
                              f"q·k MuonClip-style or add QK-norm")


def weight_alpha(rec: Record) -> Iterable[Finding]:
    alpha = rec.values("weight_alpha")
    if alpha is None:
        return
    for i, name in enumerate(rec.units):
        a = alpha[i]
        if np.isfinite(a) and a < rec.thresholds.alpha:
            yield Finding(name, float(a), "warning",
                          f"weight_alpha {a:.3g} < {rec.thresholds.alpha:g}: heavier-tailed than WeightWatcher's "
                          f"well-trained range (2–6), read as over-trained; lower this layer's learning rate, add "
                          f"weight decay or stop earlier")


def mup_drift(rec: Record) -> Iterable[Finding]:
    now, first = rec.values("weight_spectral_norm"), _values(rec.first or {}, "weight_spectral_norm", None, ())
    if now is None or first is None or first.shape != now.shape:
        return
    limit = rec.thresholds.mup_drift
    for i, name in enumerate(rec.units):
        a, b = first[i], now[i]
        if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
            continue
        change = b / a  # the ratio ‖W‖₂/sqrt(rows/cols) changes as ‖W‖₂ does: the layer's shape is fixed
        if change > limit or change < 1 / limit:
            info = rec.layers.get(name, LayerInfo())
            ratio = b / math.sqrt(info.rows / info.cols) if info.rows and info.cols else float("nan")
            yield Finding(name, float(ratio if np.isfinite(ratio) else change), "info",
                          f"mup_weight_ratio = ‖W‖₂/sqrt(rows/cols) moved ×{change:.3g} since the first record "
                          f"({ratio:.3g} now): μP's spectral condition keeps it Θ(1), so learning rates tuned at this "
                          f"width will not transfer as they are; scale this layer's learning rate with "
                          f"fan_out/fan_in or check its initialisation")


#: the training quantities whose turning non-finite is an alert, per group (a logged scalar: all of them)
WATCHED_FINITE = {"optimizer": ("weight_spectral_norm", "momentum_norm", "update_rms"),
                  "sharpness": ("loss_before", "loss_after"), "weights": ("weight_stable_rank",)}


def non_finite(rec: Record) -> Iterable[Finding]:
    names = WATCHED_FINITE.get(rec.group, tuple(rec.row) if rec.group == "scalars" else ())
    for var in names:
        now = rec.values(var)
        if now is None:
            continue
        ever = rec.series(var, len(rec.history) + 1)
        seen = np.isfinite(ever[:-1]).any(axis=0) if ever is not None and len(ever) > 1 else np.zeros_like(now, bool)
        if rec.first is not None and var in rec.first:  # finite in the run's first record counts too
            seen = seen | np.isfinite(np.asarray(rec.first[var], dtype=np.float64))
        bad = np.isinf(now) | (~np.isfinite(now) & seen)
        for idx in zip(*np.nonzero(np.atleast_1d(bad)), strict=False):
            layer = rec.units[idx[0]] if now.ndim and len(rec.units) else ("*" if rec.group != "scalars" else var)
            v = float(np.atleast_1d(now)[idx])
            yield Finding(layer, v, "critical",
                          f"{var} is {v} (finite before): training has diverged or overflowed here; find the first "
                          f"such step, lower the learning rate, check mixed-precision overflow and the data")


RULES: tuple[Rule, ...] = (
    Rule("ns_undershoot", ("optimizer",), ns_undershoot),
    Rule("curvature", ("sharpness",), curvature),
    Rule("attention_logit", ("attention",), attention_logit),
    Rule("weight_alpha", ("weights",), weight_alpha),
    Rule("mup_drift", ("optimizer",), mup_drift),
    Rule("non_finite", (), non_finite),
)

#: earlier rows of a group a rule may look back at
HISTORY = 8


def as_rule(rule: Rule | Check) -> Rule:
    """A user's rule: a `Rule`, or a plain function of a `Record` (named after itself, run on every group)."""
    if isinstance(rule, Rule):
        return rule
    if callable(rule):
        return Rule(getattr(rule, "__name__", "user_rule"), (), rule)
    raise ValueError(f"health: a rule is a function (record) -> findings or an ss.health.Rule, got {rule!r}")


@dataclass(frozen=True)
class Event:
    """An alert starting or ending: one row of the ``health`` group."""

    step: int
    rule: str
    group: str
    layer: str
    value: float
    severity: str
    state: str  # "start" | "end"
    message: str

    def row(self) -> dict[str, Any]:
        return {"rule": self.rule, "group": self.group, "layer": self.layer, "value": self.value,
                "severity": self.severity, "state": self.state, "message": self.message}


@dataclass
class Monitor:
    """Runs the rules on each committed record and keeps which alerts are active. Not thread-safe: the caller
    serialises `observe`."""

    rules: Sequence[Rule] = RULES
    layers: Mapping[str, LayerInfo] = field(default_factory=dict)
    floor: float = 0.5
    thresholds: Thresholds = field(default_factory=Thresholds)
    active: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # rule → why it raised, once
    _history: dict[str, deque] = field(default_factory=dict)
    _first: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    def resume(self, earlier: Iterable[Mapping[str, Any]], first: Mapping[str, Mapping[str, Any]],
               history: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Go on where a resumed run stopped: the alerts it left open (its ``health`` rows, as `events`, whose
        start has no end) are active again, so that they end rather than start a second time; each group's
        ``first`` row and last rows (``history``, oldest first) are the ones it recorded."""
        for span in spans(earlier):
            if span["end"] is None:
                key = (span["rule"], span["group"], span["layer"])
                self.active[key] = Finding(span["layer"], span["value"], span["severity"], span["message"])
        self._first.update(first)
        for group, rows in history.items():
            self._history[group] = deque(rows, maxlen=HISTORY)

    def observe(self, group: str, step: int, row: Mapping[str, Any], units: Sequence[str] = (),
                quantiles: Sequence[float] = ()) -> list[Event]:
        """The alerts that start or end at this record."""
        history = self._history.setdefault(group, deque(maxlen=HISTORY))
        first = self._first.setdefault(group, row)
        rec = Record(group, step, row, units, quantiles, list(history), first, self.layers, self.floor,
                     self.thresholds)
        events: list[Event] = []
        for rule in self.rules:
            if rule.groups and group not in rule.groups:
                continue
            try:
                found = {f.layer: f for f in rule.check(rec)}
            except Exception as exc:  # a rule that fails is said once and skipped, never raised into training
                self.failed.setdefault(rule.name, f"{type(exc).__name__}: {exc}")
                continue
            for layer, f in found.items():
                sev = f.severity if f.severity in SEVERITIES else "warning"
                key = (rule.name, group, layer)
                if key not in self.active:
                    events.append(Event(step, rule.name, group, layer, float(f.value), sev, "start", f.message))
                self.active[key] = f
            for key in [k for k in self.active if k[0] == rule.name and k[1] == group and k[2] not in found]:
                was = self.active.pop(key)
                events.append(Event(step, rule.name, group, key[2], float(was.value), was.severity, "end",
                                    f"ended: {was.message}"))
        history.append(row)
        return events


def events(columns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the ``health`` group as event dicts ({step, value, rule, group, layer, severity, state,
    message}), from its columns as the store hands them back (arrays or lists): ``step`` as int, the text
    variables as str, the rest as float."""
    text = set(schema.HEALTH.strings())

    def plain(name: str, values: Any) -> list[Any]:
        if name in text:
            return [str(v) for v in np.asarray(values).tolist()]
        return np.asarray(values, dtype=np.int64 if name == "step" else np.float64).tolist()

    names = list(columns)
    return [dict(zip(names, row, strict=True)) for row in zip(*(plain(n, v) for n, v in columns.items()), strict=True)]


def spans(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alerts as spans: each start paired with its end (``end`` None while still active), in order of start:
    {rule, group, layer, severity, start, end, value, message}."""
    open_: dict[tuple, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for e in events:
        key = (e["rule"], e["group"], e["layer"])
        if e["state"] == "start":
            span = {"rule": e["rule"], "group": e["group"], "layer": e["layer"], "severity": e["severity"],
                    "start": int(e["step"]), "end": None, "value": float(e["value"]), "message": e["message"]}
            open_[key] = span
            out.append(span)
        elif key in open_:
            open_.pop(key)["end"] = int(e["step"])
    return out


def worst(severities: Iterable[str]) -> str | None:
    """The most severe of ``severities`` (None for none)."""
    ranked = [SEVERITIES.index(s) for s in severities if s in SEVERITIES]
    return SEVERITIES[max(ranked)] if ranked else None
