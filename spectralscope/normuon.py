"""`NorMuon`: Muon with each output neuron's update normalised by its own second moment (Li et al., 2025).

Per 2-D parameter W with gradient G, one step (hyper-parameters as ``torch.optim.Muon`` names them, plus β2):

    B ← μ·B + (1 − μ)·G                        (``momentum_buffer``)
    U = G + μ·(B − G) under Nesterov, else B    (the NS input, as torch.optim.Muon)
    O = NS_k(U)                                  (`newton_schulz.newton_schulz`, bf16)
    s ← β2·s + (1 − β2)·mean_j O_ij²             (``second_momentum_buffer``, (rows, 1), float32)
    D = O_i / (sqrt(s_i) + eps), rescaled so that ‖D‖_F = ‖O‖_F
    W ← W·(1 − lr·wd) − lr·sqrt(max(1, rows/cols))·D

Keeping ‖D‖_F = ‖O‖_F and Muon's step-size rule means a learning rate tuned for Muon transfers: NorMuon
changes how the step is shared among the neurons, not its size. Written for the demo and recorded through its
own adapter like any other optimizer (the self-check recomputes O and applies the row normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .adapters import _muon_momentum, _muon_ns, register_adapter
from .newton_schulz import MUON_COEFFICIENTS, MUON_EPS, NSConfig, newton_schulz
from .third_party import normuon_direction, normuon_s


def row_second_moment(o: Tensor) -> Tensor:
    """mean_j O_ij², one value per row of the (rows, cols) matrix O, as a float32 (rows, 1) column."""
    return o.float().square().mean(dim=1, keepdim=True)


def normalised_rows(o: Tensor, s: Tensor, eps: float) -> Tensor:
    """D = O_i/(sqrt(s_i) + eps) for each row i, rescaled so that ‖D‖_F = ‖O‖_F (float32)."""
    o = o.float()
    d = o / (s.sqrt() + eps)
    scale = torch.linalg.vector_norm(o) / torch.linalg.vector_norm(d).clamp_min(1e-30)
    return d * scale


class NorMuon(torch.optim.Optimizer):
    """NorMuon for 2-D parameters: Muon's momentum and Newton–Schulz, then the per-row normalisation above."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = 0.95, beta2: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS, eps: float = MUON_EPS,
                 ns_steps: int = 5, row_eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"NorMuon: lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1 or not 0 <= beta2 < 1:
            raise ValueError(f"NorMuon: momentum and beta2 must lie in [0, 1), got {momentum!r}, {beta2!r}")
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"NorMuon: ns_steps must be a positive int, got {ns_steps!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, row_eps=row_eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"NorMuon takes 2-D parameters only, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ns = _muon_ns(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group, ns)
        return loss

    def _step_one(self, p: Tensor, group: Mapping[str, Any], ns: NSConfig) -> None:
        g, state = p.grad, self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(g)
            state["second_momentum_buffer"] = torch.zeros(p.shape[0], 1, dtype=torch.float32, device=p.device)
        buf, s = state["momentum_buffer"], state["second_momentum_buffer"]
        buf.lerp_(g, 1 - group["momentum"])
        o = newton_schulz(g.lerp(buf, group["momentum"]) if group["nesterov"] else buf, ns)
        s.lerp_(row_second_moment(o), 1 - group["beta2"])
        d = normalised_rows(o, s, group["row_eps"])
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(d.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))


def _direction(o: Tensor, group: Mapping[str, Any], s: Tensor | None) -> Tensor:
    """The adapter's view of NorMuon's step after NS: rows of O divided by sqrt(s) + row_eps (up to the scale)."""
    return normuon_direction(o, {"eps": group["row_eps"]}, s)


register_adapter(NorMuon, _muon_momentum, _muon_ns,
                 describe=("lr", "momentum", "beta2", "nesterov", "ns_steps", "ns_coefficients", "eps", "weight_decay"),
                 direction=_direction, extra=normuon_s)
