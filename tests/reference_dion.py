"""A small single-device implementation, written here from its published update rules, of Dion's ``Muon`` and
``NorMuon`` (microsoft/dion, installed from its repository, not PyPI). spectralscope recognises them by class name,
hyper-parameters and the NS function kept on the instance. Each step keeps what it handed its NS function and what
came back in ``CALLS`` as (input, output); spectralscope's recomputation calls the same function but is not kept."""

from __future__ import annotations

import math

import torch

CALLS: list[tuple[torch.Tensor, torch.Tensor]] = []

_QUINTICS = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
_POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                  (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                  (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                  (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                  (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def _iterate(x: torch.Tensor, triples, tall: bool) -> torch.Tensor:
    for a, b, c in triples:
        if tall:  # the small Gram XᵀX, multiplied from the right
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def zeropower_via_newtonschulz5(g: torch.Tensor, epsilon: float = 1e-7) -> torch.Tensor:
    """Dion's default of its older classes: five tuned quintics in bf16, X/(‖X‖_F + ε), transposed when tall."""
    x = g.to(torch.bfloat16)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + epsilon)
    x = _iterate(x, _QUINTICS, False)
    return x.mT if tall else x


def polar_express(g: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Polar Express in bf16: X/(1.02·‖X‖_F + ε), then its five polynomials on the smaller Gram."""
    x = g.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + epsilon)
    return _iterate(x, _POLAR_EXPRESS, g.size(-2) > g.size(-1))


def my_orthogonalise(g: torch.Tensor, epsilon: float = 1e-7) -> torch.Tensor:
    """A user's own NS function (three steps of Keller's quintic): spectralscope knows its name, not its map."""
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm() + epsilon)
    x = _iterate(x, [(3.4445, -4.7750, 2.0315)] * 3, False)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Dion's Muon on one device: SGD-style momentum, NS on the bf16 input, adjusted lr; ``algorithm="adamw"`` groups
    are AdamW with the first moment in ``momentum``."""

    def __init__(self, params, lr=0.01, mu=0.95, betas=(0.9, 0.95), weight_decay=0.01, epsilon=1e-8, nesterov=False,
                 adjust_lr="spectral_norm", flatten=False, use_polar_express=False, newton_schulz_func=None):
        super().__init__(params, dict(lr=lr, mu=mu, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay,
                                      algorithm=self.algorithm, step=0, epsilon=epsilon, nesterov=nesterov,
                                      flatten=flatten, adjust_lr=adjust_lr, **self.extra_defaults()))
        self._newton_schulz_func = newton_schulz_func or (polar_express if use_polar_express
                                                          else zeropower_via_newtonschulz5)

    algorithm = "muon"

    def extra_defaults(self) -> dict:
        return {}

    def after_ns(self, o: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return o

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] += 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                    if group["algorithm"] == "adamw":
                        state["variance"] = torch.zeros_like(p)
                lr, wd = torch.tensor(group["lr"]), torch.tensor(group["weight_decay"])
                m, g = state["momentum"], p.grad.to(state["momentum"].dtype)
                if group["algorithm"] == "adamw":
                    b1, b2, t = group["beta1"], group["beta2"], group["step"]
                    m.lerp_(g, 1 - b1)
                    v = state["variance"]
                    v.lerp_(g.square(), 1 - b2)
                    p.mul_(1 - lr * wd)
                    p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["epsilon"]))
                    continue
                mu = torch.tensor(group["mu"])
                m.mul_(mu).add_(g)
                u = (torch.mul(m, mu).add_(g) if group["nesterov"] else m).to(torch.bfloat16)
                shape = u.shape
                x = u.flatten(1) if group["flatten"] and u.ndim >= 3 else u
                o = self._newton_schulz_func(x, epsilon=torch.tensor(group["epsilon"])).reshape(shape)
                CALLS.append((x.detach().clone(), o.detach().clone()))
                o = self.after_ns(o, state, group)
                fan_out, fan_in = (p.shape[0], math.prod(p.shape[1:])) if group["flatten"] else p.shape[-2:]
                ratio = {"spectral_norm": math.sqrt(fan_out / fan_in), "rms_norm": 0.2 * math.sqrt(max(fan_out, fan_in)),
                         None: 1.0}[group["adjust_lr"]]
                p.mul_(1 - lr * wd)
                p.sub_(o * (lr * ratio))  # the product in O's dtype (bf16), as its foreach step rounds it


class NorMuon(Muon):
    """Dion's NorMuon: Muon, then each output neuron's row of O (float32) divided by sqrt(v_t) + 1e-8, v_t the EMA
    of the row's mean square (``variance_neuron``), ‖O‖_F restored."""

    algorithm = "normuon"

    def __init__(self, params, muon_beta2=0.95, cautious_wd=False, use_polar_express=True, **kw):
        self._more = dict(muon_beta2=muon_beta2, cautious_wd=cautious_wd)
        super().__init__(params, use_polar_express=use_polar_express, **kw)

    def extra_defaults(self) -> dict:
        return self._more

    def after_ns(self, o: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        v = state.setdefault("variance_neuron", torch.zeros_like(o[..., 0:1], dtype=state["momentum"].dtype))
        u = o.to(v.dtype)
        size = u.norm(dim=(-2, -1), keepdim=True)
        v.copy_(torch.lerp(v, (u * u).mean(dim=-1, keepdim=True), 1 - torch.tensor(group["muon_beta2"])))
        u = u / (v.sqrt() + 1e-8)
        return u * (size / u.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-8))
