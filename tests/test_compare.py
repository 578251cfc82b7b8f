"""spectralscope.compare: a tiny three-optimizer sweep, read back and checked against float64 numpy on the stores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

import spectralscope as ss
from spectralscope.compare import FFN_KIND, comparison, run_row, summary_text, swept_size
from spectralscope.fit import confidence_band


@pytest.fixture(scope="module")
def sweep(optimizer_sweep, sweep_comparison):
    return optimizer_sweep, sweep_comparison


def test_a_sweep_is_read_as_its_optimizers_and_widths(sweep):
    runs, c = sweep
    assert c.swept == "width" and swept_size([ss.open_run(r) for r in runs]) == "width"
    assert list(c.per_run["optimizer"]) == ["muon"] * 3 + ["adamw"] * 3 + ["normuon"] * 3
    assert list(c.per_run["size"]) == [16.0, 24.0, 32.0] * 3
    assert set(c.momentum["optimizer"]) == {"muon", "adamw", "normuon"}
    # NorMuon and Muon apply NS: they get a recommendation, AdamW none
    assert set(c.recommendation["optimizer"]) == {"muon", "normuon"}


def test_the_per_run_values_are_the_stores_medians(sweep):
    runs, c = sweep
    tree = ss.open_run(runs[2])  # muon, width 32
    ds = tree["optimizer"].dataset
    n = ds.sizes["step"]
    half = slice(n // 2, n)
    erank = ds["update_erank"].values[half].astype(np.float64)
    r = np.minimum(ds["rows"].values, ds["cols"].values)
    expect = np.median(np.median(erank, axis=0) / r)
    row = run_row(tree, "width")
    assert row["update_isotropy"] == pytest.approx(expect, rel=1e-12)
    cv = np.median(ds["neuron_cv"].values[half].astype(np.float64), axis=0)
    assert row["neuron_cv"] == pytest.approx(np.median(cv), rel=1e-12)
    tall = ds["rows"].values > ds["cols"].values
    assert tall.sum() == 1 and row["neuron_cv_tall"] == pytest.approx(cv[tall][0], rel=1e-12)  # c_fc (4d, d)
    sh = tree["sharpness"].dataset
    nds = sh["nds"].values.astype(np.float64)
    within = sh["nds_within"].values.astype(np.float64).sum(axis=1) / nds
    assert row["within_share"] == pytest.approx(np.median(within[len(nds) // 2:]), rel=1e-12)
    loss = tree["scalars"].dataset["loss"].values.astype(np.float64)
    assert row["final_loss"] == pytest.approx(np.median(loss[-2:]), rel=1e-12)


@pytest.mark.parametrize("bucket", ["all", "tail"])
def test_by_kind_fits_are_ols_of_the_settled_medians(sweep, bucket):
    runs, c = sweep
    sizes, values = [], []
    for r in runs[6:]:  # normuon
        tree = ss.open_run(r)
        ds = tree["activations"].dataset
        n = ds.sizes["step"]
        mods = ds["kind"].values == FFN_KIND
        hard = ds["act_hard_rank"].sel(bucket=bucket).values.astype(np.float64)
        per_layer = np.median(hard[n // 2:, mods], axis=0)
        sizes.append(tree.attrs["meta"]["width"])
        values.append(np.median(per_layer))
    ref = scipy.stats.linregress(np.log(sizes), np.log(values))
    t = scipy.stats.t.ppf(0.975, len(sizes) - 2)
    key = "act_hard_rank" if bucket == "all" else f"act_hard_rank@{bucket}"
    fit = c.activations[key].set_index(["optimizer", "kind"]).loc[("normuon", FFN_KIND)]
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-9)
    assert fit["ci_high"] - fit["slope"] == pytest.approx(t * ref.stderr, rel=1e-9)
    assert c.buckets == ["head", "mid", "tail"]


def test_the_summary_fits_on_one_screen_and_names_every_optimizer(sweep):
    _, c = sweep
    text = summary_text(c)
    lines = text.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 140
    for o in ("muon", "adamw", "normuon"):
        assert sum(ln.strip().startswith(o) for ln in lines) >= 2
    assert "Newton–Schulz steps" in text and "hard rank β" in text


def test_csv_tables_are_written_and_read_back(sweep, tmp_path):
    import pandas as pd

    _, c = sweep
    paths = c.write_csv(tmp_path)
    names = {p.name for p in paths}
    assert {"runs.csv", "fits_momentum.csv", "fits_act_soft_rank.csv", "fits_act_hard_rank.csv", "nds.csv"} <= names
    back = pd.read_csv(tmp_path / "runs.csv")
    assert np.allclose(back["update_isotropy"], c.per_run["update_isotropy"])


def test_confidence_band_against_the_ols_covariance():
    """The band from `confidence_band` against var(a + b·u₀) = s²·[1 u₀](XᵀX)⁻¹[1 u₀]ᵀ from numpy's lstsq."""
    gen = np.random.default_rng(3)
    x = np.array([16.0, 24, 32, 48, 64, 96])
    y = 3 * x ** 0.7 * np.exp(gen.normal(0, 0.1, x.size))
    at = np.array([10.0, 40, 200])
    line, lo, hi = confidence_band(x, y, at)
    X = np.c_[np.ones_like(x), np.log(x)]
    beta, res, *_ = np.linalg.lstsq(X, np.log(y), rcond=None)
    s2 = float(res[0]) / (x.size - 2)
    X0 = np.c_[np.ones_like(at), np.log(at)]
    se = np.sqrt(s2 * np.einsum("ij,jk,ik->i", X0, np.linalg.inv(X.T @ X), X0))
    t = scipy.stats.t.ppf(0.975, x.size - 2)
    assert np.allclose(np.log(line), X0 @ beta, rtol=0, atol=1e-12)
    assert np.allclose(np.log(hi) - np.log(line), t * se, rtol=1e-10)
    assert np.allclose(np.log(line) - np.log(lo), t * se, rtol=1e-10)


def test_comparison_says_what_it_cannot_fit(tmp_path, sweep):
    runs, _ = sweep
    with pytest.raises(ValueError, match="no runs"):
        comparison([])
    c = comparison(runs[:3])  # one optimizer still compares
    assert list(dict.fromkeys(c.per_run["optimizer"])) == ["muon"]
