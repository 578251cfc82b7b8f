"""`Sharpness`: the normalized directional sharpness of the realised step (SPEC §6 "Sharpness").

Before a recorded step the parameters θ are kept; after it, u = θ_after − θ_before over every parameter
the optimizer updated. The probe then puts θ back, evaluates L0 = loss_fn(model, batch), g = ∇L0 and Hu
by double backward (under the MATH attention backend: fused attention kernels have no double backward),
and L(θ_after) on the same batch. Dropout is off during the probe; the parameters, their gradients, the
module buffers and modes, and the random state are restored exactly afterwards, so training continues
bit for bit. The other instruments are paused while it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from spectralscope.layers import layer_coords
from spectralscope.store import GroupSpec

from .modules import Context, check_every

SCALARS = ("loss_before", "loss_after", "grad_dot_update", "curvature", "update_norm_sq", "nds", "predicted_delta",
           "actual_delta", "nds_cross")


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the attention module
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.to(torch.float64) * y.to(torch.float64)).sum() for x, y in zip(a, b, strict=True))


class Sharpness:
    """Probe the curvature along each ``every``-th step on the fixed ``batch``:
    ``loss_before``, ``loss_after``, ``grad_dot_update`` = gᵀu, ``curvature`` = uᵀHu, ``update_norm_sq`` = ‖u‖²,
    ``nds`` = uᵀHu/‖u‖², ``predicted_delta`` = gᵀu + ½uᵀHu, ``actual_delta`` = L(θ_after) − L0, and with
    ``per_layer=True`` ``nds_within[l]`` = u_lᵀHu_l/‖u‖² for each watched layer and ``nds_cross`` = nds − Σ_l
    nds_within[l]. ``loss_fn(model, batch)`` returns the scalar loss."""

    group = "sharpness"

    def __init__(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, every: int = 100,
                 per_layer: bool = False):
        if not callable(loss_fn):
            raise ValueError(f"Sharpness: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
        check_every("Sharpness", every)
        self.loss_fn, self.batch, self.every, self.per_layer = loss_fn, batch, every, bool(per_layer)
        self._before: list[torch.Tensor] | None = None
        self.paused = False

    def bind(self, ctx: Context) -> None:
        if ctx.model is None:
            raise ValueError("Sharpness needs the model: watch(optimizer, model, ...)")
        self._ctx = ctx
        seen: set[int] = set()
        self._params = [p for g in ctx.optimizer.param_groups for p in g["params"]
                        if not (id(p) in seen or seen.add(id(p)))]
        index = {id(p): i for i, p in enumerate(self._params)}
        self._layer_index = [index[id(lay.param)] for lay in ctx.layers]

    def remove(self) -> None:
        self._before = None

    def spec(self) -> GroupSpec:
        coords = {k: v for k, v in layer_coords(self._ctx.layers).items() if k in ("layer", "kind", "depth")}
        variables = {v: ("step",) for v in SCALARS} | {"nds_within": ("step", "layer")}
        return GroupSpec(self.group, coords, variables)

    def before_step(self, step: int) -> None:
        self._before = None
        if step % self.every == 0:
            with torch.no_grad():
                self._before = [p.detach().clone() for p in self._params]

    def row(self, step: int) -> dict[str, np.ndarray] | None:
        if step % self.every != 0 or self._before is None:
            return None
        before, self._before = self._before, None
        out = {v: np.full((), np.nan) for v in SCALARS} | {"nds_within": np.full(len(self._layer_index), np.nan)}
        try:
            values = self._probe(before)
        except Exception as exc:  # never into the training loop
            self._ctx.report("nds", "*", f"failed ({type(exc).__name__}: {exc})")
            return out
        for k, v in values.items():
            out[k] = np.asarray(v, dtype=np.float64)
        if not np.isfinite(out["nds"]):
            self._ctx.report("nds", "*", "is not finite")
        return out

    def _probe(self, before: list[torch.Tensor]) -> dict[str, Any]:
        model, params = self._ctx.model, self._params
        with torch.no_grad():
            after = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        modes = [(m, m.training) for m in model.modules()]
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._ctx.pause(True)
        try:
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
            u = [a - b for a, b in zip(after, before, strict=True)]
            moved = [i for i, d in enumerate(u) if bool(d.any())]
            with torch.no_grad():
                for p, b in zip(params, before, strict=True):
                    p.copy_(b)
            with torch.enable_grad(), _math_attention():
                loss0 = self.loss_fn(model, self.batch)
                live = [params[i] for i in moved]
                us = [u[i] for i in moved]
                g = torch.autograd.grad(loss0, live, create_graph=True, allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(live, g, strict=True)]
                gu = _dot(g, us)
                hu = torch.autograd.grad(gu, live, retain_graph=self.per_layer, allow_unused=True)
                hu = [torch.zeros_like(p) if h is None else h for p, h in zip(live, hu, strict=True)]
                curvature = _dot([h.detach() for h in hu], us)
                within = np.full(len(self._layer_index), np.nan)
                if self.per_layer:
                    pos = {i: j for j, i in enumerate(moved)}
                    for k, i in enumerate(self._layer_index):
                        if i not in pos:
                            within[k] = 0.0
                            continue
                        j = pos[i]
                        gl = (g[j].to(torch.float64) * us[j].to(torch.float64)).sum()
                        (hl,) = torch.autograd.grad(gl, [live[j]], retain_graph=True, allow_unused=True)
                        within[k] = 0.0 if hl is None else float(_dot([hl.detach()], [us[j]]))
            norm_sq = float(_dot(us, us)) if us else 0.0
            with torch.no_grad():
                for p, a in zip(params, after, strict=True):
                    p.copy_(a)
                loss1 = self.loss_fn(model, self.batch)
            l0, l1, gu_f, c = float(loss0.detach()), float(loss1), float(gu.detach()), float(curvature)
            nds = c / norm_sq if norm_sq > 0 else float("nan")
            out = {"loss_before": l0, "loss_after": l1, "grad_dot_update": gu_f, "curvature": c,
                   "update_norm_sq": norm_sq, "nds": nds, "predicted_delta": gu_f + 0.5 * c, "actual_delta": l1 - l0}
            if self.per_layer and norm_sq > 0:
                within = within / norm_sq
                out["nds_within"] = within
                out["nds_cross"] = nds - float(np.sum(within))
            return out
        finally:
            with torch.no_grad():
                for p, a in zip(params, after, strict=True):
                    p.copy_(a)
                for b, saved in buffers:
                    b.copy_(saved)
            for p, gr in zip(params, grads, strict=True):
                p.grad = gr
            for m, flag in modes:
                m.training = flag
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self._ctx.pause(False)
