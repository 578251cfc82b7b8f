"""Adapters for the Muon implementations people train with, registered by class name (`adapters.register_by_name`),
so their packages need not be installed for spectralscope to import.

Each says what the optimizer feeds its orthogonalisation, in the orientation it uses, and calls the package's
own Newton–Schulz function to recompute O (for ``ns_consistency`` and where the applied step cannot be read
back exactly). The facts each relies on, from the packages' code:

- Keller Jordan's ``muon`` (PyPI ``muon-optimizer``): ``muon_update`` forms the NS input in place,
  ``grad.lerp_(momentum_buffer, β)`` (Nesterov, always on), so after ``step()`` ``p.grad`` *is* the NS input;
  4-D kernels are viewed (out, −1); NS is ``zeropower_via_newtonschulz5`` (the quintic (3.4445, −4.7750,
  2.0315) × 5 in bf16, X/(‖X‖_F + 1e-7)); then ``update *= sqrt(max(1, rows/cols))`` in bf16, and
  W ← W·(1 − lr·wd) − lr·update. The ``*WithAuxAdam`` classes keep Adam's ``exp_avg`` in ``use_muon=False``
  groups, recorded as Adam (no NS).
- pytorch-optimizer's ``Muon``: ``use_muon`` groups (others are AdamW: ``exp_avg``); Nesterov in place on the
  gradient as above (``nesterov=False``: ``momentum_buffer``); NS by ``MuonBase._orthogonalize`` with the
  group's ``ns_coeffs`` (one triple or a per-step list, the last reused), ``ns_steps``, ``ns_method``;
  decoupled decay W·(1 − wd·lr) when ``weight_decouple``; the bf16 O applied with lr·ratio, ratio
  ``sqrt(max(1, rows/cols))`` or Moonlight's 0.2·sqrt(max(rows, cols)) (``use_adjusted_lr``).
- pytorch-optimizer's ``AdaMuon``: NS input its first moment ``m`` (m ← lerp(m, g, 1 − β1), no Nesterov), then
  O/(sqrt(v_t/(1 − β2^t)) + eps) with v_t the element-wise EMA of O²; ``NorMuon``: the input as its ``Muon``, then
  each row of O divided by sqrt(s_t) + eps, s_t the EMA of the row's mean O². Both rescale to a norm and apply lr.
  ``AdaGO``: the input as its ``Muon`` (Nesterov off by default), O times one positive step per matrix.
- heavyball's ``Muon``, ``MuonAdamW``, ``MuonLaProp``: a chain of transforms, each keeping its state under
  ``optimizer.state[p][view]["<transform>_<name>_<index>"]``; the momentum transform (``nesterov_ema`` by default)
  then ``orthogonalize_update``, which views the update (out, −1), runs ``utils.zeropower_via_newtonschulz5``
  (X/max(‖X‖_F, 1e-7), five different quintics, bf16 stochastically rounded) and multiplies by
  sqrt(max(1, rows/cols)); W ← W·(1 − wd·lr_t) − lr_t·update in float32. The step sets ``p.grad`` to None, so the
  adapter keeps the gradient as the step begins (``Adapter.keep``).
- Dion's ``Muon`` and ``NorMuon`` (microsoft/dion, installed from its repository): matched by layout, with the
  adapter built per instance around the NS function it keeps (``_newton_schulz_func``); see its section below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .adapters import Adapter, register_by_name, register_layout
from .newton_schulz import MUON_COEFFICIENTS, NSConfig, recover_applied


def _muon_group(group: Mapping[str, Any]) -> bool:
    return bool(group.get("use_muon", True))


# ---- Keller Jordan's muon ---------------------------------------------------------------------------------
def keller_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """The NS input: ``p.grad`` after the step (lerped in place), or Adam's ``exp_avg`` in an aux-Adam group."""
    if not _muon_group(group):
        return state.get("exp_avg")
    return p.grad if "momentum_buffer" in state else None


def keller_ns(group: Mapping[str, Any]) -> NSConfig | None:
    return NSConfig(MUON_COEFFICIENTS, 5, 1e-7, torch.bfloat16) if _muon_group(group) else None


def keller_orthogonalize(m: Tensor, group: Mapping[str, Any]) -> Tensor:
    import muon

    return muon.zeropower_via_newtonschulz5(m, steps=5)


KELLER = Adapter(keller_momentum, keller_ns, ("lr", "momentum", "weight_decay", "betas", "eps"),
                 orthogonalize=keller_orthogonalize)
for _name in ("Muon", "SingleDeviceMuon", "MuonWithAuxAdam", "SingleDeviceMuonWithAuxAdam"):
    register_by_name(f"muon.{_name}", KELLER)


# ---- pytorch-optimizer ------------------------------------------------------------------------------------
def po_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    if not _muon_group(group):
        return state.get("exp_avg")
    if "momentum_buffer" not in state:
        return None
    return p.grad if group.get("nesterov", True) else state["momentum_buffer"]


def po_ns(group: Mapping[str, Any]) -> NSConfig | None:
    if not _muon_group(group):
        return None
    steps = int(group.get("ns_steps", 5))
    coeffs = group.get("ns_coeffs", [MUON_COEFFICIENTS])
    if isinstance(coeffs, tuple) and len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        coeffs = [coeffs]
    triples = [tuple(float(c) for c in coeffs[min(i, len(coeffs) - 1)]) for i in range(steps)]
    return NSConfig(triples[0] if len(set(triples)) == 1 else tuple(triples), steps, 1e-7, torch.bfloat16)


def po_orthogonalize(m: Tensor, group: Mapping[str, Any]) -> Tensor:
    from pytorch_optimizer.optimizer.muon.base import MuonBase

    return MuonBase._orthogonalize(group, [m])[0]


def po_decay(group: Mapping[str, Any]) -> float:
    if not group.get("weight_decouple", True):
        return 1.0
    return 1.0 - float(group.get("weight_decay", 0.0)) * float(group["lr"])


def po_ratio(group: Mapping[str, Any], shape: tuple[int, ...]) -> float:
    rows, cols = shape[0], math.prod(shape[1:])
    return 0.2 * math.sqrt(max(rows, cols)) if group.get("use_adjusted_lr") else math.sqrt(max(1.0, rows / cols))


def po_applied(after: Tensor, group: Mapping[str, Any], before: Tensor) -> Tensor | None:
    """The bf16 O it applied, read back: W_after = W_before·decay − lr·ratio·O."""
    if not _muon_group(group) or group.get("cautious"):
        return None
    decay = po_decay(group)
    decayed = before * decay if decay != 1.0 else before
    return recover_applied(decayed, after, float(group["lr"]) * po_ratio(group, tuple(after.shape)))


PYTORCH_OPTIMIZER = Adapter(po_momentum, po_ns, ("lr", "momentum", "nesterov", "weight_decay", "ns_steps", "ns_coeffs",
                                                 "ns_method", "use_adjusted_lr", "betas", "eps"),
                            applied=po_applied, orthogonalize=po_orthogonalize, decay=po_decay)
register_by_name("pytorch_optimizer.optimizer.muon.muon.Muon", PYTORCH_OPTIMIZER)


def adamuon_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """AdaMuon's NS input: its first moment ``m`` after m ← m + (1 − β1)(g − m) (no Nesterov); AdamW groups:
    ``exp_avg``."""
    return state.get("m") if _muon_group(group) else state.get("exp_avg")


def adamuon_direction(o: Tensor, group: Mapping[str, Any], v: Tensor | None) -> Tensor:
    """What AdaMuon applies after NS, up to its positive scale: O / (sqrt(v_t / (1 − β2^t)) + eps), v_t ← β2·v + (1 −
    β2)·O² element by element (``state["v"]``, flat); then ×sqrt(min(rows, cols))/‖·‖ and lr."""
    if v is None:
        raise ValueError("AdaMuon keeps no second moment v for this parameter")
    beta2, t = float(group["betas"][1]), int(group["step"])
    denom = (v.to(torch.float64).reshape(o.shape) / (1.0 - beta2**t)).sqrt() + float(group["eps"])
    return o.to(torch.float64) / denom


def rows_normalised(o: Tensor, s: Tensor, eps: float) -> Tensor:
    """NorMuon's step after NS, up to its positive scale, in float64: row i of O (output neuron i) divided by
    sqrt(s_i) + eps, s the per-row second moment the step just updated ((rows, 1) or (rows,))."""
    rows = o.to(torch.float64).reshape(o.shape[0], -1)
    return (rows / (s.to(torch.float64).reshape(-1, 1).sqrt() + eps)).reshape(o.shape)


def normuon_direction(o: Tensor, group: Mapping[str, Any], s: Tensor | None) -> Tensor:
    """What NorMuon applies after NS: `rows_normalised` by s_t ← s + (1 − β2)(mean_j O_ij² − s)
    (``state["second_momentum_buffer"]``, (rows, 1)) and the group's eps."""
    if s is None:
        raise ValueError("NorMuon keeps no second_momentum_buffer for this parameter")
    return rows_normalised(o, s, float(group["eps"]))


def adamuon_v(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    return state.get("v") if _muon_group(group) else None


def normuon_s(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    return state.get("second_momentum_buffer") if _muon_group(group) else None


# the step divides O by its second moment: the applied O cannot be read back, so it is recomputed by the
# package's own MuonBase._orthogonalize (what AdaMuon's and NorMuon's steps call, batched or not)
ADAMUON = Adapter(adamuon_momentum, po_ns, ("lr", "betas", "weight_decay", "ns_steps", "ns_coeffs", "use_adjusted_lr",
                                            "eps"),
                  orthogonalize=po_orthogonalize, direction=adamuon_direction, extra=adamuon_v, decay=po_decay)
NORMUON = Adapter(po_momentum, po_ns, ("lr", "momentum", "beta2", "nesterov", "weight_decay", "ns_steps", "ns_coeffs",
                                       "update_scale", "use_adjusted_lr", "eps"),
                  orthogonalize=po_orthogonalize, direction=normuon_direction, extra=normuon_s, decay=po_decay)
#: AdaGO: the NS input as its Muon's (``nesterov`` off by default: ``momentum_buffer``), O applied with one positive
#: AdaGrad-style step per matrix, max(eps, lr·min(‖g‖, γ)/v_t): the direction is O itself, recomputed
ADAGO = Adapter(po_momentum, po_ns, ("lr", "momentum", "nesterov", "weight_decay", "ns_steps", "ns_coeffs", "gamma",
                                     "eps", "v", "use_adjusted_lr"),
                orthogonalize=po_orthogonalize, decay=po_decay)
register_by_name("pytorch_optimizer.optimizer.muon.adamuon.AdaMuon", ADAMUON)
register_by_name("pytorch_optimizer.optimizer.muon.adago.AdaGO", ADAGO)
register_by_name("pytorch_optimizer.optimizer.muon.normuon.NorMuon", NORMUON)


# ---- heavyball ----------------------------------------------------------------------------------------------
#: heavyball's ``zeropower_via_newtonschulz5``: a quintic per step, 5 steps, in bf16 (stochastically rounded)
HEAVYBALL_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                          (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
#: the state key prefix of each momentum transform heavyball's Muons chain before ``orthogonalize_update``, and
#: whether NS is given g + (β·)m_t (Nesterov: the gradient is needed) or the state itself
_HEAVYBALL_MOMENTA = {"nesterov_ema_momentum_": 1.0, "nesterov_momentum_momentum_": "beta",
                      "exp_avg_exp_avg_": None, "heavyball_momentum_momentum_": None,
                      "scale_by_laprop_exp_avg_": None}


def _heavyball_view(p: Tensor, state: Mapping[str, Any]) -> tuple[str, Tensor]:
    """(key prefix, tensor) of the momentum transform in a parameter's state (``optimizer.state[p]`` holds one
    dict per view of it: a parameter heavyball does not split has one, view 0)."""
    views = [v for v in state.values() if isinstance(v, Mapping)]
    if len(views) != 1:
        raise ValueError(f"heavyball keeps {len(views)} views of this parameter; the adapter reads one")
    for key, value in views[0].items():
        for prefix in _HEAVYBALL_MOMENTA:
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                return prefix, value
    raise ValueError("no momentum transform heavyball's Muon chains (nesterov_ema, exp_avg, heavyball/nesterov "
                     f"momentum, laprop) in its state ({', '.join(map(str, views[0]))})")


def heavyball_keep(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor:
    """The gradient, as the step begins: heavyball's step consumes ``p.grad`` (sets it to None)."""
    return p.grad.detach().clone()


def heavyball_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any], grad: Tensor | None
                       ) -> Tensor | None:
    """What ``orthogonalize_update`` is given, rebuilt from the state after the step (heavyball keeps the
    parameter's shape; it flattens a kernel to (out, −1) only for NS):

    - ``nesterov_ema`` (the default): m_t = m_{t−1} + (1 − β)(g − m_{t−1}), NS input g + m_t;
    - ``nesterov_momentum`` (heavyball_momentum=True): m_t = β·m_{t−1} + g, NS input g + β·m_t;
    - ``exp_avg``, ``heavyball_momentum``, ``scale_by_laprop`` (MuonLaProp): the NS input is m_t itself.

    β = ``betas[0]``. ``mars`` and ``caution`` change what the step uses: not read."""
    if group.get("mars") or group.get("caution"):
        raise ValueError("heavyball's mars and caution variants change the step's input; the adapter does not "
                         "rebuild them")
    if not state:
        return None
    prefix, m = _heavyball_view(p, state)
    m = m.reshape(p.shape)
    weight = _HEAVYBALL_MOMENTA[prefix]
    if weight is None:
        return m
    if grad is None:
        return None
    beta = 1.0 if weight == 1.0 else float(group["betas"][0] if "betas" in group else group["beta"])
    return grad.to(torch.float32).reshape(p.shape) + beta * m.to(torch.float32)


def heavyball_ns(group: Mapping[str, Any]) -> NSConfig:
    return NSConfig(HEAVYBALL_COEFFICIENTS, 5, 1e-7, torch.bfloat16)


def _heavyball_lr(group: Mapping[str, Any]) -> Tensor:
    """The lr the step applied, as heavyball forms it: base_lr·t / max(t, warmup_steps + 1) (t = the group's
    step count after the step), in float32."""
    t = torch.as_tensor(group.get("step_count", 1), dtype=torch.int64).cpu()
    lr = float(group.get("base_lr", group["lr"]))
    return (lr * t / t.clamp(min=int(group.get("warmup_steps", 0)) + 1)).to(torch.float32)


def _heavyball_factor(group: Mapping[str, Any]) -> Tensor:
    """1 − wd·lr_t in float32, as heavyball forms it for p·(1 − d·lr)."""
    return 1 - float(group.get("weight_decay", 0.0)) * _heavyball_lr(group)


def heavyball_decay(group: Mapping[str, Any]) -> float:
    """1 − wd·lr_t: heavyball's decoupled decay, W ← W·(1 − wd·lr_t) − lr_t·u."""
    return float(_heavyball_factor(group))


def heavyball_applied(after: Tensor, group: Mapping[str, Any], before: Tensor) -> Tensor | None:
    """The bf16 O its NS returned, read back: the update is O·sqrt(max(1, rows/cols)) applied with lr_t."""
    if group.get("caution") or group.get("cautious_weight_decay") or group.get("mars"):
        return None
    lr = _heavyball_lr(group)
    decayed = before * _heavyball_factor(group).to(before.device, before.dtype)
    rows, cols = after.shape[0], math.prod(after.shape[1:])
    return recover_applied(decayed, after, float(lr) * math.sqrt(max(1.0, rows / cols)))


HEAVYBALL = Adapter(heavyball_momentum, heavyball_ns, ("lr", "betas", "weight_decay", "nesterov",
                                                       "heavyball_momentum", "warmup_steps", "caution", "mars"),
                    applied=heavyball_applied, decay=heavyball_decay, keep=heavyball_keep, stochastic=True)
for _name in ("Muon", "MuonAdamW", "MuonLaProp"):
    register_by_name(f"heavyball.{_name}", HEAVYBALL)



# ---- reference implementations copied into projects (no package: matched by layout) ---------------------
def keller_newton_schulz(m: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = MUON_COEFFICIENTS
                         ) -> Tensor:
    """NS_k as Keller Jordan's reference writes it, which the copies of it (Moonlight's, the NorMuon reference's)
    keep: X = bf16(M), transposed when tall, X ← X/(‖X‖_F + 1e-7), then per step A = X·Xᵀ, B = b·A + (c·A)·A,
    X ← a·X + B·X. The same operations in the same order (bf16 rounds each), so its output is theirs bit for bit;
    `newton_schulz` is torch.optim.Muon's order (addmm), which rounds differently."""
    a, b, c = coefficients
    x = m.bfloat16()
    tall = m.size(-2) > m.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.mT if tall else x


def _keller_ns_of_group(m: Tensor, group: Mapping[str, Any]) -> Tensor:
    return keller_newton_schulz(m.reshape(m.shape[0], -1), int(group.get("ns_steps", 5)))


# Moonlight's Muon (MoonshotAI's examples): one class for both, ``state[p]["use_muon"]`` set per parameter;
# SGD momentum buf ← μ·buf + g, NS input g + μ·buf (Nesterov) or buf, Keller's NS, W ← W·(1 − lr·wd) −
# lr·0.2·sqrt(max(A, B))·O; its AdamW parameters keep ``moment1``/``moment2``.
def moonlight_settings(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Mapping[str, Any]:
    return {**group, "use_muon": bool(state.get("use_muon", True))}


def moonlight_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    if not state.get("use_muon", True):
        return state.get("moment1")
    buf = state.get("momentum_buffer")
    if buf is None:
        return None
    buf = buf.reshape(p.shape)
    if not group.get("nesterov", True):
        return buf
    # g.add(buf, alpha=μ): the same fused kernel as its step, so the same rounding
    return None if p.grad is None else p.grad.add(buf, alpha=group["momentum"])


def moonlight_ns(group: Mapping[str, Any]) -> NSConfig | None:
    return NSConfig(MUON_COEFFICIENTS, int(group.get("ns_steps", 5)), 1e-7, torch.bfloat16) \
        if group.get("use_muon", True) else None


def moonlight_decay(group: Mapping[str, Any]) -> float:
    return 1.0 - float(group["lr"]) * float(group.get("wd", 0.0))


def moonlight_applied(after: Tensor, group: Mapping[str, Any], before: Tensor) -> Tensor | None:
    if not group.get("use_muon", True):
        return None
    ratio = 0.2 * math.sqrt(max(after.shape[0], after.shape[1]))
    return recover_applied(before * moonlight_decay(group), after, float(group["lr"]) * ratio)


MOONLIGHT = Adapter(moonlight_momentum, moonlight_ns, ("lr", "wd", "momentum", "nesterov", "ns_steps", "adamw_betas",
                                                       "adamw_eps"),
                    applied=moonlight_applied, orthogonalize=_keller_ns_of_group, decay=moonlight_decay,
                    settings=moonlight_settings)


def _is_moonlight(optimizer: Any) -> bool:
    return type(optimizer).__name__ == "Muon" and {"wd", "momentum", "nesterov", "ns_steps", "adamw_betas"} <= set(
        optimizer.defaults)


register_layout("Moonlight's Muon", _is_moonlight, MOONLIGHT)


# The NorMuon reference (normuon.py of the paper's repository: NorMuon, SingleDeviceNorMuon): Keller's in-place
# Nesterov (p.grad is the NS input after the step), Keller's NS, then each output neuron's row of O divided by
# sqrt(s_t) + 1e-10, s_t ← lerp(s, mean_j O_ij², 1 − β2) (``second_momentum_buffer``), the norm of O restored,
# × sqrt(max(1, rows/cols)); W ← W·(1 − lr·wd) − lr·update.
def normuon_reference_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    return p.grad if "momentum_buffer" in state else None


def normuon_reference_ns(group: Mapping[str, Any]) -> NSConfig:
    return NSConfig(MUON_COEFFICIENTS, 5, 1e-7, torch.bfloat16)


def normuon_reference_direction(o: Tensor, group: Mapping[str, Any], s: Tensor | None) -> Tensor:
    if s is None:
        raise ValueError("the NorMuon reference keeps no second_momentum_buffer for this parameter")
    return rows_normalised(o, s, 1e-10)


NORMUON_REFERENCE = Adapter(normuon_reference_momentum, normuon_reference_ns, ("lr", "weight_decay", "momentum", "beta2"),
                            orthogonalize=_keller_ns_of_group, direction=normuon_reference_direction, extra=normuon_s)


def _is_normuon_reference(optimizer: Any) -> bool:
    return type(optimizer).__name__ in ("NorMuon", "SingleDeviceNorMuon") and set(optimizer.defaults) == {
        "lr", "weight_decay", "momentum", "beta2"}


register_layout("the NorMuon reference", _is_normuon_reference, NORMUON_REFERENCE)


# ---- Dion's Muon and NorMuon (microsoft/dion: installed from its repository, matched by layout) ----------------
# Its step keeps state["momentum"] M ← μ·M + G (SGD-style, no dampening; μ = ``mu``), forms U = μ·M + G under
# Nesterov (off by default) or U = M, casts U to bf16 and hands it to the function on the instance,
# ``optimizer._newton_schulz_func(U, epsilon=ε)``, chosen at construction: its five quintics
# (``zeropower_via_newtonschulz5``, X/(‖X‖_F + ε)), Polar Express (``polar_express``, X/(1.02·‖X‖_F + ε), the default
# of the newer classes), their Triton twins, Gram-NS or the user's own. NorMuon then divides each output neuron's row
# of O (in float32) by sqrt(v_t) + 1e-8, v_t ← lerp(v, mean_j O_ij², 1 − muon_beta2) (``variance_neuron``, (rows, 1))
# and restores ‖O‖_F. W ← W·(1 − lr·wd) − lr'·O with lr' = lr·sqrt(fan_out/fan_in) ("spectral_norm", the default),
# lr·0.2·sqrt(max(fan_out, fan_in)) ("rms_norm") or lr; the product lr'·O is rounded to bf16 before it is applied,
# so O cannot be read back from the weights: it is recomputed by the instance's own function. Param groups with
# ``algorithm`` "adamw" or "lion" keep their first moment in the same ``momentum`` key (no NS).
#: the five quintics of Dion's ``zeropower_via_newtonschulz5`` (heavyball's too)
DION_QUINTICS = HEAVYBALL_COEFFICIENTS
#: Polar Express (Amsel, Persson, Musco & Gower 2025) for 5 steps, safety 2·10⁻², cushion 2: Dion's ``polar_express``
POLAR_EXPRESS_COEFFICIENTS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def _divided(triples: tuple[tuple[float, float, float], ...], s: float) -> tuple[tuple[float, float, float], ...]:
    """The schedule whose first step is p(x/s): an input divided by s before the first polynomial, folded into it as
    (a/s, b/s³, c/s⁵), so that σ(M/‖M‖_F) maps as the optimizer maps it (SPEC's ns_fail_frac is of σ(M/‖M‖_F))."""
    (a, b, c), *rest = triples
    return ((a / s, b / s**3, c / s**5), *rest)


#: Dion's functions by name → (the per-step schedule of the map σ(M/‖M‖_F) ↦ σ(O), as its input scaling folds in)
DION_NS_FUNCTIONS = {"zeropower_via_newtonschulz5": DION_QUINTICS, "newton_schulz_triton": DION_QUINTICS,
                     "polar_express": _divided(POLAR_EXPRESS_COEFFICIENTS, 1.02),
                     "polar_express_triton": _divided(POLAR_EXPRESS_COEFFICIENTS, 1.02)}
_DION_MATRIX = ("muon", "normuon")


def _dion_matrix_group(group: Mapping[str, Any]) -> bool:
    return group.get("algorithm") in _DION_MATRIX


def dion_momentum(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    """What Dion's NS is given, bf16(μ·M_t + G) (Nesterov) or bf16(M_t), formed as its step forms it (μ a float32
    0-dim tensor); AdamW and Lion groups: their ``momentum`` (the first moment)."""
    m = state.get("momentum")
    if m is None or not _dion_matrix_group(group):
        return m
    if group.get("num_heads") not in (None, 1) or group.get("split_sizes"):
        raise ValueError("Dion orthogonalises this parameter per head or row block (num_heads/split_sizes); the "
                         "adapter reads whole matrices")
    if p.ndim > 2 and not group.get("flatten"):
        raise ValueError(f"Dion orthogonalises a {p.ndim}-D parameter without flatten as a batch of matrices; the "
                         "adapter reads one matrix per parameter (flatten=True)")
    if not group.get("nesterov"):
        return m.to(torch.bfloat16)
    if p.grad is None:
        return None
    return torch.mul(m, torch.tensor(group["mu"])).add_(p.grad.to(m.dtype)).to(torch.bfloat16)


def dion_ns(kind: str, group: Mapping[str, Any]) -> NSConfig | None:
    """The schedule of Dion's NS function named ``kind`` (`DION_NS_FUNCTIONS`); its other functions (Gram-NS, a
    user's own) are recomputed but their coefficients are unknown: ns_* and ns_fail_frac say so."""
    if not _dion_matrix_group(group):
        return None
    schedule = DION_NS_FUNCTIONS.get(kind)
    if schedule is None:
        raise ValueError(f"Dion's newton_schulz_func {kind!r} is not one spectralscope knows the coefficients of "
                         f"({', '.join(DION_NS_FUNCTIONS)})")
    return NSConfig(schedule, 5, float(group["epsilon"]), torch.bfloat16)


def dion_orthogonalize(fn: Any, m: Tensor, group: Mapping[str, Any]) -> Tensor:
    """O as Dion's step computes it: the instance's own function on the bf16 input, with ε as a float32 tensor."""
    return fn(m.to(torch.bfloat16), epsilon=torch.tensor(group["epsilon"]))


def dion_decay(group: Mapping[str, Any]) -> float:
    if group.get("cautious_wd"):
        raise ValueError("cautious weight decay decays only where update and weight agree in sign: the self-check "
                         "cannot remove it")
    return 1.0 - float(group["lr"]) * float(group["weight_decay"])


def dion_normuon_direction(o: Tensor, group: Mapping[str, Any], v: Tensor | None) -> Tensor:
    """What Dion's NorMuon applies after NS: `rows_normalised` by v_t (``variance_neuron`` after the step) and
    1e-8."""
    if v is None:
        raise ValueError("Dion's NorMuon keeps no variance_neuron for this parameter")
    return rows_normalised(o, v, 1e-8)


def dion_variance(p: Tensor, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor | None:
    return state.get("variance_neuron") if _dion_matrix_group(group) else None


_DION_DESCRIBE = ("lr", "mu", "weight_decay", "epsilon", "nesterov", "adjust_lr", "flatten", "algorithm")


def dion_adapter(optimizer: Any) -> Adapter:
    """The adapter of one Dion Muon or NorMuon, bound to its NS function (``_newton_schulz_func``)."""
    fn = optimizer._newton_schulz_func
    kind = getattr(fn, "__name__", type(fn).__name__)
    common = dict(ns=partial(dion_ns, kind), orthogonalize=partial(dion_orthogonalize, fn), decay=dion_decay)
    if type(optimizer).__name__ == "NorMuon":
        return Adapter(dion_momentum, describe=(*_DION_DESCRIBE, "muon_beta2", "cautious_wd"),
                       direction=dion_normuon_direction, extra=dion_variance, **common)
    return Adapter(dion_momentum, describe=_DION_DESCRIBE, **common)


def _is_dion(optimizer: Any) -> bool:
    return type(optimizer).__name__ in ("Muon", "NorMuon") and hasattr(optimizer, "_newton_schulz_func") and {
        "mu", "algorithm", "epsilon", "flatten", "adjust_lr"} <= set(optimizer.defaults)


register_layout("Dion's Muon and NorMuon", _is_dion, dion_adapter)
