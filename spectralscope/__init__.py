"""spectralscope: spectral diagnostics of PyTorch training, built around Muon's Newton–Schulz.

    rec = ss.watch(optimizer, model, "runs/x.zarr")   # record
    tree = ss.open_run("runs/x.zarr")                  # read (xarray.DataTree)
"""

__version__ = "0.1.0"

from .adapters import register_adapter  # noqa: E402
from .fit import PowerLawFit, fit_scaling, power_law, recommend_ns_steps  # noqa: E402
from .hooks.activations import ActivationSpectra  # noqa: E402
from .hooks.gradients import GradientSpectra  # noqa: E402
from .hooks.sharpness import Sharpness  # noqa: E402
from .newton_schulz import NSConfig, fewest_ns_steps, newton_schulz, ns_threshold, scalar_map  # noqa: E402
from .recorder import Recorder, watch  # noqa: E402
from .spectra import DEFAULT_QUANTILES, quantiles, singular_values  # noqa: E402
from .store import open_run  # noqa: E402

__all__ = [
    "ActivationSpectra",
    "GradientSpectra",
    "Sharpness",
    "DEFAULT_QUANTILES",
    "NSConfig",
    "PowerLawFit",
    "Recorder",
    "__version__",
    "newton_schulz",
    "ns_threshold",
    "fewest_ns_steps",
    "fit_scaling",
    "open_run",
    "power_law",
    "quantiles",
    "recommend_ns_steps",
    "register_adapter",
    "scalar_map",
    "singular_values",
    "watch",
]
