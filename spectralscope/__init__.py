"""spectralscope: spectral diagnostics of PyTorch training, built around Muon's Newton–Schulz.

    rec = ss.watch(optimizer, model, "runs/x.zarr")   # record
    tree = ss.open_run("runs/x.zarr")                  # read (xarray.DataTree)

The names below are imported on first use (PEP 562), so the read side — `open_run`, `fit_scaling`, the
dashboard — never imports torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("spectralscope")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: public name → the module that defines it
_LAZY = {
    "register_adapter": "adapters",
    "frequency_buckets": "buckets",
    "PowerLawFit": "fit",
    "backtest": "fit",
    "fit_scaling": "fit",
    "power_law": "fit",
    "recommend_ns_steps": "fit",
    "ActivationSpectra": "hooks.activations",
    "AttentionLogits": "hooks.attention",
    "GradientSpectra": "hooks.gradients",
    "Sharpness": "hooks.sharpness",
    "WeightSpectra": "hooks.weights",
    "NSConfig": "newton_schulz",
    "fewest_ns_steps": "newton_schulz",
    "newton_schulz": "newton_schulz",
    "ns_threshold": "newton_schulz",
    "scalar_map": "newton_schulz",
    "Recorder": "recorder",
    "watch": "recorder",
    "DEFAULT_QUANTILES": "schema",
    "quantiles": "spectra",
    "singular_values": "spectra",
    "open_run": "store",
}

__all__ = [
    "DEFAULT_QUANTILES",
    "ActivationSpectra",
    "AttentionLogits",
    "GradientSpectra",
    "NSConfig",
    "PowerLawFit",
    "Recorder",
    "Sharpness",
    "WeightSpectra",
    "__version__",
    "backtest",
    "fewest_ns_steps",
    "fit_scaling",
    "frequency_buckets",
    "newton_schulz",
    "ns_threshold",
    "open_run",
    "power_law",
    "quantiles",
    "recommend_ns_steps",
    "register_adapter",
    "scalar_map",
    "singular_values",
    "watch",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spectralscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .adapters import register_adapter
    from .buckets import frequency_buckets
    from .fit import PowerLawFit, backtest, fit_scaling, power_law, recommend_ns_steps
    from .hooks.activations import ActivationSpectra
    from .hooks.attention import AttentionLogits
    from .hooks.gradients import GradientSpectra
    from .hooks.sharpness import Sharpness
    from .hooks.weights import WeightSpectra
    from .newton_schulz import NSConfig, fewest_ns_steps, newton_schulz, ns_threshold, scalar_map
    from .recorder import Recorder, watch
    from .schema import DEFAULT_QUANTILES
    from .spectra import quantiles, singular_values
    from .store import open_run
