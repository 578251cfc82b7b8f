"""spectralscope.derived: the μP ratios from the stored optimizer group, against numpy, and their fits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

import spectralscope as ss
from spectralscope.compare import summary_text
from spectralscope.derived import derive


def test_mup_ratios_are_the_stored_norms_over_sqrt_fan_out_over_fan_in(optimizer_sweep):
    ds = ss.open_run(optimizer_sweep[0])["optimizer"].dataset
    rows, cols = ds["rows"].values.astype(np.float64), ds["cols"].values.astype(np.float64)
    w = ds["weight_spectral_norm"].values.astype(np.float64)
    u = ds["update_sv"].sel(quantile=1.0).values.astype(np.float64)
    np.testing.assert_allclose(derive(ds, "mup_weight_ratio").values, w / np.sqrt(rows / cols), rtol=1e-12)
    np.testing.assert_allclose(derive(ds, "mup_update_ratio").values, u * np.sqrt(cols / rows), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown derived"):
        derive(ds, "mup_other")
    with pytest.raises(ValueError, match="needs update_sv at quantile 1"):
        derive(ds.sel(quantile=[0.5]), "mup_update_ratio")


def test_mup_exponents_are_ols_of_the_settled_ratios_and_say_whether_they_hold(optimizer_sweep, sweep_comparison):
    c = sweep_comparison
    sizes, values = [], []
    for r in optimizer_sweep[:3]:  # muon
        tree = ss.open_run(r)
        ds = tree["optimizer"].dataset
        n = ds.sizes["step"]
        ratio = (ds["update_sv"].sel(quantile=1.0).values * np.sqrt(ds["cols"].values / ds["rows"].values))[n // 2:]
        mods = ds["kind"].values == "mlp_in"
        sizes.append(tree.attrs["meta"]["width"])
        values.append(np.median(np.median(ratio[:, mods], axis=0)))
    ref = scipy.stats.linregress(np.log(sizes), np.log(values))
    fit = c.mup["mup_update_ratio"].set_index(["optimizer", "kind"]).loc[("muon", "mlp_in")]
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-9)
    assert bool(fit["holds"]) == bool(fit["ci_low"] <= 0 <= fit["ci_high"])
    # the fitted table is the one fit_scaling gives for the derived name
    direct = ss.fit_scaling(optimizer_sweep[:3], "mup_update_ratio", by=("optimizer", "kind"), size="width")
    assert direct.set_index("kind").loc["mlp_in", "slope"] == pytest.approx(fit["slope"], rel=1e-12)
    text = summary_text(c)
    assert "μP spectral condition" in text and "‖ΔW‖₂·sqrt(cols/rows) holds in" in text
