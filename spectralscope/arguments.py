"""The checks on `watch`'s arguments: a bad one raises at once, before anything is hooked or written, with
one line that names the argument, what it accepts and what it was given (objects by their type, never by a
repr that could run to pages, as a model's does)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import DEFAULT_OVERHEAD
from .estimate import EXACT_MAX
from .layers import check_kinds
from .schema import DEFAULT_QUANTILES


def shown(x: Any) -> str:
    """``x`` as an error message shows it: short literals by repr, anything else by its type."""
    if x is None or isinstance(x, (bool, int, float)):
        return repr(x)
    if isinstance(x, (str, Path)):
        text = repr(str(x))
        return text if len(text) <= 60 else text[:56] + "…'"
    if isinstance(x, (list, tuple)) and len(x) <= 12 and all(v is None or isinstance(v, (bool, int, float, str))
                                                            for v in x):
        text = repr(x)
        return text if len(text) <= 80 else text[:76] + "…"
    return f"a {type(x).__module__}.{type(x).__qualname__}"


def check(cond: bool, arg: str, accepted: str, got: Any) -> None:
    """``ValueError("watch(): <arg> must be <accepted>, got <got>")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"watch(): {arg} must be {accepted}, got {shown(got)}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def steps_by_hand(optimizer: Any) -> bool:
    """An optimizer that is not a ``torch.optim.Optimizer`` (so has no step hooks) but holds ``param_groups`` (a list
    of dicts with "params"), a ``state`` mapping and ``step()``, as modded-nanogpt's do: its steps are recorded
    where the user wraps them, ``with rec.stepping(): opt.step()``."""
    groups = getattr(optimizer, "param_groups", None)
    return (not isinstance(optimizer, torch.optim.Optimizer) and isinstance(groups, list)
            and all(isinstance(g, Mapping) and "params" in g for g in groups)
            and isinstance(getattr(optimizer, "state", None), Mapping) and callable(getattr(optimizer, "step", None)))


def is_optimizer(optimizer: Any) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) or steps_by_hand(optimizer)


def unwrap(optimizer: Any) -> Any:
    """The optimizer inside wrappers that hold it as ``.optimizer`` (HF accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): the one whose ``step`` updates the parameters and keeps the state."""
    for _ in range(8):  # wrappers of wrappers, not a cycle
        inner = getattr(optimizer, "optimizer", None)
        if not is_optimizer(inner) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def check_optimizer_and_model(optimizer: Any, model: Any) -> None:
    if isinstance(optimizer, nn.Module) and is_optimizer(model):
        raise ValueError("watch(): optimizer and model are swapped: the call is watch(optimizer, model, path)")
    check(is_optimizer(optimizer), "optimizer", "a torch.optim.Optimizer (or an object with param_groups, state and "
          "step(), stepped as `with rec.stepping(): opt.step()`)", optimizer)
    check(model is None or isinstance(model, nn.Module), "model", "an nn.Module or None", model)


def check_quantiles(quantiles: Any) -> list[float]:
    """The quantile levels as floats: a non-empty sequence of increasing distinct numbers in [0, 1]."""
    values = None
    if not isinstance(quantiles, (str, bytes, Mapping)):
        try:
            values = [math.nan if isinstance(q, (bool, str)) else float(q) for q in quantiles]
        except (TypeError, ValueError):  # not iterable, or not numbers
            values = None
    check(values is not None and len(values) > 0 and all(0 <= q <= 1 for q in values) and values == sorted(set(values)),
          "quantiles", "a sequence of increasing distinct levels in [0, 1], e.g. (0.1, 0.5, 0.9)", quantiles)
    return values


def check_layers(layers: Any) -> None:
    check(layers is None or isinstance(layers, str) or callable(layers),
          "layers", "a regex string, a callable (name, param) -> bool, or None", layers)
    if isinstance(layers, str):
        try:
            re.compile(layers)
        except re.error as exc:
            raise ValueError(f"watch(): layers must be a valid regex, got {shown(layers)} ({exc})") from None


def check_options(*, every: Any, meta: Any, name: Any, model_size: Any, ns_floor: Any, flush_seconds: Any,
                  resume: Any, overwrite: Any, storage_options: Any, exact_max: Any, sv_method: Any,
                  tensorboard: Any, background: Any, overhead: Any = None, lend_core: Any = False) -> None:
    """Every option of `watch` that is a plain value."""
    check(_is_int(every) and every >= 1, "every", "an int >= 1", every)
    check(overhead is None or (_is_number(overhead) and 0 < overhead < 1), "overhead",
          "a share of training time in (0, 1), e.g. 0.02, or None (no budget)", overhead)
    check(meta is None or isinstance(meta, Mapping), "meta", "a dict of JSON values or None", meta)
    if meta is not None:
        try:
            json.dumps(dict(meta), allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"watch(): meta must hold JSON values only ({exc})") from None
    check(name is None or (isinstance(name, str) and name != ""), "name", "a non-empty str or None", name)
    check(model_size is None or (_is_int(model_size) and model_size > 0), "model_size", "a positive int or None",
          model_size)
    check(_is_number(ns_floor) and ns_floor > 0, "ns_floor", "a number > 0 (the f_k floor, default 0.5)", ns_floor)
    check(_is_number(flush_seconds) and flush_seconds > 0, "flush_seconds", "a number of seconds > 0", flush_seconds)
    check(isinstance(resume, bool), "resume", "True or False", resume)
    check(isinstance(overwrite, bool), "overwrite", "True or False", overwrite)
    if resume and overwrite:
        raise ValueError("watch(): resume=True and overwrite=True exclude each other: choose one")
    check(storage_options is None or isinstance(storage_options, Mapping), "storage_options",
          "a dict of fsspec options or None", storage_options)
    check(exact_max is None or (_is_int(exact_max) and exact_max >= 1), "exact_max",
          "an int >= 1 (largest smaller side measured exactly) or None (always exact)", exact_max)
    check(isinstance(sv_method, str) and sv_method in ("auto", "exact", "slq"), "sv_method",
          "'auto', 'exact' or 'slq'", sv_method)
    check(tensorboard is None or (isinstance(tensorboard, (str, Path)) and str(tensorboard) != ""), "tensorboard",
          "a log directory (str or Path) or None", tensorboard)
    check(background is True or background is False or (isinstance(background, str)
                                                         and background in ("auto", "thread", "process")),
          "background", "'auto', True, False, 'thread' or 'process'", background)
    check(isinstance(lend_core, bool), "lend_core", "True or False", lend_core)


def check_writable(path: str | Path) -> None:
    """``ValueError`` naming ``path`` when a local run store could not be created or written there (an fsspec
    URL is the store's to judge)."""
    if "://" in str(path):
        return
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != p and not probe.is_dir():
        raise ValueError(f"watch(): path {str(path)!r} cannot be created: {probe} is a file, not a folder")
    if p.exists() and not p.is_dir():
        return  # the writer says what is there (FileExistsError), resume and overwrite included
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"watch(): path {str(path)!r} cannot be written: {probe} is not writable by this user")


def check_model_holds(optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], model: nn.Module | None
                      ) -> None:
    """``ValueError`` when the model holds none of the optimizers' parameters (every layer would be named
    ``param0``, ``param1``…: the wrong model, most likely)."""
    if model is None:
        return
    ours = {id(p) for p in model.parameters()}
    optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    if params and not any(id(p) in ours for p in params):
        raise ValueError(f"watch(): model holds none of the optimizer's {len(params)} parameters: pass the model "
                         "that this optimizer trains (or model=None to name them param0, param1, …)")


@dataclass
class Options:
    """`watch`'s options after the positional (optimizer, model, path), with their defaults; checked when made
    (`check_options`, `check_layers`, `check_quantiles`, the instruments' types). See `watch` for each."""

    every: int = 10
    meta: Mapping[str, Any] | None = None
    layers: Any = None
    kinds: Mapping[str, str] | None = None
    quantiles: Sequence[float] = DEFAULT_QUANTILES
    name: str | None = None
    model_size: int | None = None
    ns_floor: float = 0.5
    flush_seconds: float = 5.0
    resume: bool = False
    overwrite: bool = False
    storage_options: Mapping[str, Any] | None = None
    exact_max: int | None = EXACT_MAX
    sv_method: str = "auto"
    activations: Any = True
    gradients: Any = None
    sharpness: Any = None
    weights: Any = None
    attention: Any = None
    health: Any = True
    tensorboard: str | Path | None = None
    background: bool | str = "auto"
    overhead: float | None = DEFAULT_OVERHEAD
    lend_core: bool = False

    def __post_init__(self) -> None:
        from .hooks.activations import ActivationSpectra
        from .hooks.attention import AttentionLogits
        from .hooks.gradients import GradientSpectra
        from .hooks.sharpness import Sharpness
        from .hooks.weights import WeightSpectra

        check_options(every=self.every, meta=self.meta, name=self.name, model_size=self.model_size,
                      ns_floor=self.ns_floor, flush_seconds=self.flush_seconds, resume=self.resume,
                      overwrite=self.overwrite, storage_options=self.storage_options, exact_max=self.exact_max,
                      sv_method=self.sv_method, tensorboard=self.tensorboard, background=self.background,
                      overhead=self.overhead, lend_core=self.lend_core)
        check_layers(self.layers)
        self.quantiles = check_quantiles(self.quantiles)
        self.kind_rules = check_kinds(self.kinds)
        check(self.activations is None or isinstance(self.activations, (bool, ActivationSpectra)), "activations",
              "an ss.ActivationSpectra, True (defaults) or None/False (off)", self.activations)
        check(self.gradients is None or isinstance(self.gradients, (bool, GradientSpectra)), "gradients",
              "an ss.GradientSpectra, True (defaults) or None/False (off)", self.gradients)
        check(self.weights is None or isinstance(self.weights, (bool, WeightSpectra)), "weights",
              "an ss.WeightSpectra, True (every=100) or None/False (off)", self.weights)
        check(self.attention is None or isinstance(self.attention, (bool, AttentionLogits)), "attention",
              "an ss.AttentionLogits, True (every=50) or None/False (off)", self.attention)
        check(self.health in (None, False, True) or (isinstance(self.health, (list, tuple)) and all(
            callable(r) or hasattr(r, "check") for r in self.health)), "health",
              "True (the built-in rules), None/False (off) or a list of rules (functions of a record) added to them",
              self.health)
        check(self.sharpness is None or isinstance(self.sharpness, Sharpness), "sharpness",
              "an ss.Sharpness(loss_fn, batch, every=..., per_layer=...) or None", self.sharpness)


def options(given: Mapping[str, Any]) -> Options:
    """`Options` from ``watch``'s keyword arguments; an unknown one is named with the accepted names."""
    known = [f.name for f in fields(Options)]
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ValueError(f"watch(): unknown option {unknown[0]!r}; the options are {', '.join(known)}")
    return Options(**given)
