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
    elif all(ns_of(adapter, g) is None for g in optimizer.param_groups):
        notes["newton_schulz"] = f"not applicable ({name} applies no Newton–Schulz)"
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

    def spec(self) -> GroupSpec:
        coords = {**layer_coords(self.layers),
                  "quantile": ("quantile", np.array(self.measurer.quantiles, dtype=np.float64)),
                  "sv_method": ("layer", np.array([self.measurer.methods[lay.name] for lay in self.layers]))}
        variables = {v: ("step", "layer", "quantile") if q else ("step", "layer")
                     for v, q in self.measurer.variables.items()}
        return GroupSpec(self.group, coords, variables)

    def remove(self) -> None:
        self._before = None

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
        return LayerInputs(None if m is None else m.detach(), p.detach(), before, why, hyper, p.grad is not None)
