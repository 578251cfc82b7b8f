"""The optimizer record as an instrument (the protocol of `spectralscope.hooks.modules`): before a recorded step
it keeps W_before; after it, `take` gathers each layer's inputs — M as the adapter reads it from the optimizer,
W_after, W_before, the param group's hyper-parameters — and the `Measurer` (its finisher) makes the row.

It also says what the optimizer leaves unrecorded by construction (`coverage_notes`): an optimizer without an
adapter, one without Newton–Schulz, one that keeps no momentum for a layer it stepped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .adapters import Adapter
from .layers import Layer, layer_coords
from .measure import LayerInputs, Measurer
from .store import GroupSpec
from .worker import portable

log = logging.getLogger("spectralscope")

#: Below this ``ns_consistency`` the recorded momentum does not reproduce the step the optimizer applied. With the
#: optimizer's own Newton–Schulz (every built-in adapter names it; ``torch.optim.Muon``'s is spectralscope's)
#: a right adapter gives 1 to rounding; a momentum taken one lerp off (a Keller-style in-place Nesterov read as
#: torch's) gives 0.90–0.99. A different bf16 NS implementation alone can lower it to ≈ 0.96: an adapter should
#: name the optimizer's own function (``orthogonalize``).
CONSISTENCY_TOLERANCE = 0.99


def coverage_notes(adapter: Adapter, optimizer: torch.optim.Optimizer, name: str) -> dict[str, str]:
    """{metric family: why it is NaN by construction} for ``optimizer`` (its qualified class ``name``); an
    optimizer without adapter is warned about here, once, with what will be NaN and how to register one."""
    notes: dict[str, str] = {}
    if not adapter.known:
        why = f"no adapter for {name}"
        notes["momentum"] = notes["newton_schulz"] = f"not recorded ({why})"
        log.warning(
            "spectralscope: %s: momentum_sv, momentum_norm, ns_out_sv, ns_polar_err, ns_orth_err and ns_fail_frac "
            "will be NaN, because spectralscope does not know where this optimizer keeps its momentum or whether "
            "it orthogonalises it (update_*, neuron_* and weight_spectral_norm are recorded). Teach it with "
            "ss.register_adapter(%s, momentum=lambda param, group, state: <the matrix it orthogonalises>, "
            "ns=lambda group: ss.NSConfig(...) or None)", why, type(optimizer).__qualname__)
    else:
        without = [g for g in optimizer.param_groups if ns_of(adapter, g) is None]
        if len(without) == len(optimizer.param_groups):
            notes["newton_schulz"] = f"not applicable ({name} applies no Newton–Schulz)"
        elif without:
            notes["newton_schulz"] = (f"not applicable to the layers of {len(without)} of {len(optimizer.param_groups)} "
                                      f"param groups ({name} applies no Newton–Schulz there, e.g. its Adam groups)")
    return notes


def ns_of(adapter: Adapter, group: Mapping[str, Any]) -> Any:
    """The adapter's NS configuration of a param group; None where it fails (measured per record, where the
    failure is counted with its reason)."""
    try:
        return adapter.ns(group)
    except Exception:
        return None


class OptimizerRecord:
    """The ``optimizer`` group's instrument. ``measurer`` is its finisher (a `Measurer`, or under FSDP2 the
    `distributed.ShardedMeasurer` around it); ``note(family, text)`` is told once when a known optimizer turns
    out to keep no momentum for a layer it stepped. ``takes`` is False on a process that neither measures nor
    gathers (a rank other than 0 outside FSDP2)."""

    group = "optimizer"
    live = True  # M and W_after: the next step changes them in place
    defer = False
    paused = False

    def __init__(self, optimizer: torch.optim.Optimizer, layers: Sequence[Layer], adapter: Adapter, every: int,
                 measurer: Measurer, optimizer_name: str, note: Callable[[str, str], None], takes: bool = True):
        self.optimizer, self.layers, self.adapter, self.every = optimizer, list(layers), adapter, every
        self.finisher: Any = measurer
        self.measurer = measurer
        self.optimizer_name, self._note, self.takes = optimizer_name, note, takes
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._before: dict[int, Tensor] | None = None
        self._said_no_momentum = False
        self._inconsistent: set[str] = set()

    def spec(self) -> GroupSpec:
        coords = {**layer_coords(self.layers),
                  "quantile": ("quantile", np.array(self.measurer.quantiles, dtype=np.float64)),
                  "sv_method": ("layer", np.array([self.measurer.methods[lay.name] for lay in self.layers]))}
        variables = {v: ("step", "layer", "quantile") if q else ("step", "layer")
                     for v, q in self.measurer.variables.items()}
        return GroupSpec(self.group, coords, variables)

    def remove(self) -> None:
        self._before = None

    def inspect(self, step: int, row: Mapping[str, Any]) -> None:
        """The self-check of a finished row: a layer whose ``ns_consistency`` is below `CONSISTENCY_TOLERANCE` is
        warned about once, and the run's notes say so."""
        values = row.get("ns_consistency")
        if values is None:
            return
        for lay, v in zip(self.layers, np.asarray(values, dtype=np.float64), strict=True):
            if np.isfinite(v) and v < CONSISTENCY_TOLERANCE and lay.name not in self._inconsistent:
                self._inconsistent.add(lay.name)
                log.warning("spectralscope: at step %d the recorded momentum of %s does not reproduce the update %s "
                            "applied (ns_consistency %.4f < %.2f): the adapter for %s is probably wrong, or its "
                            "Newton–Schulz is not the optimizer's (register orthogonalize=); warned once per layer",
                            step, lay.name, self.optimizer_name, v, CONSISTENCY_TOLERANCE, self.optimizer_name)
                self._note("consistency", f"the recorded momentum does not reproduce the applied update for "
                                          f"{len(self._inconsistent)} layer(s), e.g. {lay.name} (ns_consistency "
                                          f"{v:.4f} < {CONSISTENCY_TOLERANCE}): check the adapter for "
                                          f"{self.optimizer_name}")

    def before_step(self, step: int) -> None:
        """Keep W_before of a recorded step (a failed snapshot only costs this step's update metrics: raised,
        and counted by the caller)."""
        self._before = None
        if step % self.every == 0 and self.takes:
            with torch.no_grad():
                self._before = {id(lay.param): lay.param.detach().clone() for lay in self.layers}

    def take(self, step: int) -> list[LayerInputs] | None:
        """Each layer's inputs after the step (references to the live M and W_after: ``live``), or None when the
        step is not recorded here."""
        if step % self.every != 0 or not self.takes:
            self._before = None
            return None
        with torch.no_grad():
            inputs = [self._inputs(lay) for lay in self.layers]
        self._before = None
        return inputs

    def _inputs(self, lay: Layer) -> LayerInputs:
        p = lay.param
        group = self._group_of.get(id(p), self.optimizer.param_groups[0])
        m, why = None, None
        try:
            m = self.adapter.momentum(p, group, self.optimizer.state.get(p, {}))
            if m is not None and not (isinstance(m, Tensor) and m.is_floating_point() and m.shape == p.shape):
                got = (f"a {m.dtype} tensor of shape {tuple(m.shape)}" if isinstance(m, Tensor)
                       else f"a {type(m).__name__}")
                m = None
                raise ValueError(f"the adapter for {self.optimizer_name} returned {got} as the momentum of a parameter "
                                 f"of shape {tuple(p.shape)}; it must return a floating tensor of the parameter's shape")
        except Exception as exc:
            why = portable(exc)  # it may travel to the worker process
        if m is None and why is None and self.adapter.known and p.grad is not None and not self._said_no_momentum:
            self._said_no_momentum = True
            self._note("momentum", f"not recorded for {lay.name} and any layer like it ({self.optimizer_name} keeps "
                                   "no momentum for it, e.g. SGD with momentum=0)")
            log.warning("spectralscope: momentum_sv and momentum_norm of %s are NaN: %s keeps no momentum for it "
                        "(warned once)", lay.name, self.optimizer_name)
        before = self._before.get(id(p)) if self._before is not None else None
        hyper = {k: v for k, v in group.items() if k != "params"}
        extra = None
        if self.adapter.extra is not None:
            try:
                extra = self.adapter.extra(p, group, self.optimizer.state.get(p, {}))
            except Exception:  # the self-check of this layer comes out NaN, counted where it is measured
                extra = None
        return LayerInputs(None if m is None else m.detach(), p.detach(), before, why, hyper, p.grad is not None,
                           None if extra is None else extra.detach())
