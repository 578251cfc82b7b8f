"""`WeightSpectra`: the spectra of the watched weight matrices themselves, at their own cadence.

Every ``every`` optimizer steps (after the step) each watched layer's (out, in) matrix W is copied, and where the
record is finished its singular values σ(W) are taken exactly (`spectralscope.spectra.singular_values`, float64)
and summarised: ``weight_sv`` = quantiles of σ(W) (q = 1 is ‖W‖₂), ``weight_alpha`` = the power-law exponent of
the ESD λ = σ² (`spectralscope.heavy_tail.weight_alpha`: MLE over the tail, x_min by the KS distance, as
WeightWatcher fits it) and ``weight_stable_rank`` = ‖W‖_F²/‖W‖₂². No hooks: the weights are read, never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spectralscope import schema
from spectralscope.heavy_tail import stable_rank, weight_alpha
from spectralscope.layers import layer_coords
from spectralscope.spectra import quantiles as quantiles_of
from spectralscope.spectra import singular_values
from spectralscope.store import GroupSpec

from .modules import Context, check_every

#: The largest smaller side whose full spectrum is taken (the alpha fit needs all of it); beyond it NaN, said.
MAX_SIDE = 4096


class WeightFinisher:
    """Turns a record's weight copies into its row. Runs where the record is finished (picklable)."""

    def __init__(self, names: Sequence[str], quantiles: Sequence[float]) -> None:
        self.names, self.quantiles = list(names), [float(q) for q in quantiles]

    def finish(self, taken: list) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        """The row, and (metric, layer, why) of every value that could not be computed."""
        problems: list[tuple[str, str, str]] = []
        n, nq = len(self.names), len(self.quantiles)
        out = {"weight_sv": np.full((n, nq), np.nan), "weight_alpha": np.full(n, np.nan),
               "weight_stable_rank": np.full(n, np.nan)}
        for i, w in enumerate(taken):
            if w is None:
                continue
            name = self.names[i]
            if min(w.shape) > MAX_SIDE:
                problems.append(("weight_sv", name, f"has a smaller side of {min(w.shape)}, above the {MAX_SIDE} "
                                                    "whose full spectrum is taken"))
                continue
            try:
                with torch.no_grad():
                    sv = singular_values(w)
                    out["weight_sv"][i] = quantiles_of(sv, self.quantiles).cpu().numpy()
                    host = sv.cpu().numpy()
            except Exception as exc:
                problems.append(("weight_sv", name, f"failed ({type(exc).__name__}: {exc})"))
                continue
            if not np.isfinite(host).all():
                problems.append(("weight_sv", name, "is not finite"))
                continue
            out["weight_stable_rank"][i] = stable_rank(host)
            alpha, why = weight_alpha(host)
            out["weight_alpha"][i] = alpha
            if why is not None:
                problems.append(("weight_alpha", name, why))
        return out, problems


class WeightSpectra:
    """Record ``weight_sv`` (quantiles), ``weight_alpha`` and ``weight_stable_rank`` of every watched layer every
    ``every`` optimizer steps (default 100)."""

    group = "weights"

    def __init__(self, every: int = 100, quantiles: Sequence[float] | None = None):
        check_every("WeightSpectra", every)
        qs = list(schema.DEFAULT_QUANTILES if quantiles is None else quantiles)
        if not qs or any(not (isinstance(q, (int, float)) and 0 <= q <= 1) for q in qs):
            raise ValueError(f"WeightSpectra: quantiles must be levels in [0, 1], got {quantiles!r}")
        self.every, self.quantiles = every, sorted(float(q) for q in qs)
        self.layers: list = []
        self._writes = True
        self.paused = False
        self.live = False  # the payload is copies
        self.defer = False
        self.finisher = WeightFinisher([], self.quantiles)

    def bind(self, ctx: Context) -> None:
        """Take the watched layers (nothing to hook)."""
        if not ctx.layers:
            raise ValueError("WeightSpectra: the optimizer updates no matrix to record")
        self.layers = list(ctx.layers)
        self._writes = ctx.writes
        self.finisher = WeightFinisher([lay.name for lay in self.layers], self.quantiles)

    def remove(self) -> None:
        self.layers = []

    def spec(self) -> GroupSpec:
        coords = {**layer_coords(self.layers), "quantile": ("quantile", np.array(self.quantiles, dtype=np.float64))}
        return GroupSpec(self.group, coords, schema.WEIGHTS.dims())

    def take(self, step: int) -> list | None:
        """After the step: a copy of each layer's (out, in) matrix (None when ``step`` is not recorded)."""
        if step % self.every != 0 or not self._writes:  # rank 0 writes; the weights are the same on every rank
            return None
        with torch.no_grad():
            return [lay.view(lay.param.detach()).clone() for lay in self.layers]
