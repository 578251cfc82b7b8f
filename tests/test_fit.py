from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import spectralscope as ss
from spectralscope.cli import fit_text
from spectralscope.fit import fit_of


def test_power_law_matches_linregress_and_t_interval(rng):
    x = np.geomspace(1e6, 1e9, 7)
    y = 3.0 * x**-0.27 * np.exp(rng.normal(0, 0.05, x.size))
    fit = ss.power_law(x, y)
    ref = scipy.stats.linregress(np.log(x), np.log(y))
    assert fit.slope == pytest.approx(ref.slope, rel=1e-12)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-12)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-12)
    assert fit.stderr == pytest.approx(ref.stderr, rel=1e-12)
    t = scipy.stats.t.ppf(0.975, x.size - 2)
    assert (fit.ci_low, fit.ci_high) == pytest.approx((ref.slope - t * ref.stderr, ref.slope + t * ref.stderr), rel=1e-12)
    np.testing.assert_allclose(fit.predict(x), np.exp(ref.intercept) * x**ref.slope, rtol=1e-12)
    assert fit.n == 7


def test_exact_power_law_and_dropped_pairs():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, -1.0, np.nan, 3.0])
    y = np.array([5.0, 5 * 2**-0.5, 5 * 4**-0.5, 5 * 8**-0.5, 5 * 16**-0.5, 1.0, 1.0, 0.0])
    fit = ss.power_law(x, y)  # the last three pairs are not finite and positive
    assert fit.n == 5 and fit.slope == pytest.approx(-0.5, abs=1e-12) and fit.r2 == pytest.approx(1.0)
    assert fit.predict(32.0) == pytest.approx(5 * 32**-0.5, rel=1e-12)


def test_offset_recovers_exponent_and_constant():
    x = np.geomspace(1, 1000, 12)
    y = 2.0 * x**-0.8 + 0.3
    fit = ss.power_law(x, y, offset=True)
    assert fit.slope == pytest.approx(-0.8, rel=1e-6) and fit.offset == pytest.approx(0.3, rel=1e-6)
    assert np.exp(fit.intercept) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-6)


def test_too_few_points_raise():
    with pytest.raises(ValueError, match="at least 3"):
        ss.power_law([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        ss.power_law([1.0, 2.0, 3.0], [1.0, -2.0, 0.0])
    with pytest.raises(ValueError, match="equal"):
        ss.power_law([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])


def _write_run(path, size: float, layers: list[tuple[str, str, float]], law, steps: int = 40, ns_steps: int = 5,
               optimizer: str = "torch.optim.Muon", meta: dict | None = None, ns_coefficients=None):
    """A run store written by spectralscope's own writer: momentum_sv follows law(kind, depth, q, size) after a
    burn-in (the first half of the steps hold a different, larger value)."""
    from spectralscope.store import GroupSpec, RunWriter

    qs = np.array([0.1, 0.5, 0.9])
    coords = {
        "layer": ("layer", np.array([n for n, _, _ in layers])),
        "kind": ("layer", np.array([k for _, k, _ in layers])),
        "depth": ("layer", np.array([d for _, _, d in layers])),
        "quantile": ("quantile", qs),
    }
    w = RunWriter(path, [GroupSpec("optimizer", coords, {"momentum_sv": ("step", "layer", "quantile")})],
                  {"name": path.name, "model_size": int(size), "optimizer": {"class": optimizer, "ns_steps": ns_steps,
                                                                   "ns_coefficients": ns_coefficients},
                   "meta": {"width": size / 100, **(meta or {})}})
    for s in range(steps):
        settled = np.array([[law(k, d, q, size) for q in qs] for _, k, d in layers])
        w.append("optimizer", s, {"momentum_sv": settled if s >= steps // 2 else 10 * settled + 1})
    w.close()


ALPHA = {("attn_o", 0.0): 0.25, ("attn_o", 1.0): 0.66, ("mlp_in", 1.0): 0.96}


def _law(kind, depth, q, size):
    return q * 0.5 * size ** -ALPHA[(kind, depth)]


def test_fit_scaling_recovers_known_exponents_from_real_stores(tmp_path):
    layers = [("h.0.attn.o_proj.weight", "attn_o", 0.0), ("h.1.attn.o_proj.weight", "attn_o", 1.0),
              ("h.1.mlp.c_fc.weight", "mlp_in", 1.0)]
    for size in (1e6, 4e6, 1.6e7, 6.4e7):
        _write_run(tmp_path / f"m{int(size)}.zarr", size, layers, _law)
    fits = ss.fit_scaling([str(tmp_path / "*.zarr")], metric="momentum_sv")
    assert list(fits.columns) == ["kind", "depth", "group", "quantile", "slope", "intercept", "r2", "stderr", "ci_low",
                                  "ci_high", "n_sizes", "settled", "offset_gain", "u_mean", "sxx", "n_points",
                                  "max_size"]
    assert len(fits) == 3 * 3 and set(fits["group"]) == {"attn_o@0", "attn_o@1", "mlp_in@1"}
    for _, r in fits.iterrows():
        assert r["slope"] == pytest.approx(-ALPHA[(r["kind"], r["depth"])], abs=1e-9)
        assert np.exp(r["intercept"]) == pytest.approx(r["quantile"] * 0.5, rel=1e-9)
        assert r["n_sizes"] == 4 and r["r2"] == pytest.approx(1.0)
    one = ss.fit_scaling([str(p) for p in sorted(tmp_path.glob("*.zarr"))], quantile=0.5, size="width")
    assert len(one) == 3 and (one["quantile"] == 0.5).all()
    assert one.set_index("group").loc["attn_o@1", "slope"] == pytest.approx(-0.66, abs=1e-9)
    trees = [ss.open_run(p) for p in sorted(tmp_path.glob("*.zarr"))]
    assert ss.fit_scaling(trees, quantile=0.9)["slope"].tolist() == pytest.approx(one["slope"].tolist(), abs=1e-9)

    rec = ss.recommend_ns_steps(fits, model_size=6.4e8, quantile=0.5)
    assert list(rec.columns) == ["kind", "depth", "group", "quantile", "sigma", "ns_steps", "sigma_low",
                                 "ns_steps_conservative", "current_steps", "extrapolation", "far"]
    for _, r in rec.iterrows():
        sigma = 0.25 * 6.4e8 ** -ALPHA[(r["kind"], r["depth"])]
        assert r["sigma"] == pytest.approx(sigma, rel=1e-8)
        assert r["ns_steps"] == ss.fewest_ns_steps(sigma) and r["current_steps"] == 5
        # direct float64 iteration of the scalar map agrees
        grid = np.geomspace(sigma, 1, 5001)
        assert np.all(ss.scalar_map(grid, steps=int(r["ns_steps"])) >= 0.5)
        assert r["ns_steps"] == 1 or not np.all(ss.scalar_map(grid, steps=int(r["ns_steps"]) - 1) >= 0.5)


def test_recommend_ns_steps_takes_the_recorded_per_step_schedule(tmp_path):
    # runs recorded with a per-step schedule (heavyball's five quintics): the recommendation runs that schedule
    sched = [[4.0848, -6.8946, 2.9270], [3.9505, -6.3029, 2.6377], [3.7418, -5.5913, 2.3037],
             [2.8769, -3.1427, 1.2046], [2.8366, -3.0525, 1.2012]]
    layers = [("h.0.attn.o_proj.weight", "attn_o", 0.0)]
    for size in (1e6, 4e6, 1.6e7):
        _write_run(tmp_path / f"m{int(size)}.zarr", size, layers, _law, optimizer="heavyball.Muon",
                   ns_coefficients=sched)
    fits = ss.fit_scaling([str(tmp_path / "*.zarr")], metric="momentum_sv", quantile=0.1)
    assert fits.attrs["current_coefficients"] == sched
    rec = ss.recommend_ns_steps(fits, model_size=100, quantile=0.1)  # σ ≈ 0.016: 4 steps of it, 3 of Muon's
    sigma = float(rec["sigma"].iloc[0])
    k = int(rec["ns_steps"].iloc[0])
    grid = np.geomspace(sigma, 1, 5001)
    lifted = lambda n: np.all(ss.scalar_map(grid, [tuple(sched[min(i, 4)]) for i in range(n)], n) >= 0.5)  # noqa: E731
    assert lifted(k) and not lifted(k - 1)
    assert k != int(ss.recommend_ns_steps(fits, model_size=100, quantile=0.1,
                                          coefficients=(3.4445, -4.7750, 2.0315))["ns_steps"].iloc[0])


def test_depths_are_rounded_when_runs_differ_in_depth(tmp_path):
    def law(kind, depth, q, size):
        return q * size ** -0.3

    grids = {1e6: [0.0, 0.5, 1.0], 4e6: [0.0, 1 / 3, 2 / 3, 1.0], 1.6e7: [0.0, 0.25, 0.5, 0.75, 1.0],
             6.4e7: [0.0, 1 / 3, 2 / 3, 1.0]}
    for size, depths in grids.items():
        layers = [(f"h.{i}.attn.o_proj.weight", "attn_o", d) for i, d in enumerate(depths)]
        _write_run(tmp_path / f"r{int(size)}.zarr", size, layers, law)
    fits = ss.fit_scaling(str(tmp_path / "*.zarr"), quantile=0.5)
    # 1/3 and 2/3 round to 0.25 and 0.75 and join the 5-block run's layers; depth 0.5 spans only 2 sizes
    assert fits["depth"].tolist() == [0.0, 0.25, 0.75, 1.0]
    assert fits["n_sizes"].tolist() == [4, 3, 3, 4]
    assert fits["slope"].tolist() == pytest.approx([-0.3] * 4, abs=1e-9)


def test_tidy_dataframe_without_quantile_and_clear_errors(tmp_path):
    import pandas as pd

    sizes = np.array([1e6, 1e7, 1e8, 1e9])
    df = pd.DataFrame({"kind": "mlp_out", "depth": 0.5, "model_size": sizes, "value": 2 * sizes**-0.4})
    fits = ss.fit_scaling(df)
    assert len(fits) == 1 and np.isnan(fits["quantile"][0]) and fits["slope"][0] == pytest.approx(-0.4, abs=1e-12)
    with pytest.raises(ValueError, match="at least 3 sizes"):
        ss.fit_scaling(df.iloc[:2])
    bad = df.copy()
    bad.loc[1, "value"] = 0.0
    with pytest.raises(ValueError, match="non-positive"):
        ss.fit_scaling(bad)
    mixed = df.assign(kind=["attn_q", "attn_k", "attn_v", "attn_o"])  # no group spans 3 sizes
    with pytest.raises(ValueError, match="at least 3 sizes"):
        ss.fit_scaling(mixed)
    with pytest.raises(ValueError, match="unknown metric"):
        ss.fit_scaling([str(tmp_path / "x.zarr")], metric="nope")
    with pytest.raises(ValueError, match="no run matches"):
        ss.fit_scaling([str(tmp_path / "none*.zarr")])


def test_fit_scaling_reads_only_the_window_lazily_with_dask(tmp_path):
    # 600 steps = chunks [0, 256), [256, 512), [512, 768) of the step axis; the window (0.5, 1.0) is rows
    # 300…599. Corrupt every chunk the fit has no business reading — the burn-in's first chunk of
    # momentum_sv and every chunk of a second variable — and the fits must not change.
    import dask.array

    from spectralscope.store import GroupSpec, RunWriter

    layers = [("h.0.attn.o_proj.weight", "attn_o", 0.0), ("h.1.attn.o_proj.weight", "attn_o", 1.0)]
    qs = np.array([0.1, 0.5, 0.9])
    coords = {"layer": ("layer", np.array([n for n, _, _ in layers])), "kind": ("layer", np.array(["attn_o"] * 2)),
              "depth": ("layer", np.array([0.0, 1.0])), "quantile": ("quantile", qs)}
    variables = {"momentum_sv": ("step", "layer", "quantile"), "ns_out_sv": ("step", "layer", "quantile")}
    sizes = np.round(np.geomspace(1e6, 1e8, 12))  # whole numbers: model_size is stored as an int
    for size in sizes:
        w = RunWriter(tmp_path / f"m{int(size)}.zarr", [GroupSpec("optimizer", coords, variables)],
                      {"name": "x", "model_size": int(size), "optimizer": {"class": "Muon", "ns_steps": 5}})
        for s in range(600):
            law = np.array([[_law("attn_o", d, q, size) for q in qs] for _, _, d in layers])
            w.append("optimizer", s, {"momentum_sv": law if s >= 300 else law + 1, "ns_out_sv": law})
        w.close()
    before = ss.fit_scaling(str(tmp_path / "*.zarr"), quantile=0.5, chunks={})
    tree = ss.open_run(next(tmp_path.glob("*.zarr")), chunks={})
    assert isinstance(tree["optimizer"].dataset["momentum_sv"].data, dask.array.Array)
    corrupted = 0
    for run in tmp_path.glob("*.zarr"):
        for chunk in [*(run / "optimizer" / "momentum_sv" / "c").glob("0/*/*"),
                      *(run / "optimizer" / "ns_out_sv" / "c").rglob("*")]:
            if chunk.is_file():
                chunk.write_bytes(b"garbage, not a zstd frame")
                corrupted += 1
    assert corrupted >= 12 * 4
    with pytest.raises(Exception):  # noqa: B017 — the corruption is real: reading those chunks fails
        ss.open_run(next(tmp_path.glob("*.zarr")))["optimizer"]["ns_out_sv"].load()
    for chunks in ({}, None):
        after = ss.fit_scaling(str(tmp_path / "*.zarr"), quantile=0.5, chunks=chunks)
        np.testing.assert_allclose(after["slope"], before["slope"], rtol=1e-12)
    assert before.set_index("group").loc["attn_o@1", "slope"] == pytest.approx(-0.66, abs=1e-9)


def test_runs_of_unlike_optimizers_or_architectures_are_fitted_apart_and_said_so(tmp_path):
    layers = [("h.1.attn.o_proj.weight", "attn_o", 1.0)]
    for size in (1e6, 4e6, 1.6e7):
        _write_run(tmp_path / f"muon{int(size)}.zarr", size, layers, lambda k, d, q, n: q * n ** -0.5)
        _write_run(tmp_path / f"adamw{int(size)}.zarr", size, layers, lambda k, d, q, n: q * n ** -0.1,
                   optimizer="torch.optim.AdamW")
    fits = ss.fit_scaling([str(tmp_path / "*.zarr")], quantile=0.5)
    assert fits.attrs["by"] == ["optimizer", "kind", "depth"]
    assert fits.attrs["note"] == ("the runs differ in optimizer (torch.optim.AdamW, torch.optim.Muon): fitted "
                                  "separately by optimizer")
    slopes = dict(zip(fits["group"], fits["slope"], strict=True))
    assert slopes == {"AdamW/attn_o@1": pytest.approx(-0.1, abs=1e-9), "Muon/attn_o@1": pytest.approx(-0.5, abs=1e-9)}
    # asked to mix them, it does, and says so
    mixed = ss.fit_scaling([str(tmp_path / "*.zarr")], quantile=0.5, by=("kind", "depth"))
    assert len(mixed) == 1 and "fitted together, as by=('kind', 'depth') asks" in mixed.attrs["note"]
    out = fit_text([str(tmp_path / "*.zarr")], "momentum_sv", 0.5, None, None)
    assert "note: the runs differ in optimizer" in out and "Muon/attn_o@1" in out
    # meta["arch"] parts runs the same way; alike runs get no note
    for size in (1e6, 4e6, 1.6e7):
        _write_run(tmp_path / "arch" / f"a{int(size)}.zarr", size, layers, lambda k, d, q, n: q * n ** -0.5,
                   meta={"arch": "gpt"})
        _write_run(tmp_path / "arch" / f"b{int(size)}.zarr", size, layers, lambda k, d, q, n: q * n ** -0.3,
                   meta={"arch": "llama"})
    by_arch = ss.fit_scaling([str(tmp_path / "arch" / "*.zarr")], quantile=0.5)
    assert by_arch.attrs["by"] == ["arch", "kind", "depth"] and sorted(by_arch["group"]) == ["gpt/attn_o@1",
                                                                                             "llama/attn_o@1"]
    alike = ss.fit_scaling([str(tmp_path / "muon*.zarr")], quantile=0.5)
    assert alike.attrs["note"] is None and alike.attrs["by"] == ["kind", "depth"]


def test_too_few_sizes_names_each_group_once(tmp_path):
    layers = [("h.0.attn.o_proj.weight", "attn_o", 0.0), ("h.1.attn.o_proj.weight", "attn_o", 1.0)]
    for size in (1e6, 4e6):
        _write_run(tmp_path / f"m{int(size)}.zarr", size, layers, _law)
    with pytest.raises(ValueError) as caught:
        ss.fit_scaling([str(tmp_path / "*.zarr")])  # three quantiles per group
    assert str(caught.value) == ("fit_scaling: no layer group has runs of at least 3 sizes (sizes per group: "
                                 "attn_o@0 (2), attn_o@1 (2))")


def test_the_prediction_interval_is_statsmodels_ols_get_prediction_on_the_log_scale():
    import statsmodels.api as sm

    rng = np.random.default_rng(4)
    x = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    y = 2.0 * x ** -0.4 * np.exp(rng.normal(0, 0.1, x.size))
    fit = ss.power_law(x, y)
    ols = sm.OLS(np.log(y), sm.add_constant(np.log(x))).fit()
    for x0 in (1e7, 1e8, 5e9):
        for level in (0.8, 0.95):
            frame = ols.get_prediction(np.array([[1.0, np.log(x0)]])).summary_frame(alpha=1 - level)
            point, low, high = fit.predict(x0, interval=level)
            assert np.log(point) == pytest.approx(float(frame["mean"].iloc[0]), rel=1e-12)
            assert np.log(low) == pytest.approx(float(frame["obs_ci_lower"].iloc[0]), rel=1e-10)
            assert np.log(high) == pytest.approx(float(frame["obs_ci_upper"].iloc[0]), rel=1e-10)
    assert float(fit.predict(1e8)) == pytest.approx(float(fit.predict(1e8, 0.95)[0]))
    with pytest.raises(ValueError, match="interval"):
        fit.predict(1e8, interval=1.5)
    with pytest.raises(ValueError, match="log-log"):
        ss.power_law(x, y + 0.1, offset=True).predict(1e8, interval=0.95)


def test_prediction_intervals_cover_new_points_at_their_nominal_rate():
    """Synthetic power laws with known log-normal noise: the 95% (80%) interval at a held-out larger size holds the
    new observation in about 95% (80%) of 2,000 draws."""
    rng = np.random.default_rng(5)
    x = np.array([32.0, 48, 64, 96])
    for level in (0.8, 0.95):
        hits = 0
        for _ in range(2000):
            noise = rng.normal(0, 0.2, x.size + 1)
            y = 0.5 * x ** -0.3 * np.exp(noise[:-1])
            new = 0.5 * 384.0 ** -0.3 * np.exp(noise[-1])
            _, low, high = ss.power_law(x, y).predict(384.0, interval=level)
            hits += low <= new <= high
        assert abs(hits / 2000 - level) < 0.025, (level, hits / 2000)


def test_fit_tables_carry_the_interval_at_the_target_and_the_conservative_steps(tmp_path):
    layers = [("h.0.attn.o_proj.weight", "attn_o", 0.0)]
    rng = np.random.default_rng(6)
    for size in (1e6, 4e6, 1.6e7):
        _write_run(tmp_path / f"m{int(size)}.zarr", size, layers,
                   lambda k, d, q, n: q * n ** -0.5 * float(np.exp(rng.normal(0, 0.3))))
    fits = ss.fit_scaling(str(tmp_path / "*.zarr"), quantile=0.5, target_size=1.6e9)
    r = fits.iloc[0]
    assert r["n_points"] == 3 and r["max_size"] == 1.6e7
    # the row's interval is its PowerLawFit's (which the statsmodels test above checks)
    _, low, high = ss.fit_scaling(str(tmp_path / "*.zarr"), quantile=0.5).pipe(
        lambda f: fit_of(f.iloc[0]).predict(1.6e9, interval=0.95))
    assert (r["pred_low"], r["pred_high"]) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert r["pred_low"] < r["prediction"] < r["pred_high"]
    assert r["prediction"] == pytest.approx(np.exp(r["intercept"]) * 1.6e9 ** r["slope"])
    rec = ss.recommend_ns_steps(fits, 1.6e9, quantile=0.5)
    row = rec.iloc[0]
    assert row["sigma_low"] == pytest.approx(r["pred_low"], rel=1e-12) and row["sigma"] >= row["sigma_low"]
    assert row["ns_steps_conservative"] == ss.fewest_ns_steps(min(row["sigma_low"], 1.0))
    assert row["ns_steps_conservative"] >= row["ns_steps"]
    assert row["extrapolation"] == pytest.approx(100) and row["far"] and "100× the largest fitted size" in rec.attrs["note"]
    assert not ss.recommend_ns_steps(fits, 1.6e8, quantile=0.5)["far"].iloc[0]


def _write_series(path, size: float, series) -> None:
    """A run whose two attn_o layers' momentum_sv at every quantile is series(depth, size, step), 40 steps."""
    from spectralscope.store import GroupSpec, RunWriter

    qs = np.array([0.1, 0.5, 0.9])
    coords = {"layer": ("layer", np.array(["h.0.attn.o_proj.weight", "h.1.attn.o_proj.weight"])),
              "kind": ("layer", np.array(["attn_o", "attn_o"])), "depth": ("layer", np.array([0.0, 1.0])),
              "quantile": ("quantile", qs)}
    w = RunWriter(path, [GroupSpec("optimizer", coords, {"momentum_sv": ("step", "layer", "quantile")})],
                  {"name": path.name, "model_size": int(size), "optimizer": {"class": "torch.optim.Muon"}})
    for s in range(40):
        w.append("optimizer", s, {"momentum_sv": np.array([[q * series(d, size, s) for q in qs] for d in (0.0, 1.0)])})
    w.close()


def test_settled_windows_start_where_each_series_settled_and_unsettled_groups_are_flagged(tmp_path, capsys):
    from spectralscope.cli import main
    from spectralscope.fit import settled_values
    from spectralscope.settle import settled_from

    def series(depth, n, step):  # depth 0 settles after a transient; depth 1 still grows at the end
        return n ** -0.5 * ((1 + 3 * np.exp(-step / 4.0)) if depth == 0 else np.exp(step / 10.0))

    for size in (1e6, 4e6, 1.6e7):
        _write_series(tmp_path / f"m{int(size)}.zarr", size, series)
    fits = ss.fit_scaling(str(tmp_path / "*.zarr"), quantile=0.5, window="settled")
    by = fits.set_index("group")
    assert bool(by.loc["attn_o@0", "settled"]) and not bool(by.loc["attn_o@1", "settled"])
    assert by.loc["attn_o@0", "slope"] == pytest.approx(-0.5, abs=1e-3)
    tree = ss.open_run(tmp_path / "m1000000.zarr")
    sv = tree["optimizer"]["momentum_sv"].sel(quantile=0.5).values
    start = settled_from(sv[:, 0]).start
    assert start is not None and not settled_from(sv[:, 1]).settled
    frame = settled_values(tree, "momentum_sv", 0.5, window="settled")
    assert frame["burn_in"].iloc[0] == float(start) and np.isnan(frame["burn_in"].iloc[1])
    assert frame["value"].iloc[0] == pytest.approx(np.median(sv[start:, 0]), rel=1e-12)
    assert frame["value"].iloc[1] == pytest.approx(np.median(sv[20:, 1]), rel=1e-12)  # never settled: 2nd half
    assert main(["fit", str(tmp_path / "*.zarr"), "--quantile", "0.5", "--window", "settled"]) == 0
    assert "not settled: 1 group(s) still moving" in capsys.readouterr().out
    assert main(["fit", str(tmp_path / "*.zarr"), "--window", "half"]) == 2


def test_backtest_predicts_the_held_out_size_from_the_others(tmp_path, capsys):
    from spectralscope.cli import main

    rng = np.random.default_rng(7)
    sizes = (1e6, 2e6, 4e6, 8e6, 1.6e7)
    noise = {s: float(np.exp(rng.normal(0, 0.1))) for s in sizes}
    for s in sizes:
        _write_series(tmp_path / f"m{int(s)}.zarr", s, lambda d, n, step, s=s: n ** (-0.5 - 0.2 * d) * noise[s])
    table = ss.backtest(str(tmp_path / "*.zarr"), quantile=0.5)
    assert set(table["held_out"]) == {1.6e7} and len(table) == 2
    for r in table.itertuples():
        x = np.array(sizes[:-1])
        y = np.array([0.5 * n ** (-0.5 - 0.2 * r.depth) * noise[n] for n in x])
        b, a = np.polyfit(np.log(x), np.log(y), 1)
        assert r.predicted == pytest.approx(np.exp(a + b * np.log(1.6e7)), rel=1e-9)
        assert r.actual == pytest.approx(0.5 * 1.6e7 ** (-0.5 - 0.2 * r.depth) * noise[1.6e7], rel=1e-12)
        assert r.error == pytest.approx(r.predicted / r.actual) and r.fold >= 1
        assert r.inside == (r.pred_low <= r.actual <= r.pred_high)
    assert table.attrs["coverage"] == pytest.approx(table["inside"].mean())
    each = ss.backtest(str(tmp_path / "*.zarr"), quantile=0.5, each=True)
    assert set(each["held_out"]) == set(sizes) and len(each) == 10
    assert main(["fit", str(tmp_path / "*.zarr"), "--backtest", "--quantile", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"coverage: {int(table['inside'].sum())}/2" in out and "median error" in out
    with pytest.raises(ValueError, match="at least 4 sizes"):
        ss.backtest([str(tmp_path / f"m{int(s)}.zarr") for s in sizes[:3]])


def test_the_offset_is_said_where_aicc_favours_it_and_not_otherwise():
    from spectralscope.fit import aicc, offset_gain

    x = np.geomspace(1e5, 1e8, 8)
    rng = np.random.default_rng(8)
    pure = 3.0 * x ** -0.4 * np.exp(rng.normal(0, 0.02, x.size))
    floored = 3.0 * x ** -0.4 + 0.01 + 0.0005 * rng.normal(size=x.size)  # a floor the plain law cannot bend to
    assert offset_gain(x, floored) > 2 and not offset_gain(x, pure) > 2
    assert np.isnan(offset_gain(x[:4], pure[:4]))
    # AICc against its definition, with the residuals of a numpy log-log fit
    b, a = np.polyfit(np.log(x), np.log(pure), 1)
    r = np.log(pure) - (a + b * np.log(x))
    rss = float(r @ r)
    assert aicc(rss, 8, 2) == pytest.approx(8 * np.log(rss / 8) + 4 + 12 / 5)
    tidy = pd.DataFrame({"kind": "attn_o", "depth": 0.0, "size": np.r_[x, x], "value": np.r_[floored, floored],
                         "quantile": 0.5})
    fits = ss.fit_scaling(tidy, "momentum_sv")
    assert fits["offset_gain"].iloc[0] == pytest.approx(offset_gain(x, floored))
