"""The optimizer record of one step: every watched layer's metrics from its matrices (SPEC §6).

A `Measurer` holds what measuring needs besides the matrices — the layers' names and spectrum methods,
the quantile levels, how the optimizer's Newton–Schulz is configured and read back — and the little state
carried from record to record (the exact route each spectrum took last time, the power-iteration vector
of large layers, the estimator's random stream). It does no I/O and knows nothing of hooks or stores, so
the recorder can run it inline, on a worker thread, or in a worker process (`spectralscope.worker`),
with the same results. The formulas are in `optimizer_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import schema
from .adapters import Adapter
from .estimate import SpectrumEstimate, quantile_bracket, representative_spectrum, slq
from .layers import MatrixView
from .newton_schulz import NSConfig, newton_schulz, ns_threshold
from .optimizer_metrics import (
    direction_cosine,
    momentum_metrics,
    newton_schulz_metrics,
    update_metrics,
    weight_metrics,
)
from .spectra import Spectrum, as_matrix, matrix_spectra, matrix_spectrum

#: The optimizer group's variables always stored: name → whether it carries a quantile axis.
OPTIMIZER_VARIABLES: dict[str, bool] = {v.name: v.quantiled for v in schema.OPTIMIZER.variables if not v.optional}
#: With an estimated layer in the run: the bound on |recorded − true| of each estimated quantile family
#: (`estimate.quantile_bracket`: hi − lo; 0 on exactly measured layers) → the family it belongs to.
ESTIMATE_BOUNDS = {v.name: v.family for v in schema.OPTIMIZER.variables if v.optional}
#: family → the (always stored) variables one failure of it blanks
_FAMILIES: dict[str, tuple[str, ...]] = {}
for _v in schema.OPTIMIZER.variables:
    if not _v.optional:
        _FAMILIES[_v.family] = (*_FAMILIES.get(_v.family, ()), _v.name)

#: A metric that came out NaN/Inf or failed: (variable, layer name, why).
Problem = tuple[str, str, str]


class LayerInputs(NamedTuple):
    """What a layer's optimizer metrics are computed from, each shaped as the parameter is stored (the layer's
    `MatrixView` reads its (out, in) matrix from them): M (None if the optimizer has none; ``why`` says what
    failed), W_after, W_before (None when not snapshotted), the hyperparameters of its param group (a copy,
    without the parameters) and whether the step had a gradient for it."""

    m: Tensor | None
    w_after: Tensor
    w_before: Tensor | None
    why: BaseException | None
    group: Mapping[str, Any]
    stepped: bool
    extra: Tensor | None = None  # optimizer state the applied direction takes (`Adapter.extra`)


class Measurer:
    """Measures the optimizer row of a step, with what the optimizer's ``adapter`` (`adapters.Adapter`; or one per
    layer name, when several optimizers are watched) says: its NS configuration per param group, how to read
    the applied NS output back from the weights, how it orthogonalises and what it applies (the self-check
    ``ns_consistency``). ``views`` says how each layer reads its parameter as an (out, in) matrix
    (`layers.MatrixView`; as stored where not given)."""

    def __init__(self, names: Sequence[str], methods: Mapping[str, str], quantiles: Sequence[float],
                 ns_floor: float, adapter: Adapter | Mapping[str, Adapter],
                 views: Mapping[str, MatrixView] | None = None):
        self.names = list(names)
        self.adapters = dict(adapter) if isinstance(adapter, Mapping) else dict.fromkeys(self.names, adapter)
        self.views = {name: (views or {}).get(name) or MatrixView(name) for name in self.names}
        self.methods = dict(methods)
        self.quantiles = list(quantiles)
        self.ns_floor = float(ns_floor)
        self.estimated = any(m != "exact" for m in self.methods.values())
        # the optimizer group's variables (name → has a quantile axis): the bounds only when a layer is estimated
        self.variables = {**OPTIMIZER_VARIABLES, **({v: True for v in ESTIMATE_BOUNDS} if self.estimated else {})}
        self._vectors: dict[str, Tensor] = {}
        self._k_hint: dict[tuple[str, str], int] = {}  # singular values to refine at the last record, per spectrum
        self._estimates: dict[str, SpectrumEstimate] = {}  # this layer's SLQ estimates, per family
        self._slq_gen: torch.Generator | None = None  # fresh random vectors at every estimate, private stream

    def empty_row(self) -> dict[str, np.ndarray]:
        nq, nl = len(self.quantiles), len(self.names)
        return {v: np.full((nl, nq) if q else (nl,), np.nan) for v, q in self.variables.items()}

    def finish(self, inputs: Sequence[LayerInputs]) -> tuple[dict[str, np.ndarray], list[Problem]]:
        """The optimizer row from each layer's inputs, and the metrics that came out NaN/Inf or failed (the
        finisher of `optimizer_record.OptimizerRecord`). The matrices every layer's spectra are taken of come
        first, so that same-shaped ones are decomposed together (`spectra.matrix_spectra`)."""
        row = self.empty_row()
        outputs: dict[tuple[str, int | None], Tensor] = {}  # NS_k(M) of a parameter that several layers view
        matrices = [self.matrices(name, x, outputs) for name, x in zip(self.names, inputs, strict=True)]
        spectra = self._decompose(matrices)
        measured = [self.measure_layer(name, x, outputs, mats, ready)
                    for name, x, mats, ready in zip(self.names, inputs, matrices, spectra, strict=True)]
        problems: list[Problem] = []
        for i, host in enumerate(to_host(measured)):
            problems += fill(row, i, self.names[i], host)
        return row, problems

    def matrices(self, name: str, x: LayerInputs,
                 outputs: dict[tuple[str, int | None], Tensor] | None = None) -> dict[str, Tensor | Exception]:
        """The matrices layer ``name``'s spectra are taken of, per family, or what failed in forming one:
        ``momentum`` M, ``newton_schulz`` O = NS_k(M) cut to the layer (`_ns_output`), ``update`` ΔW in float64
        (W_after − W_before of float32 weights is exact there, not always in float32). A family the layer does
        not have is left out."""
        view, adapter = self.views[name], self.adapters[name]
        mats: dict[str, Tensor | Exception] = {}
        ns, ns_error = _ns_of(adapter, x.group, self.ns_floor)
        if x.m is not None:
            mats["momentum"] = view(x.m)
            if ns is not None and ns_error is None:
                try:
                    mats["newton_schulz"] = view.part(self._ns_output(x, view, adapter, ns, outputs))
                except Exception as exc:
                    mats["newton_schulz"] = exc
        if x.w_before is not None:
            try:
                mats["update"] = view(x.w_after).to(torch.float64) - view(x.w_before).to(torch.float64)
            except Exception as exc:
                mats["update"] = exc
        return mats

    def _decompose(self, matrices: Sequence[Mapping[str, Tensor | Exception]]) -> list[dict[str, Spectrum]]:
        """The exact spectra of every layer's matrices in one `matrix_spectra` call: per layer, {family: spectrum}
        (empty for an estimated layer, and for all if the call fails: each layer then takes its own, where a
        failure blanks only its family)."""
        keys, mats = [], []
        for i, (name, layer) in enumerate(zip(self.names, matrices, strict=True)):
            if self.methods[name] == "slq":
                continue
            for family, mat in layer.items():
                if isinstance(mat, Tensor):
                    keys.append((i, family))
                    mats.append(mat)
        spectra: list[dict[str, Spectrum]] = [{} for _ in self.names]
        try:
            found = matrix_spectra(mats, [self._k_hint.get((self.names[i], family)) for i, family in keys])
        except Exception:
            return spectra
        for (i, family), sp in zip(keys, found, strict=True):
            spectra[i][family] = sp
        return spectra

    def measure_layer(self, name: str, x: LayerInputs, outputs: dict[tuple[str, int | None], Tensor] | None = None,
                      mats: Mapping[str, Tensor | Exception] | None = None,
                      spectra: Mapping[str, Spectrum] | None = None) -> dict[str, tuple[Tensor, str]]:
        """Every optimizer metric of one layer from its full matrices: {variable: (value on the layer's device,
        NaN reason)}; `to_host` brings a whole record to the host at once. Each metric is taken on the layer's
        (out, in) matrix; O = NS_k(M) is computed on the matrix the optimizer orthogonalises (`MatrixView.whole`:
        all of a fused q/k/v projection) and then cut to the layer, kept in ``outputs`` for its other layers.
        ``mats``: the layer's `matrices`, when already formed; ``spectra``: their spectra, when already taken."""
        view, adapter = self.views[name], self.adapters[name]
        if mats is None:
            mats = self.matrices(name, x, outputs)
        why, group = x.why, x.group
        w_after = view(x.w_after)
        qs = self.quantiles
        out: dict[str, Tensor] = {}
        reasons: dict[str, str] = {}

        def fail(family_name: str, exc: BaseException) -> None:
            bounds = [b for b, fam in ESTIMATE_BOUNDS.items() if fam == family_name and b in self.variables]
            for var in (*_FAMILIES[family_name], *bounds):
                out[var] = torch.full((len(qs),) if self.variables[var] else (), float("nan"))
                reasons[var] = f"failed ({type(exc).__name__}: {exc})"

        def family(family_name: str, fn: Callable[[], dict[str, Tensor]]) -> None:
            try:
                out.update(fn())
            except Exception as exc:
                fail(family_name, exc)

        def matrix(family_name: str) -> Tensor:
            mat = mats[family_name]
            if isinstance(mat, Exception):
                raise mat
            return mat

        # the NS configuration and its threshold feed ns_* and ns_fail_frac only: their failure blanks nothing else
        ns, ns_error = _ns_of(adapter, group, self.ns_floor)
        if why is not None:
            fail("momentum", why)
        if x.m is not None:
            family("momentum", lambda: momentum_metrics(matrix("momentum"), qs, None if ns_error else ns,
                                                        self.ns_floor, self._spectrum(name, "momentum", spectra)))
        if ns_error is not None:
            fail("newton_schulz", ns_error)
            out["ns_fail_frac"] = torch.tensor(float("nan"))
            reasons["ns_fail_frac"] = f"failed ({type(ns_error).__name__}: {ns_error})"
        elif x.m is not None and ns is not None:
            family("newton_schulz", lambda: newton_schulz_metrics(matrix("newton_schulz"), qs,
                                                                  self._spectrum(name, "newton_schulz", spectra)))
            if x.w_before is not None and x.stepped:
                self._consistency(x, view, adapter, ns, outputs, out, reasons)
        if x.w_before is not None:
            family("update", lambda: update_metrics(matrix("update"), qs, self._spectrum(name, "update", spectra)))

        def weight() -> dict[str, Tensor]:
            metrics, v = weight_metrics(w_after, self._vectors.get(name))
            if v is not None and bool(torch.isfinite(v).all()):
                self._vectors[name] = v
            return metrics

        family("weight", weight)
        if self.estimated:
            if self.methods[name] == "exact":
                out.update({v: torch.zeros(len(qs), dtype=torch.float64) for v, fam in ESTIMATE_BOUNDS.items()
                            if not (fam == "momentum" and x.m is None) and not (fam == "update" and x.w_before is None)
                            and not (fam == "newton_schulz" and (x.m is None or ns is None))})
            else:
                try:
                    out.update({k: v for k, v in self._bounds(out).items() if k not in reasons})
                except Exception as exc:
                    for var in ESTIMATE_BOUNDS:
                        out[var] = torch.full((len(qs),), float("nan"))
                        reasons[var] = f"failed ({type(exc).__name__}: {exc})"
                self._estimates.clear()
        return {k: (v.detach(), reasons.get(k, "is not finite")) for k, v in out.items()}

    def _spectrum(self, name: str, family: str, spectra: Mapping[str, Spectrum] | None = None
                  ) -> Callable[[Tensor], Spectrum]:
        """This layer's spectrum of ``family``: the one already taken of its matrix (``spectra``, from
        `_decompose`), else the exact route chosen from what the last record of it needed."""
        key = (name, family)

        def spectrum(a: Tensor) -> Spectrum:
            if self.methods[name] == "slq":
                return self._estimate(a, family)
            taken = (spectra or {}).get(family)
            sp = taken if taken is not None else matrix_spectrum(a, self._k_hint.get(key))
            self._k_hint[key] = sp.k
            return sp

        return spectrum

    def _estimate(self, a: Tensor, family: str) -> Spectrum:
        """The SLQ route: σ̃ (`estimate.representative_spectrum`) and the exact Gram diagonal (row or column
        norms²); the estimate is kept for the family's quantile bounds."""
        m = as_matrix(a).detach().to(torch.float64)
        if self._slq_gen is None or self._slq_gen.device != m.device:
            self._slq_gen = torch.Generator(device=m.device).manual_seed(0)
        est = slq(m, generator=self._slq_gen)
        self._estimates[family] = est
        diag = m.square().sum(1) if m.shape[0] <= m.shape[1] else m.square().sum(0)
        return Spectrum(representative_spectrum(est), diag, "slq", 0)

    def _bounds(self, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """hi − lo of each estimated quantile (`estimate.quantile_bracket`), in the units of the recorded
        values: momentum_sv is normalised by ‖M‖_F."""
        res = {}
        for var, fam in ESTIMATE_BOUNDS.items():
            est = self._estimates.get(fam)
            if est is None:
                continue
            scale = float(out["momentum_norm"]) if fam == "momentum" else 1.0
            lo, hi = quantile_bracket(est, self.quantiles, scale if scale > 0 else float("nan"))
            res[var] = hi - lo
        return res

    def _ns_output(self, x: LayerInputs, view: MatrixView, adapter: Adapter, ns: NSConfig,
                   outputs: dict[tuple[str, int | None], Tensor] | None) -> Tensor:
        """O = NS_k(M) of the matrix the optimizer orthogonalises, in its stored orientation: read back from
        the step just applied where the adapter knows how (the optimizer's own result, at no cost), else
        recomputed (`_recomputed`). A parameter without a gradient was not stepped: nothing to read back. Kept
        in ``outputs`` for the other layers viewing the same matrix."""
        key = ("applied", view.param, view.index)
        if outputs is not None and key in outputs:
            return outputs[key]
        o = None
        if x.w_before is not None and adapter.applied is not None and x.stepped:
            o = adapter.applied(view.whole(x.w_after), x.group, view.whole(x.w_before))
        if o is None:
            o = self._recomputed(x, view, adapter, ns, outputs)
        if outputs is not None:
            outputs[key] = o
        return o

    def _recomputed(self, x: LayerInputs, view: MatrixView, adapter: Adapter, ns: NSConfig,
                    outputs: dict[tuple[str, int | None], Tensor] | None) -> Tensor:
        """O = NS_k(M) computed from the recorded M: by the optimizer's own function where the adapter names it,
        else operation for operation as ``torch.optim.Muon`` (`newton_schulz`)."""
        key = ("recomputed", view.param, view.index)
        if outputs is not None and key in outputs:
            return outputs[key]
        m = view.whole(x.m)
        o = adapter.orthogonalize(m, x.group) if adapter.orthogonalize is not None else newton_schulz(m, ns)
        if outputs is not None:
            outputs[key] = o
        return o

    def _consistency(self, x: LayerInputs, view: MatrixView, a: Adapter, ns: NSConfig,
                     outputs: dict[tuple[str, int | None], Tensor] | None, out: dict[str, Tensor],
                     reasons: dict[str, str]) -> None:
        """``ns_consistency``: the direction the adapter implies — NS_k of the recorded M, recomputed (never
        read back from the step it is checked against), as the optimizer transforms it — against the step the
        optimizer applied, weight decay removed."""
        try:
            o = self._recomputed(x, view, a, ns, outputs)
            implied = a.direction(o, x.group, x.extra) if a.direction is not None else o
            w_after, w_before = view.whole(x.w_after), view.whole(x.w_before)
            applied = w_before.to(torch.float64) * a.decay(x.group) - w_after.to(torch.float64)
            within = view(x.m) if a.stochastic else None
            out.update(direction_cosine(view.part(applied), view.part(implied), within))
        except Exception as exc:
            out["ns_consistency"] = torch.tensor(float("nan"))
            reasons["ns_consistency"] = f"failed ({type(exc).__name__}: {exc})"


def _ns_of(adapter: Adapter, group: Mapping[str, Any], floor: float) -> tuple[NSConfig | None, Exception | None]:
    """The param group's NS configuration (None: the optimizer has none), or what fails in it or its threshold."""
    try:
        ns = adapter.ns(group)
        if ns is not None:
            ns_threshold(ns.steps, ns.coefficients, floor)
        return ns, None
    except Exception as exc:
        return None, exc


def fill(row: dict[str, np.ndarray], i: int, name: str, host: Mapping[str, tuple[np.ndarray, str]]) -> list[Problem]:
    """Put layer i's host values into the row; returns its values that are not finite, with the reason."""
    problems = []
    for var, (value, reason) in host.items():
        row[var][i] = value
        if not np.isfinite(value).all():
            problems.append((var, name, reason))
    return problems


def to_host(measured: Sequence[Mapping[str, tuple[Tensor, str]]]) -> list[dict[str, tuple[np.ndarray, str]]]:
    """The values of a record's layers as float64 numpy arrays, with one device-to-host copy per device
    (on an accelerator each copy waits for the device: one wait per record, not one per value)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for out in measured:
        for value, _ in out.values():
            by_device.setdefault(value.device, []).append(value.reshape(-1).to(torch.float64))
    flat = {dev: torch.cat(parts).cpu().numpy() if parts else np.empty(0) for dev, parts in by_device.items()}
    offsets = dict.fromkeys(flat, 0)
    hosts = []
    for out in measured:
        host = {}
        for var, (value, reason) in out.items():
            dev, n = value.device, value.numel()
            host[var] = (flat[dev][offsets[dev]:offsets[dev] + n].reshape(value.shape), reason)
            offsets[dev] += n
        hosts.append(host)
    return hosts
