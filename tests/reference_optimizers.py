"""Small implementations, written here from their published update rules, of optimizers that have no package and
live as a file copied into each user's project: Moonlight's Muon and the NorMuon reference. spectralscope
recognises them by class name and hyper-parameters (`spectralscope.third_party`'s layouts). Their orthogonalisation
is Keller Jordan's, taken from the real ``muon`` package; every call is kept in ``CALLS`` as (input, output)."""

from __future__ import annotations

import math

import muon
import torch

CALLS: list[tuple[torch.Tensor, torch.Tensor]] = []


def orthogonalise(g: torch.Tensor, steps: int) -> torch.Tensor:
    out = muon.zeropower_via_newtonschulz5(g, steps)
    CALLS.append((g.detach().clone(), out.detach().clone()))
    return out


class Muon(torch.optim.Optimizer):
    """Moonlight: Muon and AdamW in one class, which parameters are which kept in their state."""

    def __init__(self, lr=1e-3, wd=0.1, muon_params=(), momentum=0.95, nesterov=True, ns_steps=5, adamw_params=(),
                 adamw_betas=(0.9, 0.95), adamw_eps=1e-8):
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        super().__init__(muon_params + adamw_params, dict(lr=lr, wd=wd, momentum=momentum, nesterov=nesterov,
                                                          ns_steps=ns_steps, adamw_betas=adamw_betas,
                                                          adamw_eps=adamw_eps))
        for p in muon_params:
            self.state[p]["use_muon"] = True
        for p in adamw_params:
            self.state[p]["use_muon"] = False

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["wd"], group["momentum"]
            for p in group["params"]:
                state, g = self.state[p], p.grad
                if g is None:
                    continue
                if state["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.mul_(mu).add_(g)  # SGD momentum, no dampening
                    u = orthogonalise(g.add(buf, alpha=mu) if group["nesterov"] else buf, group["ns_steps"])
                    p.mul_(1 - lr * wd)
                    p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1])))
                else:
                    b1, b2 = group["adamw_betas"]
                    state["step"] = state.get("step", 0) + 1
                    m1 = state.setdefault("moment1", torch.zeros_like(g))
                    m2 = state.setdefault("moment2", torch.zeros_like(g))
                    m1.lerp_(g, 1 - b1)
                    m2.lerp_(g.square(), 1 - b2)
                    scale = (1 - b1 ** state["step"]) / (1 - b2 ** state["step"]) ** 0.5
                    p.mul_(1 - lr * wd)
                    p.add_(m1 / (group["adamw_eps"] + m2.sqrt()), alpha=-lr / scale)


class NorMuon(torch.optim.Optimizer):
    """The NorMuon reference (single device): Keller's Muon, then each output neuron's row normalised by the root
    of an EMA of its mean square, the norm kept."""

    def __init__(self, params, lr=0.02, weight_decay=0, momentum=0.95, beta2=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["second_momentum_buffer"] = torch.zeros_like(p[..., 0:1])
                g, buf, s = p.grad, state["momentum_buffer"], state["second_momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp_(buf, group["momentum"])  # Nesterov, in place on the gradient
                o = orthogonalise(update, 5).float()
                size = o.norm()
                s.lerp_(o.square().mean(dim=-1, keepdim=True), 1 - group["beta2"])
                o = o / (s.sqrt() + 1e-10)
                o = o * (size / (o.norm() + 1e-10)) * max(1, g.size(-2) / g.size(-1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"])
