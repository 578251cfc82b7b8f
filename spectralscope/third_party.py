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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .adapters import Adapter, register_by_name
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
