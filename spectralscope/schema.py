"""Every stored name, stated once: the store's groups, their variables and dimensions, the metric families
errors are counted by, the quantile levels, and what TensorBoard shows (`docs/store.md` describes them).

The writer lays groups out from here, the measurers fill rows shaped from here, and `fit`, the TensorBoard
export and the dashboard read their lists from here. No torch: the read side imports it too.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The store layout's version (root attribute ``spectralscope.schema``).
SCHEMA = 1

#: Quantile levels recorded by default.
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class Variable:
    """One stored variable: its ``dims`` after ``step``; the metric ``family`` its NaNs are counted and said
    under; whether ``fit_scaling`` takes it (a per-layer value worth a power law); the quantile levels drawn in
    TensorBoard (``()``: none; ``(None,)``: the value itself); ``optional``: stored only by some runs (the
    estimate's bounds, with an SLQ-measured layer)."""

    name: str
    dims: tuple[str, ...]
    family: str
    fit: bool = True
    tensorboard: tuple[float | None, ...] = ()
    optional: bool = False
    text: bool = False  # stored as strings (the health group's rule, layer, severity, …)

    @property
    def quantiled(self) -> bool:
        return "quantile" in self.dims


@dataclass(frozen=True)
class Group:
    """One sub-group of a run: its per-matrix axis (``layer``, ``module`` or None), its variables, and the metric
    under which a record of it that was lost is counted (layer ``*``)."""

    name: str
    unit: str | None
    variables: tuple[Variable, ...]
    lost_as: str

    def names(self, optional: bool = True) -> list[str]:
        return [v.name for v in self.variables if optional or not v.optional]

    def dims(self, optional: bool = True) -> dict[str, tuple[str, ...]]:
        """{variable: its dimensions, ``step`` first}."""
        return {v.name: ("step", *v.dims) for v in self.variables if optional or not v.optional}

    def strings(self) -> tuple[str, ...]:
        """The variables stored as strings."""
        return tuple(v.name for v in self.variables if v.text)


_L, _LQ = ("layer",), ("layer", "quantile")
_M = ("module",)

OPTIMIZER = Group("optimizer", "layer", (
    Variable("momentum_sv", _LQ, "momentum", tensorboard=(0.1, 0.5, 0.9)),
    Variable("momentum_norm", _L, "momentum"),
    Variable("ns_out_sv", _LQ, "newton_schulz"),
    Variable("ns_polar_err", _L, "newton_schulz"),
    Variable("ns_orth_err", _L, "newton_schulz"),
    Variable("ns_fail_frac", _L, "momentum", tensorboard=(None,)),
    # the cosine between NS_k(M)'s direction as the adapter implies it and the step applied (the self-check)
    Variable("ns_consistency", _L, "newton_schulz", fit=False),
    Variable("update_rms", _L, "update"),
    Variable("update_sv", _LQ, "update"),
    Variable("update_erank", _L, "update", tensorboard=(None,)),
    Variable("neuron_norm", _LQ, "update"),
    Variable("neuron_cv", _L, "update", tensorboard=(None,)),
    Variable("weight_spectral_norm", _L, "weight"),
    # hi − lo of the SLQ bracket of each estimated quantile (0 on exact layers), when a layer is estimated
    Variable("momentum_sv_err", _LQ, "momentum", fit=False, optional=True),
    Variable("ns_out_sv_err", _LQ, "newton_schulz", fit=False, optional=True),
    Variable("update_sv_err", _LQ, "update", fit=False, optional=True),
), lost_as="optimizer")

ACTIVATIONS = Group("activations", "module", (
    Variable("act_eig", ("module", "rank"), "activations", fit=False),
    Variable("act_soft_rank", _M, "activations"),
    Variable("act_hard_rank", _M, "activations", tensorboard=(None,)),
    Variable("act_tail_alpha", _M, "activations"),
    Variable("act_top10_share", _M, "activations"),
    Variable("act_tokens", _M, "activations", fit=False),
), lost_as="act_eig")

GRADIENTS = Group("gradients", "layer", (
    Variable("grad_sv", ("layer", "rank"), "gradients", fit=False),
    Variable("grad_soft_rank", _L, "gradients"),
    Variable("grad_samples", _L, "gradients", fit=False),
), lost_as="grad_sv")

SHARPNESS = Group("sharpness", "layer", (
    *(Variable(name, (), "sharpness", fit=False) for name in (
        "loss_before", "loss_after", "grad_dot_update", "curvature", "update_norm_sq")),
    Variable("nds", (), "sharpness", fit=False, tensorboard=(None,)),
    *(Variable(name, (), "sharpness", fit=False) for name in ("predicted_delta", "actual_delta", "nds_cross")),
    Variable("nds_within", _L, "sharpness"),
), lost_as="nds")

WEIGHTS = Group("weights", "layer", (
    Variable("weight_sv", _LQ, "weights", tensorboard=(1.0,)),
    Variable("weight_alpha", _L, "weights", tensorboard=(None,)),
    Variable("weight_stable_rank", _L, "weights"),
), lost_as="weight_sv")

_MH = ("module", "head")
ATTENTION = Group("attention", "module", (
    Variable("attn_logit_max", _MH, "attention", fit=False),
    Variable("attn_logit_mean", _MH, "attention", fit=False),
    Variable("attn_logit_q99", _MH, "attention", fit=False),
), lost_as="attn_logit_max")

# One row per alert that starts or ends (`spectralscope.health`): ``step`` repeats where several do at one step.
HEALTH = Group("health", None, (
    *(Variable(name, (), "health", fit=False, text=True) for name in ("rule", "group", "layer", "severity", "state",
                                                                      "message")),
    Variable("value", (), "health", fit=False),
), lost_as="rule")

#: The recorded groups (``scalars`` is dynamic: one (step) variable per name passed to ``rec.log``).
GROUPS: dict[str, Group] = {g.name: g for g in (OPTIMIZER, ACTIVATIONS, GRADIENTS, SHARPNESS, WEIGHTS, ATTENTION,
                                                HEALTH)}
SCALARS = "scalars"
#: Every sub-group a run may hold, in the order readers list them.
GROUP_NAMES = (*GROUPS, SCALARS)
#: The coordinates along a group's ``layer``/``module`` dimension besides its names (each where it applies: ``width``
#: on activations, ``sv_method`` on the optimizer group, ``optimizer`` where several optimizers are watched).
UNIT_COORDS = ("kind", "depth", "rows", "cols", "width", "sv_method", "optimizer")

_BY_NAME = {v.name: (g, v) for g in GROUPS.values() for v in g.variables}


def variable(name: str) -> Variable:
    """The stored variable ``name`` (``KeyError`` if none)."""
    return _BY_NAME[name][1]


def group_of(name: str) -> str:
    """The group that stores variable ``name`` (``KeyError`` if none)."""
    return _BY_NAME[name][0].name


def family_of(metric: str) -> str:
    """The family a counted metric belongs to, so that it is said once per run: ``momentum``,
    ``newton_schulz``, ``update``, ``weight``, ``activations``, ``gradients``, ``sharpness``, ``weights``,
    ``attention``; any other name (``optimizer``: a lost record, ``tensorboard``, ``update`` of a failed snapshot)
    is its own family."""
    found = _BY_NAME.get(metric)
    return found[1].family if found else metric


def fit_metrics() -> dict[str, list[str]]:
    """{group: the per-layer variables `fit_scaling` takes}."""
    return {g.name: [v.name for v in g.variables if v.fit and g.unit in v.dims] for g in GROUPS.values()}


def tensorboard_metrics() -> list[tuple[str, str, float | None]]:
    """(group, variable, quantile level or None) of every value TensorBoard is given."""
    return [(g.name, v.name, q) for g in GROUPS.values() for v in g.variables for q in v.tensorboard]
