"""The optimizer record as an instrument (the protocol of `spectralscope.hooks.modules`): before a recorded step
it keeps W_before; after it, `after` gathers each layer's inputs — M as the adapter reads it from the optimizer,
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
    elif adapter.settings is not None:  # per parameter: the optimizer switches NS on and off in their state
        params = [p for g in optimizer.param_groups for p in g["params"]]
        without = [p for g in optimizer.param_groups for p in g["params"]
                   if ns_of(adapter, _settings_of(adapter, p, g, optimizer.state.get(p, {}))) is None]
        if len(without) == len(params):
            notes["newton_schulz"] = f"not applicable ({name} applies no Newton–Schulz)"
        elif without:
            notes["newton_schulz"] = (f"not applicable to {len(without)} of {len(params)} parameters ({name} "
                                      "applies no Newton–Schulz to them)")
    else:
        configs = [_ns_and_error(adapter, g) for g in optimizer.param_groups]
        errors = [e for _, e in configs if e]
        if errors:
            notes["newton_schulz"] = (f"not recorded for the layers of {len(errors)} of {len(configs)} param "
                                      f"groups ({errors[0]})")
            return notes
        without = [c for c, _ in configs if c is None]
        if len(without) == len(optimizer.param_groups):
            notes["newton_schulz"] = f"not applicable ({name} applies no Newton–Schulz)"
        elif without:
            notes["newton_schulz"] = (f"not applicable to the layers of {len(without)} of {len(optimizer.param_groups)} "
                                      f"param groups ({name} applies no Newton–Schulz there, e.g. its Adam groups)")
    return notes


def all_coverage_notes(adapters: Sequence[Adapter], optimizers: Sequence[torch.optim.Optimizer],
                       names: Sequence[str]) -> dict[str, str]:
    """`coverage_notes` of each watched optimizer; with several, each note says whose layers it is about."""
    each = [coverage_notes(a, o, n) for a, o, n in zip(adapters, optimizers, names, strict=True)]
    if len(each) == 1:
        return each[0]
    families = dict.fromkeys(f for notes in each for f in notes)
    return {f: "; ".join(f"the layers of {n}: {notes[f]}" for n, notes in zip(names, each, strict=True) if f in notes)
            for f in families}


def _settings_of(adapter: Adapter, p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        return adapter.settings(p, group, state) if adapter.settings is not None else group
    except Exception:
        return group


def _ns_and_error(adapter: Adapter, group: Mapping[str, Any]) -> tuple[Any, str]:
    """(the adapter's NS configuration of a param group, or None; why it could not be had, "" when it could)."""
    try:
        return adapter.ns(group), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def ns_of(adapter: Adapter, group: Mapping[str, Any]) -> Any:
    """The adapter's NS configuration of a param group; None where it fails (measured per record, where the
    failure is counted with its reason)."""
    return _ns_and_error(adapter, group)[0]


class OptimizerRecord:
    """The ``optimizer`` group's instrument, over one or several optimizers (``optimizers``, each with its
    ``adapters[j]`` and qualified class name ``names[j]``; ``Layer.optimizer`` says whose each layer is).
    ``measurer`` is its finisher (a `Measurer`, or under FSDP2 the `distributed.ShardedMeasurer` around it);
    ``note(family, text)`` is told once when a known optimizer turns out to keep no momentum for a layer it
    stepped. ``takes`` is False on a process that neither measures nor gathers (a rank other than 0 outside
    FSDP2).

    Training steps are counted by optimizer 0 (the clock; a single optimizer's step count, as before). Another
    optimizer's step belongs to the training step the clock is in: the clock's next one if that optimizer steps
    before the clock (learned from its first step), the clock's last one if after. `before` keeps W_before of a
    recorded step, `after` the layers' inputs, and the row is complete — `after` returns it — once every
    optimizer has stepped. A recorded step that some optimizer skipped (a GradScaler's inf check is per
    optimizer) is given up, never completed with another step's tensors: `after` returns it, `unfinished` the
    last ones at close."""

    group = "optimizer"
    live = True  # M and W_after: the next step changes them in place
    defer = False
    paused = False

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], layers: Sequence[Layer],
                 adapters: Sequence[Adapter], every: int, measurer: Measurer, names: Sequence[str],
                 note: Callable[[str, str], None], takes: bool = True):
        self.optimizers, self.layers, self.adapters = list(optimizers), list(layers), list(adapters)
        self.every, self.names, self._note, self.takes = every, list(names), note, takes
        self.finisher: Any = measurer
        self.measurer = measurer
        self._group_of = {id(p): g for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        self._mine = [[i for i, lay in enumerate(self.layers) if lay.optimizer == j] for j in range(len(optimizers))]
        self._clock = self._start = 0  # training steps done (optimizer 0's step() calls); the first of this run
        self._ahead: dict[int, bool] = {}  # optimizer j → it steps before the clock in a training step
        self._before: list[dict[int, Tensor] | None] = [None] * len(self.optimizers)
        # the parameters with a gradient as optimizer j starts a recorded step (some clear p.grad as they step)
        self._graded: list[set[int]] = [set() for _ in self.optimizers]
        self._kept: list[dict[int, Any]] = [{} for _ in self.optimizers]  # adapter.keep's copies, by parameter
        self._parts: dict[int, dict[int, list[LayerInputs]]] = {}  # step → {optimizer: its layers' inputs}
        self._said_no_momentum = False
        self._inconsistent: set[str] = set()

    def start(self, step: int) -> None:
        """A resumed run goes on from training step ``step``."""
        self._clock = self._start = step

    def spec(self) -> GroupSpec:
        coords = {**layer_coords(self.layers, self.names),
                  "quantile": ("quantile", np.array(self.measurer.quantiles, dtype=np.float64)),
                  "sv_method": ("layer", np.array([self.measurer.methods[lay.name] for lay in self.layers]))}
        variables = {v: ("step", "layer", "quantile") if q else ("step", "layer")
                     for v, q in self.measurer.variables.items()}
        return GroupSpec(self.group, coords, variables)

    def remove(self) -> None:
        self._before = [None] * len(self.optimizers)
        self._kept = [{} for _ in self.optimizers]
        self._parts.clear()

    def inspect(self, step: int, row: Mapping[str, Any]) -> None:
        """The self-check of a finished row: a layer whose ``ns_consistency`` is below `CONSISTENCY_TOLERANCE` is
        warned about once, and the run's notes say so."""
        values = row.get("ns_consistency")
        if values is None:
            return
        for lay, v in zip(self.layers, np.asarray(values, dtype=np.float64), strict=True):
            if np.isfinite(v) and v < CONSISTENCY_TOLERANCE and lay.name not in self._inconsistent:
                self._inconsistent.add(lay.name)
                name = self.names[lay.optimizer]
                log.warning("spectralscope: at step %d the recorded momentum of %s does not reproduce the update %s "
                            "applied (ns_consistency %.4f < %.2f): the adapter for %s is probably wrong, or its "
                            "Newton–Schulz is not the optimizer's (register orthogonalize=); warned once per layer",
                            step, lay.name, name, v, CONSISTENCY_TOLERANCE, name)
                self._note("consistency", f"the recorded momentum does not reproduce the applied update for "
                                          f"{len(self._inconsistent)} layer(s), e.g. {lay.name} (ns_consistency "
                                          f"{v:.4f} < {CONSISTENCY_TOLERANCE}): check the adapter for {name}")

    def _step_of(self, j: int) -> int:
        """The training step optimizer ``j`` is stepping in."""
        if j == 0:
            return self._clock
        ahead = self._ahead.setdefault(j, self._clock == self._start)  # its first step came before the clock's
        return self._clock if ahead else self._clock - 1

    def before(self, j: int) -> None:
        """Before optimizer ``j`` steps: keep its layers' W_before when its step is recorded (a failed snapshot
        only costs this step's update metrics: raised, and counted by the caller)."""
        self._before[j] = None
        if self._step_of(j) % self.every == 0 and self.takes:
            self._graded[j] = {id(self.layers[i].param) for i in self._mine[j] if self.layers[i].param.grad is not None}
            with torch.no_grad():
                self._kept[j] = self._keep(j)
                self._before[j] = {id(self.layers[i].param): self.layers[i].param.detach().clone()
                                   for i in self._mine[j]}

    def _keep(self, j: int) -> dict[int, Any]:
        """What optimizer ``j``'s adapter keeps of each graded parameter as its recorded step begins (a failure
        becomes that layer's momentum NaN reason)."""
        keep = self.adapters[j].keep
        if keep is None:
            return {}
        kept: dict[int, Any] = {}
        opt = self.optimizers[j]
        for i in self._mine[j]:
            p = self.layers[i].param
            if id(p) in self._graded[j] and id(p) not in kept:
                try:
                    kept[id(p)] = keep(p, self._group_of.get(id(p), opt.param_groups[0]), opt.state.get(p, {}))
                except Exception as exc:
                    kept[id(p)] = portable(exc)
        return kept

    def after(self, j: int) -> tuple[tuple[int, list[LayerInputs]] | None, list[int]]:
        """After optimizer ``j`` stepped: ((training step, the whole row's inputs) once every optimizer has stepped
        in a recorded step, else None; the recorded steps given up). The inputs are references to the live M and
        W_after (``live``)."""
        step = self._step_of(j)
        if j == 0:
            self._clock += 1
        before, self._before[j] = self._before[j], None
        # an optimizer stepping in step s has every optimizer's step s-1 behind it: what is still open is dead,
        # and so is a step j already gave its part to (j stepped twice in it: the clock skipped one)
        given_up = [s for s, parts in self._parts.items() if s < step or (s == step and j in parts)]
        for s in given_up:
            del self._parts[s]
        if step % self.every != 0 or not self.takes:
            return None, given_up
        with torch.no_grad():
            part = [self._inputs(self.layers[i], before, self._graded[j], self._kept[j]) for i in self._mine[j]]
        self._graded[j], self._kept[j] = set(), {}
        parts = self._parts.setdefault(step, {})
        parts[j] = part
        if len(parts) < len(self.optimizers):
            return None, given_up
        del self._parts[step]
        inputs: list[Any] = [None] * len(self.layers)
        for k, indices in enumerate(self._mine):
            for i, x in zip(indices, parts[k], strict=True):
                inputs[i] = x
        return (step, inputs), given_up

    def unfinished(self) -> list[int]:
        """The recorded steps still waiting for an optimizer (given up at close)."""
        steps = sorted(self._parts)
        self._parts.clear()
        return steps

    def _inputs(self, lay: Layer, snapshot: Mapping[int, Tensor] | None, graded: set[int],
                kept: Mapping[int, Any]) -> LayerInputs:
        p, opt, adapter = lay.param, self.optimizers[lay.optimizer], self.adapters[lay.optimizer]
        stepped = p.grad is not None or id(p) in graded
        name = self.names[lay.optimizer]
        group = self._group_of.get(id(p), opt.param_groups[0])
        state = opt.state.get(p, {})
        m, why = None, None
        try:
            if adapter.keep is None:
                m = adapter.momentum(p, group, state)
            else:
                held = kept.get(id(p))
                if isinstance(held, BaseException):
                    raise held
                m = adapter.momentum(p, group, state, held)
            if m is not None and not (isinstance(m, Tensor) and m.is_floating_point() and m.shape == p.shape):
                got = (f"a {m.dtype} tensor of shape {tuple(m.shape)}" if isinstance(m, Tensor)
                       else f"a {type(m).__name__}")
                m = None
                raise ValueError(f"the adapter for {name} returned {got} as the momentum of a parameter "
                                 f"of shape {tuple(p.shape)}; it must return a floating tensor of the parameter's shape")
        except Exception as exc:
            why = portable(exc)  # it may travel to the worker process
        if m is None and why is None and adapter.known and stepped and not self._said_no_momentum:
            self._said_no_momentum = True
            self._note("momentum", f"not recorded for {lay.name} and any layer like it ({name} keeps "
                                   "no momentum for it, e.g. SGD with momentum=0)")
            log.warning("spectralscope: momentum_sv and momentum_norm of %s are NaN: %s keeps no momentum for it "
                        "(warned once)", lay.name, name)
        before = snapshot.get(id(p)) if snapshot is not None else None
        hyper = {k: v for k, v in group.items() if k != "params"}
        if adapter.settings is not None:
            try:
                hyper = {k: v for k, v in adapter.settings(p, group, state).items() if k != "params"}
            except Exception as exc:  # its momentum and NS come out NaN, with the reason
                m, why = None, why or portable(exc)
        extra = None
        if adapter.extra is not None:
            try:
                extra = adapter.extra(p, group, state)
            except Exception:  # the self-check of this layer comes out NaN, counted where it is measured
                extra = None
        return LayerInputs(None if m is None else m.detach(), p.detach(), before, why, hyper, stepped,
                           None if extra is None else extra.detach())
