"""Quantities derived from stored variables on read, never stored: one definition each, used by `fit_scaling`,
`compare`, ``spectralscope fit`` and the dashboard.

The μP spectral condition (a layer's hyper-parameters transfer across widths when ‖W‖₂ and ‖ΔW‖₂ scale as
sqrt(fan_out/fan_in)), from the optimizer group of a layer with ``rows`` = fan_out and ``cols`` = fan_in:
- ``mup_weight_ratio`` = ‖W‖₂ / sqrt(rows/cols), with ‖W‖₂ = ``weight_spectral_norm``;
- ``mup_update_ratio`` = ‖ΔW‖₂ · sqrt(cols/rows), with ‖ΔW‖₂ = ``update_sv`` at q = 1.
Both should stay O(1) and flat across widths: a fitted exponent against width whose 95% interval contains 0
reads "holds" (`holds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Derived:
    """A derived quantity: ``source`` (at quantile level ``level``, or None for a per-layer variable) of ``group``,
    divided by sqrt(rows/cols)."""

    group: str
    source: str
    level: float | None
    text: str


#: name → how it is made
DERIVED: dict[str, Derived] = {
    "mup_weight_ratio": Derived("optimizer", "weight_spectral_norm", None, "‖W‖₂ / sqrt(rows/cols)"),
    "mup_update_ratio": Derived("optimizer", "update_sv", 1.0, "‖ΔW‖₂ · sqrt(cols/rows)"),
}


def _known(name: str) -> Derived:
    if name not in DERIVED:
        raise ValueError(f"unknown derived quantity {name!r}; known: {', '.join(DERIVED)}")
    return DERIVED[name]


def ratio(source, name: str):
    """``source`` / sqrt(rows/cols): the derived ``name`` from its source DataArray (with the ``rows``/``cols``
    coordinates along its layer axis)."""
    scale = np.sqrt(source["rows"].astype(np.float64) / source["cols"].astype(np.float64))
    return (source.astype(np.float64) / scale).rename(name)


def derive(ds, name: str):
    """The derived variable ``name`` (step, layer) of an optimizer-group dataset ``ds`` (xarray), ValueError in one
    line when what it is made from was not recorded."""
    d = _known(name)
    if d.source not in ds:
        raise ValueError(f"{name} needs {d.source}, which this run did not record")
    da = ds[d.source]
    if d.level is not None:
        if "quantile" not in da.dims or not np.isclose(ds["quantile"].values, d.level).any():
            raise ValueError(f"{name} needs {d.source} at quantile {d.level:g}, which this run did not record")
        da = da.sel(quantile=d.level, method="nearest").drop_vars("quantile")
    return ratio(da, name)


def holds(fits):
    """The fit table ``fits`` (of a derived ratio against width) with a ``holds`` column: True where the exponent's
    95% interval contains 0 (the ratio is flat across widths), False where it excludes 0, NaN-free."""
    return fits.assign(holds=(fits["ci_low"] <= 0) & (fits["ci_high"] >= 0))
