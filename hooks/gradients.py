"""`GradientSpectra`: singular values of the per-sample weight gradients of linear layers.

At a recorded step the first forward pass through each hooked linear module (``nn.Linear``, transformers'
``Conv1D``) keeps the inputs of its first
``max_samples`` samples and hooks the output tensor; when autograd delivers the gradient of the batch loss
with respect to that output (δ), the N×N Gram matrix of the per-sample gradients is formed from token inner
products (`spectralscope.per_sample`), never the per-sample gradients themselves. After the optimizer step
the spectrum is taken. Gradient accumulation: only the first micro-batch of the step is used.

With ``defer`` (set by `watch` when records are measured off the training thread) the backward hook only
copies a and δ, up to ``DEFER_BYTES`` per record, and `GradientFinisher` forms the Gram matrices where the
record is finished (a worker process or thread); layers beyond the budget are formed in the hook as before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from spectralscope.per_sample import gradient_metrics, per_sample_gram
from spectralscope.store import GroupSpec

from .modules import Context, check_every, check_modules, find_modules, module_coords, module_kinds

#: Copies of a and δ a deferred record may hold at once; beyond it the Gram matrix is formed in the hook.
DEFER_BYTES = 256 << 20


class GradientFinisher:
    """Turns a record's per-layer Gram matrices, or the (a, δ) copies to form them from, into its row. No
    hooks: it runs where the record is finished — the training thread, a worker thread or a worker process."""

    def __init__(self, names: Sequence[str], max_samples: int) -> None:
        self.names, self.max_samples = list(names), int(max_samples)

    def finish(self, taken: list) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        """The row from what `GradientSpectra.take` returned, and (metric, layer, why) of every spectrum that is
        not finite or failed."""
        problems: list[tuple[str, str, str]] = []
        report = lambda *p: problems.append(p)  # noqa: E731
        nm = len(self.names)
        out = {"grad_sv": np.full((nm, self.max_samples), np.nan), "grad_soft_rank": np.full(nm, np.nan),
               "grad_samples": np.full(nm, np.nan)}
        for i, k in enumerate(taken):
            if k is None:
                continue
            try:
                with torch.no_grad():
                    if isinstance(k, tuple):
                        k = per_sample_gram(*k)
                    metrics = gradient_metrics(k)
            except Exception as exc:
                report("grad_sv", self.names[i], f"failed ({type(exc).__name__}: {exc})")
                continue
            sv = metrics["grad_sv"].cpu().numpy()
            out["grad_sv"][i, : len(sv)] = sv
            out["grad_soft_rank"][i] = float(metrics["grad_soft_rank"])
            out["grad_samples"][i] = len(sv)
            if not np.isfinite(sv).all():
                report("grad_sv", self.names[i], "is not finite")
        return out, problems


class GradientSpectra:
    """Record ``grad_sv`` (rank ≤ ``max_samples``), ``grad_soft_rank`` and ``grad_samples`` every ``every``
    optimizer steps for the watched linear layers (``nn.Linear``, transformers' ``Conv1D``) or the modules named
    in ``modules``."""

    group = "gradients"

    @property
    def may_defer(self) -> bool:
        """Whether hooks may keep copies of a and δ for the record to be finished elsewhere (not under
        torch.distributed)."""
        from spectralscope import distributed

        return not distributed.active()

    def __init__(self, every: int = 100, max_samples: int = 64, modules: Sequence[str] | None = None):
        check_every("GradientSpectra", every)
        if not (isinstance(max_samples, int) and not isinstance(max_samples, bool) and max_samples >= 1):
            raise ValueError(f"GradientSpectra: max_samples must be an int >= 1, got {max_samples!r}")
        self.every = every
        self.max_samples = max_samples
        self.modules = check_modules("GradientSpectra", modules)
        self._names: list[str] = []
        self._grams: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None] = []
        self._taken: list[bool] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._deferred_bytes = 0
        self.paused = False
        self.live = False  # the payload: Gram matrices, or copies of a and δ (``defer``)
        self.defer = False
        self.finisher = GradientFinisher([], max_samples)

    def bind(self, ctx: Context) -> None:
        """Find the modules and register a forward hook on each."""
        chosen = find_modules(ctx.model, ctx.layers, self.modules, "GradientSpectra")
        self.remove()  # an instance handed to a second watch() starts afresh
        self._names, self._grams, self._taken = [], [], []
        self._kinds = module_kinds(chosen, ctx.layers)
        self._step, self._ledger, self._spend = ctx.step, ctx.ledger, ctx.spend
        for i, (name, module) in enumerate(chosen):
            self._names.append(name)
            self._grams.append(None)
            self._taken.append(False)
            self._handles.append(module.register_forward_hook(self._hook(i)))
        self.finisher = GradientFinisher(self._names, self.max_samples)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def spec(self) -> GroupSpec:
        coords = {**module_coords(self._names, dim="layer", suffix=".weight", kinds=self._kinds),
                  "rank": ("rank", np.arange(1, self.max_samples + 1, dtype=np.int64))}
        variables = {"grad_sv": ("step", "layer", "rank"), "grad_soft_rank": ("step", "layer"),
                     "grad_samples": ("step", "layer")}
        return GroupSpec(self.group, coords, variables)

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if (self.paused or self._taken[i] or self._step() % self.every != 0 or not args
                    or not isinstance(output, torch.Tensor) or not output.requires_grad):
                return
            self._taken[i] = True
            a = args[0].detach()[: self.max_samples]

            def on_grad(delta: torch.Tensor) -> None:
                t = time.perf_counter()
                try:
                    with torch.no_grad():
                        d = delta.detach()[: self.max_samples]
                        size = a.numel() * a.element_size() + d.numel() * d.element_size()
                        if self.defer and self._deferred_bytes + size <= DEFER_BYTES:
                            self._deferred_bytes += size  # copies: autograd may reuse δ's buffer
                            self._grams[i] = (a.clone(), d.clone())
                        else:
                            self._grams[i] = per_sample_gram(a, d)
                except Exception as exc:  # never into the backward pass
                    self._ledger.failed("grad_sv", self._names[i], exc)
                finally:
                    self._spend(time.perf_counter() - t)

            output.register_hook(on_grad)

        return hook

    def take(self, step: int) -> list | None:
        """After the step: this record's Gram matrices (or, deferred, the copies to form them from), leaving
        the instrument ready for the next one; None when ``step`` is not recorded. The finisher makes the row."""
        if step % self.every != 0:
            return None
        taken, self._grams = self._grams, [None] * len(self._grams)
        self._taken = [False] * len(self._taken)
        self._deferred_bytes = 0
        return taken
