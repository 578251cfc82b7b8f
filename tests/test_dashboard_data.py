from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from dashboard_runs import broken_stores, finished_run

import spectralscope as ss
from spectralscope.dashboards import data
from spectralscope.fit import settled_values


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "sweep").mkdir()
    for w in (8, 12, 16):
        finished_run(root / "sweep" / f"w{w}.zarr", w)
    problems = broken_stores(root)
    return root, problems


def test_find_runs_lists_runs_and_says_what_is_wrong_with_the_rest(runs):
    root, problems = runs
    entries = {e.rel: e for e in data.find_runs(root)}
    assert {r for r, e in entries.items() if e.ok} == {"sweep/w8.zarr", "sweep/w12.zarr", "sweep/w16.zarr"}
    for rel, word in problems.items():
        assert not entries[rel].ok and word in entries[rel].problem, (rel, entries[rel].problem)
    assert entries["sweep/w8.zarr"].attrs["meta"] == {"width": 8}


def test_find_runs_on_an_empty_or_missing_folder(tmp_path):
    assert data.find_runs(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.find_runs(tmp_path / "nope")


def test_resolve_refuses_paths_outside_the_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "outside.zarr").mkdir()
    (tmp_path / "runs" / "link.zarr").symlink_to(tmp_path / "outside.zarr")
    assert data.resolve(tmp_path / "runs", "a/b.zarr") == (tmp_path / "runs" / "a" / "b.zarr").resolve()
    for bad in ("../outside.zarr", str(tmp_path / "outside.zarr"), "link.zarr", "a/../../outside.zarr"):
        with pytest.raises(ValueError, match="outside the runs folder"):
            data.resolve(tmp_path / "runs", bad)


def test_read_slices_equal_the_same_slices_through_xarray(runs):
    root, _ = runs
    path = root / "sweep" / "w12.zarr"
    ref = ss.open_run(path)["optimizer"].dataset
    full = data.read(path, "optimizer", "momentum_sv")
    xr.testing.assert_equal(full.drop_vars(["rows", "cols"]), ref["momentum_sv"].drop_vars(["rows", "cols"]))
    half = data.read(path, "optimizer", "update_rms", window=(0.5, 1.0), units=[1, 3])
    n = ref.sizes["step"]
    np.testing.assert_array_equal(half.values, ref["update_rms"].isel(step=slice(n // 2, n), layer=[1, 3]).values)
    assert list(half["layer"].values) == list(ref["layer"].values[[1, 3]])
    q = data.read(path, "optimizer", "momentum_sv", quantile=0.9, max_steps=3)
    assert q.dims == ("step", "layer") and q.sizes["step"] == 3
    np.testing.assert_array_equal(q.values, ref["momentum_sv"].sel(quantile=0.9).values[:: -(-n // 3)])
    at = data.read(path, "activations", "act_eig", at_steps=[0, 4])
    np.testing.assert_array_equal(at["step"].values, [0, 4])
    assert data.read(path, "optimizer", "no_such_variable") is None
    assert data.read(path, "no_such_group", "x") is None
    assert list(data.steps(path, "gradients")) == list(ss.open_run(path)["gradients"]["step"].values)


def test_overview_and_settled_values(runs):
    root, _ = runs
    entries = [e for e in data.find_runs(root) if e.ok]
    frame = data.overview(entries)
    assert list(frame["run"]) == [e.rel for e in entries]
    assert (frame["status"] == "finished").all() and (frame["steps"] == 16).all()
    assert frame["model_size"].nunique() == 3 and (frame["nan_values"] >= 0).all()
    tidy, skipped = data.settled(entries, "momentum_sv", "optimizer", 0.5)
    assert skipped == []
    # the same numbers as the library's own settled values
    for e in entries:
        ref = settled_values(ss.open_run(e.path), "momentum_sv", 0.5)
        got = tidy[tidy["run"] == e.rel].sort_values("layer")
        np.testing.assert_allclose(got["value"].to_numpy(), ref.sort_values("layer")["value"].to_numpy(), rtol=1e-12)
    fits = ss.fit_scaling(tidy, metric="momentum_sv", quantile=0.5)
    assert set(fits["n_sizes"]) == {3}
