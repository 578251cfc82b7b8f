"""Directional curvature of one optimizer step (SPEC §6 "Sharpness"), as functions on tensors.

With u = θ_after − θ_before, the loss L0 at θ_before, g = ∇L0 and H its Hessian: the second-order change of
the loss along the step is ΔL ≈ gᵀu + ½uᵀHu. Splitting u into the layers' parts u_l (u on layer l's entries,
0 elsewhere), uᵀHu = Σ_l u_lᵀHu_l (within) + the rest (cross-layer terms). Hu comes from double backward:
Hu = ∇(gᵀu) with u held fixed. No I/O, no module state: the probe (`hooks/sharpness.py`) sets the
parameters, calls the loss and restores everything around these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ in float64."""
    return sum((x.to(torch.float64) * y.to(torch.float64)).sum() for x, y in zip(a, b, strict=True))


def directional_terms(loss: Tensor, params: Sequence[Tensor], u: Sequence[Tensor],
                      parts: Sequence[tuple[int, Callable[[Tensor], Tensor]] | None] | None = None
                      ) -> tuple[float, float, np.ndarray | None]:
    """(gᵀu, uᵀHu, [u_lᵀHu_l for each part]) at the point ``loss`` was evaluated, for ``params`` (the tensors the
    loss depends on, each moved by ``u``). A part is (index into ``params``, ``select``: the entries of a
    parameter-shaped tensor that belong to it), or None for a part whose parameter did not move (0). Without
    ``parts`` the last item is None."""
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True)]
    gu = dot(g, u)
    hu = torch.autograd.grad(gu, params, retain_graph=parts is not None, allow_unused=True)
    hu = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hu, strict=True)]
    curvature = dot([h.detach() for h in hu], u)
    within = None
    if parts is not None:
        within = np.zeros(len(parts))
        for k, part in enumerate(parts):
            if part is None:
                continue
            j, select = part
            ul = select(u[j])
            gl = (select(g[j]).to(torch.float64) * ul.to(torch.float64)).sum()  # H u_l = ∇(gᵀu_l)
            (hl,) = torch.autograd.grad(gl, [params[j]], retain_graph=True, allow_unused=True)
            within[k] = 0.0 if hl is None else float(dot([select(hl.detach())], [ul]))
    return float(gu.detach()), float(curvature), within


def sharpness_values(loss_before: float, loss_after: float, grad_dot_update: float, curvature: float,
                     update_norm_sq: float, within: np.ndarray | None = None) -> dict[str, Any]:
    """The stored values of one probe: ``nds`` = uᵀHu/‖u‖² (NaN for a zero step), ``predicted_delta`` =
    gᵀu + ½uᵀHu, ``actual_delta`` = L(θ_after) − L0, and with ``within`` (u_lᵀHu_l per layer)
    ``nds_within`` = within/‖u‖² and ``nds_cross`` = nds − Σ_l nds_within[l]."""
    nds = curvature / update_norm_sq if update_norm_sq > 0 else float("nan")
    out: dict[str, Any] = {
        "loss_before": loss_before, "loss_after": loss_after, "grad_dot_update": grad_dot_update,
        "curvature": curvature, "update_norm_sq": update_norm_sq, "nds": nds,
        "predicted_delta": grad_dot_update + 0.5 * curvature, "actual_delta": loss_after - loss_before,
    }
    if within is not None and update_norm_sq > 0:
        out["nds_within"] = within / update_norm_sq
        out["nds_cross"] = nds - float(np.sum(out["nds_within"]))
    return out
