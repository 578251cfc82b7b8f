"""Quantities derived from stored variables on read, never stored: one definition each, used by `fit_scaling`,
`compare` and the dashboard.

The μP spectral condition (a layer's hyper-parameters transfer across widths when ‖W‖₂ and ‖ΔW‖₂ scale as
sqrt(fan_out/fan_in)), from the optimizer group of a layer with ``rows`` = fan_out and ``cols`` = fan_in:
- ``mup_weight_ratio`` = ‖W‖₂ / sqrt(rows/cols), with ‖W‖₂ = ``weight_spectral_norm``;
- ``mup_update_ratio`` = ‖ΔW‖₂ · sqrt(cols/rows), with ‖ΔW‖₂ = ``update_sv`` at q = 1.
Both should stay O(1) and flat across widths: a fitted exponent against width whose 95% interval contains 0
reads "holds".
"""

from __future__ import annotations

import numpy as np

#: name → (the group it is derived from, what it is)
DERIVED: dict[str, tuple[str, str]] = {
    "mup_weight_ratio": ("optimizer", "‖W‖₂ / sqrt(rows/cols)"),
    "mup_update_ratio": ("optimizer", "‖ΔW‖₂ · sqrt(cols/rows)"),
}


def derive(ds, name: str):
    """The derived variable ``name`` (step, layer) of an optimizer-group dataset ``ds`` (xarray), ValueError in one
    line when what it is made from was not recorded."""
    if name not in DERIVED:
        raise ValueError(f"unknown derived quantity {name!r}; known: {', '.join(DERIVED)}")
    scale = np.sqrt(ds["rows"].astype(np.float64) / ds["cols"].astype(np.float64))
    if name == "mup_weight_ratio":
        if "weight_spectral_norm" not in ds:
            raise ValueError("mup_weight_ratio needs weight_spectral_norm, which this run did not record")
        return (ds["weight_spectral_norm"] / scale).rename(name)
    if "update_sv" not in ds or not np.isclose(ds["quantile"].values, 1.0).any():
        raise ValueError("mup_update_ratio needs update_sv at quantile 1, which this run did not record")
    return (ds["update_sv"].sel(quantile=1.0, method="nearest").drop_vars("quantile") / scale).rename(name)
