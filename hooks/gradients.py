"""`GradientSpectra`: singular values of the per-sample weight gradients of linear layers.

At a recorded step the first forward pass through each hooked ``nn.Linear`` keeps the inputs of its first
``max_samples`` samples and hooks the output tensor; when autograd delivers the gradient of the batch loss
with respect to that output (δ), the N×N Gram matrix of the per-sample gradients is formed from token inner
products (`spectralscope.per_sample`), never the per-sample gradients themselves. After the optimizer step
the spectrum is taken. Gradient accumulation: only the first micro-batch of the step is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from spectralscope.per_sample import gradient_metrics, per_sample_gram
from spectralscope.store import GroupSpec

from .modules import Context, check_every, check_modules, find_modules, module_coords


class GradientSpectra:
    """Record ``grad_sv`` (rank ≤ ``max_samples``), ``grad_soft_rank`` and ``grad_samples`` every ``every``
    optimizer steps for the watched ``nn.Linear`` layers (or the modules named in ``modules``)."""

    group = "gradients"

    def __init__(self, every: int = 100, max_samples: int = 64, modules: Sequence[str] | None = None):
        check_every("GradientSpectra", every)
        if not (isinstance(max_samples, int) and not isinstance(max_samples, bool) and max_samples >= 1):
            raise ValueError(f"GradientSpectra: max_samples must be an int >= 1, got {max_samples!r}")
        self.every = every
        self.max_samples = max_samples
        self.modules = check_modules("GradientSpectra", modules)
        self._names: list[str] = []
        self._grams: list[torch.Tensor | None] = []
        self._taken: list[bool] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.paused = False

    def bind(self, ctx: Context) -> None:
        """Find the modules and register a forward hook on each."""
        chosen = find_modules(ctx.model, ctx.layers, self.modules, "GradientSpectra")
        self.remove()  # an instance handed to a second watch() starts afresh
        self._names, self._grams, self._taken = [], [], []
        self._step, self._report = ctx.step, ctx.report
        for i, (name, module) in enumerate(chosen):
            self._names.append(name)
            self._grams.append(None)
            self._taken.append(False)
            self._handles.append(module.register_forward_hook(self._hook(i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def spec(self) -> GroupSpec:
        coords = {**module_coords(self._names, dim="layer", suffix=".weight"),
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
                try:
                    with torch.no_grad():
                        self._grams[i] = per_sample_gram(a, delta.detach()[: self.max_samples])
                except Exception as exc:  # never into the backward pass
                    self._report("grad_sv", self._names[i], f"failed ({type(exc).__name__}: {exc})")

            output.register_hook(on_grad)

        return hook

    def row(self, step: int) -> dict[str, np.ndarray] | None:
        """The record for ``step`` (after its optimizer step), or None when ``step`` is not recorded."""
        if step % self.every != 0:
            return None
        nm = len(self._names)
        out = {"grad_sv": np.full((nm, self.max_samples), np.nan), "grad_soft_rank": np.full(nm, np.nan),
               "grad_samples": np.full(nm, np.nan)}
        for i, k in enumerate(self._grams):
            self._grams[i], self._taken[i] = None, False
            if k is None:
                continue
            try:
                metrics = gradient_metrics(k)
            except Exception as exc:
                self._report("grad_sv", self._names[i], f"failed ({type(exc).__name__}: {exc})")
                continue
            sv = metrics["grad_sv"].cpu().numpy()
            out["grad_sv"][i, : len(sv)] = sv
            out["grad_soft_rank"][i] = float(metrics["grad_soft_rank"])
            out["grad_samples"][i] = len(sv)
            if not np.isfinite(sv).all():
                self._report("grad_sv", self._names[i], "is not finite")
        return out
