"""What every instrument shares: the protocol it follows, the context it is bound with, which modules it hooks,
and their coordinates in the store.

The protocol (the optimizer record, `spectralscope.optimizer_record.OptimizerRecord`, follows it too):

- ``bind(ctx)``: find what to hook and hook it; ``spec()``: the store layout of its group;
- ``take(step) -> payload | None``: on the training thread, after ``optimizer.step()``: what the record of
  ``step`` is made from (None when the step is not recorded), copying only what must be copied;
- ``finisher.finish(payload) -> (row, problems)``: makes the row, in whichever runner finishes the record (the
  training thread, a worker thread, the worker process: the finisher is picklable);
- ``remove()``: take the hooks off.

Besides: ``group`` (its store group), ``every``, ``live`` (the payload holds tensors training changes in place:
a runner that finishes it later copies them first), ``paused`` (the sharpness probe's own passes are not
recorded), ``defer`` (set by the recorder once its runner is known: the record is finished elsewhere, so hooks
keep copies instead of reducing them at once), and optionally ``before_step(step)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectralscope.layers import Layer, block_index, is_linear, layer_kind
from spectralscope.ledger import Ledger


@dataclass
class Context:
    """What the recorder hands an instrument: the model, the watched layers, the optimizer, the index of the
    optimizer step under way, the run's error `Ledger`, ``pause(flag)``, which stops every instrument's hooks
    (the sharpness probe's own passes are not recorded), ``writes``, and ``spend(seconds)``, told the wall time
    each module hook took on a recorded step (the overhead budget, `spectralscope.budget`)."""

    model: nn.Module | None
    layers: Sequence[Layer]
    optimizer: torch.optim.Optimizer
    step: Callable[[], int]
    ledger: Ledger
    pause: Callable[[bool], None]
    writes: bool = True  # False on the ranks other than 0: take part in collectives, skip what only feeds the store
    spend: Callable[[float], None] = lambda seconds: None  # noqa: E731  (the module hooks' wall time: the budget)


def find_modules(model: nn.Module | None, layers: Sequence[Layer], names: Sequence[str] | None,
                 owner: str) -> list[tuple[str, nn.Module]]:
    """The modules named in ``names``, or else every linear module (`layers.is_linear`: ``nn.Linear``,
    transformers' ``Conv1D``) whose weight is watched. ``ValueError`` (prefixed with ``owner``) when there is
    no model, a name is unknown or not a linear module, or nothing is found."""
    if model is None:
        raise ValueError(f"{owner} needs the model: watch(optimizer, model, ...)")
    named = dict(model.named_modules())
    if names is not None:
        missing = [m for m in names if m not in named]
        if missing:
            raise ValueError(f"{owner}: no module named {missing[0]!r} in the model")
        for m in names:
            if not is_linear(named[m]):
                raise ValueError(f"{owner}: {m!r} is a {type(named[m]).__name__}; it takes linear modules "
                                 "(nn.Linear or transformers' Conv1D)")
        return [(m, named[m]) for m in names]
    watched = {id(lay.param) for lay in layers}
    chosen = [(n, m) for n, m in named.items() if is_linear(m) and id(m.weight) in watched]
    if not chosen:
        raise ValueError(f"{owner}: no linear module (nn.Linear or transformers' Conv1D) among the watched layers; "
                         "name modules= explicitly")
    return chosen


def module_coords(names: Sequence[str], dim: str = "module", suffix: str = "",
                  kinds: Sequence[str] | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """The ``dim`` coordinate (module names + ``suffix``) with its ``kind`` (``kinds``, else from
    ``name + ".weight"``) and ``depth`` (block / (blocks − 1)). Activations are per module; per-sample
    gradients are per weight, so they use ``dim="layer", suffix=".weight"`` (SPEC §5 names the gradients'
    axis ``layer``)."""
    blocks = [b for b in (block_index(n) for n in names) if b is not None]
    top = max(blocks) if blocks else 0
    depth = [np.nan if (b := block_index(n)) is None else (1.0 if top == 0 else b / top) for n in names]
    return {
        dim: (dim, np.array([n + suffix for n in names])),
        "kind": (dim, np.array(list(kinds) if kinds is not None else [layer_kind(n + ".weight") for n in names])),
        "depth": (dim, np.array(depth, dtype=np.float64)),
    }


def module_kinds(modules: Sequence[tuple[str, nn.Module]], layers: Sequence[Layer]) -> list[str]:
    """The kind of each module: that of the watched layer its weight is (so ``watch(kinds=...)`` holds here
    too), else read off its name."""
    kind_of = {id(lay.param): lay.kind for lay in layers if lay.view.identity or lay.view.transpose}
    return [kind_of.get(id(getattr(m, "weight", None)), layer_kind(n + ".weight")) for n, m in modules]


def check_every(owner: str, every: object) -> None:
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"{owner}: every must be an int >= 1, got {every!r}")


def check_modules(owner: str, modules: object) -> list[str] | None:
    """``modules`` as a list of module names (None stays None); ``ValueError`` for anything else."""
    if modules is None:
        return None
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{owner}: modules must be a list of module names or None, got {modules!r}")
    return list(modules)
