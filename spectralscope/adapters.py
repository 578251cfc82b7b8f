"""Where each optimizer keeps its momentum, and how (if at all) it orthogonalises it.

An adapter answers two questions for one parameter after ``optimizer.step()``: which matrix M the
optimizer's update is built from (SPEC §6 "momentum"), and which Newton–Schulz configuration it
applies to M (None for optimizers without NS). Adapters are looked up along the optimizer class's MRO,
so subclasses of a supported optimizer are supported too.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .newton_schulz import NSConfig, recover_applied

MomentumFn = Callable[[Tensor, Mapping[str, Any], Mapping[str, Any]], Tensor | None]
NSFn = Callable[[Mapping[str, Any]], NSConfig | None]
AppliedFn = Callable[[Tensor, Mapping[str, Any], Tensor], Tensor | None]  # (W_after, group, W_before) -> O
OrthogonalizeFn = Callable[[Tensor, Mapping[str, Any]], Tensor]  # (M as a matrix, group) -> O
DirectionFn = Callable[[Tensor, Mapping[str, Any], Tensor | None], Tensor]  # (O, group, extra) -> the applied direction
ExtraFn = Callable[[Tensor, Mapping[str, Any], Mapping[str, Any]], Tensor | None]  # (param, group, state) -> extra
DecayFn = Callable[[Mapping[str, Any]], float]  # group -> the factor W_before is multiplied by before the update
KeepFn = Callable[[Tensor, Mapping[str, Any], Mapping[str, Any]], Any]  # (param, group, state) before the step -> kept
SettingsFn = Callable[[Tensor, Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]]  # -> what applies to param


def decoupled_decay(group: Mapping[str, Any]) -> float:
    """1 − lr·weight_decay: decoupled weight decay, W ← W·(1 − lr·wd), applied before the update."""
    return 1.0 - float(group.get("lr", 0.0)) * float(group.get("weight_decay", 0.0) or 0.0)


def no_ns(group: Mapping[str, Any]) -> None:
    """The NS configuration of an optimizer without Newton–Schulz: none. (A named function, not a lambda,
    so that a worker process can be handed it.)"""
    return None


def no_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """The momentum of an optimizer spectralscope has no adapter for: unknown."""
    return None


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class by the shortest module path it is importable from
    (``torch.optim.Muon``, not ``torch.optim._muon.Muon``)."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        obj: Any = sys.modules.get(".".join(parts[:i]))
        for attr in cls.__qualname__.split("."):
            obj = getattr(obj, attr, None)
        if obj is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Adapter:
    """``momentum(param, group, state)`` → M or None; ``ns(group)`` → NSConfig or None.

    ``describe`` lists the hyper-parameter names copied from ``param_groups[0]`` into the run's
    ``optimizer`` attribute. ``applied(w_after, group, w_before)``, where known, reads the NS output the
    step just applied back from the parameter's values (None when it cannot be recovered exactly enough);
    the recorder then skips recomputing NS_k(M). It is only asked for parameters that had a gradient.
    ``known`` is False for the stand-in `adapter_for` gives an optimizer nobody registered.

    The self-check (``ns_consistency``) compares the direction the adapter implies with the step the
    optimizer applied: ``orthogonalize(M, group)`` computes O = NS_k(M) as the optimizer does (its own function;
    default: `newton_schulz.newton_schulz` with ``ns(group)``), ``direction(O, group, extra)`` what it applies
    after NS (NorMuon's row normalisation, AdaMuon's scaling; default O itself), with ``extra(param, group,
    state)`` the state that takes (default none), and ``decay(group)`` the factor W_before is multiplied by before
    the update (default `decoupled_decay`).

    ``keep(param, group, state)``, for optimizers that consume what M is built from (heavyball clears ``p.grad``
    as it steps), is called as a recorded step begins, for each parameter with a gradient; what it returns
    (copies: the step changes the originals in place) is passed to ``momentum`` as a fourth argument,
    ``momentum(param, group, state, kept)`` (None for a parameter it was not called for). ``stochastic``: the
    optimizer's NS rounds stochastically (heavyball), so the self-check compares within M's leading singular
    subspace (`optimizer_metrics.direction_cosine`). ``settings(param, group, state)``: the hyper-parameters that
    apply to one parameter, for optimizers that keep per-parameter switches in its state (Moonlight's
    ``use_muon``); what ``ns``, ``applied``, ``orthogonalize``, ``direction`` and ``decay`` are given as their group
    (default: the parameter's param group)."""

    momentum: MomentumFn
    ns: NSFn = no_ns
    describe: tuple[str, ...] = ("lr", "momentum", "weight_decay")
    applied: AppliedFn | None = None
    known: bool = True
    orthogonalize: OrthogonalizeFn | None = None
    direction: DirectionFn | None = None
    extra: ExtraFn | None = None
    decay: DecayFn = decoupled_decay
    keep: KeepFn | None = None
    stochastic: bool = False
    settings: SettingsFn | None = None


_REGISTRY: dict[type, Adapter] = {}
#: adapters of classes named "module.QualName", for packages that need not be installed (`third_party`)
_BY_NAME: dict[str, Adapter] = {}
#: adapters of optimizers people copy into their own code (no importable name): (name, matches(optimizer), adapter or
#: a factory of one)
_LAYOUTS: list[tuple[str, Callable[[Any], bool], Adapter | Callable[[Any], Adapter]]] = []


def register_layout(name: str, matches: Callable[[Any], bool], adapter: Adapter | Callable[[Any], Adapter]) -> None:
    """Register ``adapter`` for optimizers ``matches(optimizer)`` recognises by their class name and the
    hyper-parameters they declare (``optimizer.defaults``): the reference implementations that live as a file
    in each user's project, under any module name. Asked only when no class along the MRO has an adapter.
    ``adapter`` may be a factory, ``adapter(optimizer)`` → `Adapter`, for optimizers whose step depends on what
    they hold beyond their param groups (Dion's keeps its Newton–Schulz function on the instance)."""
    _LAYOUTS.append((name, matches, adapter))


def register_by_name(qualified: str, adapter: Adapter) -> None:
    """Register ``adapter`` for the class importable as ``qualified`` ("muon.SingleDeviceMuon"), without
    importing its package."""
    _BY_NAME[qualified] = adapter


def register_adapter(
    optimizer_class: type,
    momentum: MomentumFn,
    ns: NSFn | None = None,
    describe: tuple[str, ...] = ("lr", "momentum", "weight_decay"),
    applied: AppliedFn | None = None,
    orthogonalize: OrthogonalizeFn | None = None,
    direction: DirectionFn | None = None,
    extra: ExtraFn | None = None,
    decay: DecayFn = decoupled_decay,
    keep: KeepFn | None = None,
    stochastic: bool = False,
    settings: SettingsFn | None = None,
) -> Adapter:
    """Teach spectralscope a new optimizer class.

    ``momentum(param, group, state)`` is called after each recorded step with the parameter, its
    param group and ``optimizer.state[param]``, and returns the matrix the update is built from (or
    None). ``ns(group)`` returns the `NSConfig` the optimizer applies to it, or None. ``applied(w_after, group,
    w_before)`` (optional) returns the NS output the step applied, read back from the parameter's values
    before and after the step (see `spectralscope.newton_schulz.recover_applied`), or None to have it
    recomputed from M. ``orthogonalize``, ``direction``, ``extra`` and ``decay`` (optional) describe the step for
    the self-check ``ns_consistency`` (see `Adapter`). ``keep(param, group, state)`` (optional) copies, as a
    recorded step begins, what the step consumes (e.g. ``param.grad.clone()`` for an optimizer that clears the
    gradient); ``momentum`` is then called as ``momentum(param, group, state, kept)``. ``stochastic=True``: its NS
    rounds stochastically, and the self-check compares within M's leading singular subspace. ``settings(param,
    group, state)`` (optional): the hyper-parameters of one parameter, for optimizers that switch per parameter
    in its state (what ``ns`` and the others are then given as their group).
    """
    if not isinstance(optimizer_class, type):
        raise TypeError(f"optimizer_class must be a class, got {optimizer_class!r}")
    if not callable(momentum):
        raise TypeError("momentum must be callable (param, group, state) -> Tensor | None")
    for arg, fn in (("ns", ns), ("applied", applied), ("orthogonalize", orthogonalize), ("direction", direction),
                    ("extra", extra), ("decay", decay), ("keep", keep), ("settings", settings)):
        if fn is not None and not callable(fn):
            raise TypeError(f"register_adapter: {arg} must be callable or None, got {type(fn).__name__}")
    adapter = Adapter(momentum, ns or no_ns, tuple(describe), applied, True, orthogonalize, direction, extra, decay,
                      keep, bool(stochastic), settings)
    _REGISTRY[optimizer_class] = adapter
    return adapter


def adapter_for(optimizer: torch.optim.Optimizer) -> Adapter:
    """The adapter registered for the optimizer's class or its nearest base; otherwise a stand-in that knows no
    momentum and no NS (``known=False``: the recorder says so)."""
    for cls in type(optimizer).__mro__:
        adapter = _REGISTRY.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if adapter is not None:
            if adapter.applied is not None and getattr(type(optimizer), "step", None) is not getattr(cls, "step", None):
                # a subclass with its own step() may apply something else: recompute NS instead
                adapter = replace(adapter, applied=None)
            return adapter
    for _, matches, layout in _LAYOUTS:
        try:
            if not matches(optimizer):
                continue
        except Exception:  # a predicate that cannot read this optimizer does not match it
            continue
        return layout if isinstance(layout, Adapter) else layout(optimizer)
    return Adapter(no_momentum, known=False)


def _muon_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    # After the step buf = B_t; Muon feeds NS with g.lerp(B_t, μ) under Nesterov, else B_t.
    buf = state.get("momentum_buffer")
    if buf is None or p.grad is None:
        return buf
    return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf


def _muon_ns(group: Mapping[str, Any]) -> NSConfig:
    return NSConfig(tuple(group["ns_coefficients"]), int(group["ns_steps"]), float(group["eps"]), torch.bfloat16)


def muon_lr_ratio(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """Muon's step size per unit lr for a (rows, cols) matrix: sqrt(max(1, rows/cols)) by default
    ("original"), 0.2·sqrt(max(rows, cols)) for "match_rms_adamw", 1 otherwise (torch.optim.Muon's rule)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _muon_applied(after: Tensor, group: Mapping[str, Any], before: Tensor) -> Tensor | None:
    # Muon's step: W ← W·(1 − lr·wd), then W ← W − lr·ratio·O with O = NS_k(M) in bf16
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    decayed = before * (1 - lr * wd)  # the same float32 product as Muon's param.mul_
    return recover_applied(decayed, after, lr * muon_lr_ratio(group.get("adjust_lr_fn"), tuple(after.shape)))


def momentum_buffer(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """SGD's M: its ``momentum_buffer`` (absent with momentum=0). Named functions, not lambdas, throughout: the
    worker process is handed the adapters, and a lambda cannot be pickled (the records would be measured in the
    training process)."""
    return state.get("momentum_buffer")


def exp_avg(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """Adam's and AdamW's M: the first moment ``exp_avg``."""
    return state.get("exp_avg")


register_adapter(torch.optim.SGD, momentum_buffer, describe=("lr", "momentum", "nesterov", "weight_decay", "dampening"))
register_adapter(torch.optim.Adam, exp_avg, describe=("lr", "betas", "eps", "weight_decay"))
register_adapter(torch.optim.AdamW, exp_avg, describe=("lr", "betas", "eps", "weight_decay"))
if hasattr(torch.optim, "Muon"):
    register_adapter(
        torch.optim.Muon,
        _muon_momentum,
        _muon_ns,
        describe=("lr", "momentum", "nesterov", "ns_steps", "ns_coefficients", "eps", "weight_decay", "adjust_lr_fn"),
        applied=_muon_applied,
    )

from . import third_party  # noqa: E402, F401  (registers the adapters of the other packages)
