"""Every page of the Streamlit app under `streamlit.testing.v1.AppTest`, on a folder with finished, live and
broken runs."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from dashboard_runs import broken_stores, finished_run, start_run
from streamlit.testing.v1 import AppTest

import spectralscope as ss
import spectralscope.dashboards as dashboards

APP = str(Path(dashboards.__file__).parent / "app.py")
PAGES = ["views/overview.py", "views/optimizer.py", "views/newton_schulz.py", "views/updates.py", "views/scalars.py",
         "views/activations.py", "views/gradients.py", "views/sharpness.py", "views/scaling.py"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for w in (8, 12, 16):
        finished_run(root / f"w{w}.zarr", w)
    rec, step = start_run(root / "live.zarr", 12, flush_seconds=0.1)
    for _ in range(6):
        step()
    rec.flush()
    problems = broken_stores(root)
    yield root, problems
    rec.close()


def _app(monkeypatch, root) -> AppTest:
    monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", str(root))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {"dtype", "bdata"} (base64)."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(float)
    return np.asarray(value, dtype=float)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "live.zarr" not in p.parts}


def test_every_page_renders_charts_without_exceptions_and_never_writes(monkeypatch, folder):
    root, _ = folder
    before = _digest(root)
    at = _app(monkeypatch, root)
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        figs = _figures(at)
        assert figs, f"{page} drew no chart"
        assert any(trace.get("x") is not None or trace.get("z") is not None for fig in figs for trace in fig["data"]), page
        # these runs hold every variable their pages read: no note may say otherwise
        assert not [c.value for c in at.caption if "this store has no" in c.value], page
    assert _digest(root) == before


def test_overview_lists_runs_and_problems(monkeypatch, folder):
    root, problems = folder
    at = _app(monkeypatch, root)
    text = " ".join(t.value.reset_index().to_csv() for t in at.table)
    for rel in ("w8.zarr", "w12.zarr", "w16.zarr", "live.zarr", *problems):
        assert rel in text, rel
    assert "running" in text and "finished" in text
    for word in problems.values():
        assert word in text, word


def test_changing_the_quantile_changes_the_heatmap(monkeypatch, folder):
    root, _ = folder
    at = _app(monkeypatch, root)
    at.switch_page("views/optimizer.py").run()
    heat = next(f for f in _figures(at) if f["data"][0]["type"] == "heatmap")
    assert "q=0.5" in heat["layout"]["title"]["text"]
    assert heat["layout"]["yaxis"].get("type") in (None, "category")  # layer names: a forced linear axis draws nothing
    at.selectbox(key="opt-quantile").select(0.9).run()
    heat2 = next(f for f in _figures(at) if f["data"][0]["type"] == "heatmap")
    assert "q=0.9" in heat2["layout"]["title"]["text"]
    assert heat2["data"][0]["customdata"] != heat["data"][0]["customdata"]
    lines = next(f for f in _figures(at) if "per layer" in f["layout"]["title"]["text"])
    assert lines["layout"]["yaxis"]["type"] == "log"
    assert any("NS threshold" in str(a.get("text")) for a in lines["layout"].get("annotations", []))
    assert all("step" in t["hovertemplate"] and "layer" in t["hovertemplate"] for t in lines["data"])


def test_scaling_page_fits_and_recommends(monkeypatch, folder):
    root, _ = folder
    at = _app(monkeypatch, root)
    at.switch_page("views/scaling.py").run()
    assert not at.exception
    fig = _figures(at)[0]
    assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["yaxis"]["type"] == "log"
    # by default the shallowest and deepest group of each kind, at most 8
    assert at.multiselect(key="sc-groups").value == ["attn_k@0", "attn_k@1", "attn_o@0", "attn_o@1", "attn_q@0",
                                                     "attn_q@1", "attn_v@0", "attn_v@1"]
    tables = [t.value for t in at.dataframe]
    assert any("slope" in t.columns for t in tables) and any("ns_steps" in t.columns for t in tables)
    at.selectbox(key="sc-metric").select("act_hard_rank").run()
    assert not at.exception
    fig2 = _figures(at)[0]
    assert "act_hard_rank" in fig2["layout"]["title"]["text"]
    assert fig2["data"][0]["y"] != fig["data"][0]["y"]  # other values, not just another title


def test_empty_folder_says_so(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path)
    assert any("No runs" in str(i.value) or "No spectralscope runs" in str(i.value) for i in at.info)
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, page


def test_paths_outside_the_folder_are_refused(monkeypatch, folder):
    root, _ = folder
    monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", str(root))
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = ["../../etc", "w8.zarr"]
    at.run()
    assert not at.exception
    assert any("outside the runs folder" in str(e.value) for e in at.error)


def test_spectra_overlay_every_run_at_its_nearest_recorded_step(monkeypatch, folder):
    # The live run has recorded fewer steps than the finished ones; a step chosen from one run is drawn at
    # the nearest committed step of each, and the default modules are of different kinds.
    root, _ = folder
    monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", str(root))
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = ["w16.zarr", "live.zarr"]  # steps offered from w16: 0 … 12; live stops at 4
    at.run()
    at.switch_page("views/activations.py").run()
    assert not at.exception
    assert at.multiselect(key="act-steps").value == [0, 12]
    spectra = next(f for f in _figures(at) if "covariance spectrum" in f["layout"]["title"]["text"])
    names = [t["name"] for t in spectra["data"]]
    assert any("w16.zarr · step 12" in n for n in names)
    assert any("live.zarr · step 4" in n for n in names)  # its nearest committed step to 12
    modules = at.multiselect(key="activations-modules").value
    assert not any(m.endswith(("k_proj", "v_proj")) for m in modules) and len(modules) == 3


def test_estimated_layers_are_labelled_and_drawn_with_their_bounds(monkeypatch, tmp_path):
    """A run whose layers were measured by SLQ (exact_max=8, sv_method="slq"): the momentum, σ(O) and σ(ΔW)
    lines say "(estimated)" and carry the stored bounds as error bars, equal to the store's *_sv_err."""
    import xarray as xr

    path = finished_run(tmp_path / "slq.zarr", 16, exact_max=8, sv_method="slq")
    stored = xr.open_zarr(path, group="optimizer", consolidated=False)
    at = _app(monkeypatch, tmp_path)
    for page, var, title in (("views/optimizer.py", "momentum_sv", "momentum σ̃ at q=0.5 per layer"),
                             ("views/newton_schulz.py", "ns_out_sv", "σ(O) at q=0"),
                             ("views/updates.py", "update_sv", "σ(ΔW) at q=0.1")):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        fig = next(f for f in _figures(at) if f["layout"]["title"]["text"].startswith(title))
        q = float(title.split("q=")[1].split()[0])
        err = stored[f"{var}_err"].sel(quantile=q, method="nearest")
        layer0 = str(stored["layer"].values[0])
        trace = next(t for t in fig["data"] if t["name"].startswith(layer0 + " (estimated)"))
        drawn = _array(trace["error_y"]["array"])
        np.testing.assert_allclose(drawn, err.isel(layer=0).values, rtol=1e-12)
        assert (drawn > 0).all()


# ---- runs unlike each other, runs not yet committed, and what a page offers ------------------------------------
def _mlp_run(path: Path, steps: int = 6, flush_seconds: float = 5.0, close: bool = True):
    """A run of another architecture (layer names 0.weight, 2.weight): nothing in common with the GPTs'."""
    import torch
    from torch import nn

    import spectralscope as ss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = ss.watch(opt, model, path, overhead=None, every=1, flush_seconds=flush_seconds, background=False)
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec.log(loss=loss)
    if close:
        rec.close()
    return rec


def test_layers_are_chosen_by_name_across_runs_of_other_models(monkeypatch, tmp_path):
    finished_run(tmp_path / "gpt.zarr", 8, steps=8)
    _mlp_run(tmp_path / "mlp.zarr")
    monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = ["gpt.zarr", "mlp.zarr"]
    at.run()
    at.switch_page("views/updates.py").run()
    assert not at.exception
    picker = at.multiselect(key="optimizer-layers")
    assert "2.weight" in picker.options and "transformer.h.0.attn.q_proj.weight" in picker.options
    picker.set_value(["2.weight", "transformer.h.0.attn.q_proj.weight"]).run()
    assert not at.exception
    fig = next(f for f in _figures(at) if "neuron balance" in f["layout"]["title"]["text"])
    names = sorted(t["name"] for t in fig["data"])
    assert names == ["2.weight · mlp.zarr", "transformer.h.0.attn.q_proj.weight · gpt.zarr"]  # each run its own layer
    from spectralscope.dashboards import data

    stored = data.read(tmp_path / "mlp.zarr", "optimizer", "neuron_cv")
    trace = next(t for t in fig["data"] if t["name"].startswith("2.weight"))
    np.testing.assert_allclose(_array(trace["y"]), stored.sel(layer="2.weight").values)


def test_a_run_with_no_committed_rows_blanks_no_page(monkeypatch, tmp_path):
    for w in (8, 12, 16):
        finished_run(tmp_path / f"w{w}.zarr", w, steps=8)
    fresh = _mlp_run(tmp_path / "fresh.zarr", steps=0, flush_seconds=3600, close=False)  # laid out, no rows yet
    try:
        monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", str(tmp_path))
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params["run"] = ["fresh.zarr", "w8.zarr", "w12.zarr", "w16.zarr"]  # the empty one first
        at.run()
        for page in PAGES[1:] + ["views/scalars.py"]:
            at.switch_page(page).run()
            assert not at.exception, (page, at.exception)
            figs = _figures(at)
            assert figs and any(t.get("x") is not None or t.get("z") is not None for f in figs for t in f["data"]), page
    finally:
        fresh.close()


def test_the_scalars_page_draws_what_rec_log_recorded(monkeypatch, tmp_path):
    finished_run(tmp_path / "w8.zarr", 8, steps=10)
    _mlp_run(tmp_path / "mlp.zarr", steps=7)
    at = _app(monkeypatch, tmp_path)
    at.switch_page("views/scalars.py").run()
    assert not at.exception
    assert at.multiselect(key="sc-names").value == ["loss"]
    fig = _figures(at)[0]
    from spectralscope.dashboards import data

    for run in ("w8.zarr", "mlp.zarr"):
        trace = next(t for t in fig["data"] if t["name"] == run)
        stored = data.read(tmp_path / run, "scalars", "loss")
        np.testing.assert_allclose(_array(trace["y"]), stored.values)
        np.testing.assert_array_equal(_array(trace["x"]), stored["step"].values)
    at.slider(key="sc-smooth").set_value(3).run()
    assert "moving average of 3" in _figures(at)[0]["layout"]["title"]["text"]


def test_the_default_selection_is_the_newest_eight_runs(monkeypatch, tmp_path):
    from workers import expected, group_spec

    from spectralscope.store import RunWriter

    for i in range(11):
        w = RunWriter(tmp_path / f"r{i:02d}.zarr", [group_spec()],
                      {"name": f"r{i}", "model_size": 100 + i, "created": f"2026-11-{10 + i}T00:00:00+00:00"})
        w.append("optimizer", 0, expected(0))
        w.close()
    at = _app(monkeypatch, tmp_path)
    assert at.multiselect(key="runs").value == [f"r{i:02d}.zarr" for i in range(3, 11)]


def test_a_store_missing_a_variable_says_so_in_a_line(monkeypatch, tmp_path):
    import shutil

    path = finished_run(tmp_path / "w8.zarr", 8, steps=8)
    shutil.rmtree(path / "optimizer" / "ns_fail_frac")
    at = _app(monkeypatch, tmp_path)
    at.switch_page("views/optimizer.py").run()
    assert not at.exception
    assert any("w8.zarr: this store has no optimizer/ns_fail_frac" in c.value for c in at.caption)


def test_sharpness_offers_a_log_axis_and_log_ticks_stay_readable(monkeypatch, folder):
    root, _ = folder
    at = _app(monkeypatch, root)
    at.switch_page("views/sharpness.py").run()
    nds = next(f for f in _figures(at) if "normalised directional sharpness" in f["layout"]["title"]["text"])
    assert nds["layout"]["yaxis"].get("type") in (None, "linear", "-")
    at.toggle(key="sh-log").set_value(True).run()
    assert not at.exception
    nds = next(f for f in _figures(at) if "normalised directional sharpness" in f["layout"]["title"]["text"])
    assert nds["layout"]["yaxis"]["type"] == "log"
    # every log axis of the pages goes through charts.log_ticks: 10ⁿ per decade, or plain numbers within one
    at.switch_page("views/optimizer.py").run()
    lines = next(f for f in _figures(at) if "per layer" in f["layout"]["title"]["text"])
    axis = lines["layout"]["yaxis"]
    values = np.concatenate([_array(t["y"]) for t in lines["data"]])
    values = values[np.isfinite(values) & (values > 0)]
    if np.log10(values.max() / values.min()) >= 1:
        assert axis["type"] == "log" and axis["dtick"] == 1 and axis["exponentformat"] == "power"
    else:
        assert axis["type"] == "log" and axis["tickformat"] == ".3~g"


def test_log_ticks_within_a_decade_are_plain_numbers():
    import plotly.graph_objects as go

    from spectralscope.dashboards import charts

    narrow = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.3, 0.5, 0.9]))
    wide = go.Figure(go.Scatter(x=[0, 1, 2], y=[1e-4, 1e-2, 0.9]))
    assert charts.log_ticks(narrow, "y") == {"tickformat": ".3~g"}
    assert charts.log_ticks(wide, "y")["dtick"] == 1


def test_the_scaling_page_fits_unlike_optimizers_apart_and_says_so(monkeypatch, tmp_path):
    from test_fit import _write_run

    layers = [("h.1.attn.o_proj.weight", "attn_o", 1.0)]
    for size in (1e6, 4e6, 1.6e7):
        _write_run(tmp_path / f"muon{int(size)}.zarr", size, layers, lambda k, d, q, n: q * n ** -0.5)
        _write_run(tmp_path / f"adamw{int(size)}.zarr", size, layers, lambda k, d, q, n: q * n ** -0.1,
                   optimizer="torch.optim.AdamW")
    monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = sorted(p.name for p in tmp_path.glob("*.zarr"))
    at.run()
    at.switch_page("views/scaling.py").run()
    assert not at.exception
    assert any("fitted separately by optimizer" in str(i.value) for i in at.info)
    assert sorted(at.multiselect(key="sc-groups").value) == ["AdamW/attn_o@1", "Muon/attn_o@1"]


def test_the_compare_page_draws_the_reports_figures_coloured_by_optimizer(monkeypatch, optimizer_sweep):
    from spectralscope.report import COLOURS

    root = Path(optimizer_sweep[0]).parents[1]
    at = _app(monkeypatch, root)
    at.multiselect(key="runs").set_value(sorted(str(Path(p).relative_to(root)) for p in optimizer_sweep)).run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    figs = _figures(at)
    assert len(figs) == 6  # the report's four, and two of the token-frequency buckets the demo records
    assert [a["text"] for a in figs[5]["layout"]["annotations"]] == ["head", "mid", "tail"]
    named = {t["name"]: t["marker"]["color"] for t in figs[0]["data"] if t.get("mode") == "markers" and t.get("name")}
    assert named == {o: COLOURS[o] for o in ("muon", "adamw", "normuon")}
    tables = [t.value for t in at.dataframe]
    assert any("momentum σ q0.5 β" in t.columns for t in tables)
    runs = next(t for t in tables if "update_isotropy" in t.columns)
    assert len(runs) == 9 and set(runs["optimizer"]) == {"muon", "adamw", "normuon"}


def test_the_activations_page_offers_the_recorded_buckets(monkeypatch, optimizer_sweep):
    root = Path(optimizer_sweep[0]).parents[1]
    at = _app(monkeypatch, root)
    at.multiselect(key="runs").set_value(["muon/w32.zarr"]).run()
    at.switch_page("views/activations.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="act-bucket").options == ["all", "head", "mid", "tail"]
    def hard(figs):
        return next(f for f in figs if f["layout"]["title"]["text"].startswith("hard rank"))["data"][0]["y"]

    before = hard(_figures(at))
    at.selectbox(key="act-bucket").select("tail").run()
    assert not at.exception
    tail = ss.open_run(optimizer_sweep[2])["activations"]["act_hard_rank"].sel(bucket="tail")
    after = _array(hard(_figures(at)))
    assert not np.allclose(after, _array(before))
    assert any(np.allclose(after, tail.isel(module=j).values) for j in range(tail.sizes["module"]))


def test_the_mup_ratios_are_drawn_per_layer_and_fitted_against_width_with_holds(monkeypatch, optimizer_sweep):
    root = Path(optimizer_sweep[0]).parents[1]
    at = _app(monkeypatch, root)
    muon = sorted(str(Path(p).relative_to(root)) for p in optimizer_sweep if "/muon/" in str(p))
    at.multiselect(key="runs").set_value(muon).run()
    at.switch_page("views/updates.py").run()
    assert not at.exception, at.exception
    fig = next(f for f in _figures(at) if "‖ΔW‖₂ · sqrt(cols/rows)" in f["layout"]["title"]["text"])
    ds = ss.open_run(optimizer_sweep[2])["optimizer"].dataset  # muon w32
    ref = ds["update_sv"].sel(quantile=1.0).values * np.sqrt(ds["cols"].values / ds["rows"].values)
    traces = [t for t in fig["data"] if t["name"].endswith("muon/w32.zarr")]
    assert traces and all(any(np.allclose(_array(t["y"]), ref[:, j], rtol=1e-12, equal_nan=True)
                              for j in range(ref.shape[1])) for t in traces)
    at.switch_page("views/scaling.py").run()
    at.selectbox(key="sc-metric").select("mup_update_ratio").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="sc-against-mup").value == "width"
    fig = _figures(at)[0]
    assert fig["layout"]["xaxis"]["title"]["text"] == "width"
    table = next(t.value for t in at.dataframe if "holds" in t.value.columns)
    ref = ss.fit_scaling(optimizer_sweep[:3], "mup_update_ratio", size="width")
    np.testing.assert_allclose(sorted(table["slope"]), sorted(ref["slope"]), rtol=1e-9)
    assert list(table["holds"]) == [bool(lo <= 0 <= hi) for lo, hi in zip(table["ci_low"], table["ci_high"],
                                                                           strict=True)]
    assert any("μP spectral condition" in c.value for c in at.caption)


def test_the_health_page_draws_each_alert_and_the_runs_page_shows_badges(monkeypatch, tmp_path):
    from test_health import _run

    from spectralscope.health import spans

    _run(tmp_path / "qk.zarr", qk=12.0, attention=ss.AttentionLogits(every=2))
    _run(tmp_path / "ok.zarr")
    _run(tmp_path / "off.zarr", health=None)
    at = _app(monkeypatch, tmp_path)
    table = next(t.value for t in at.table if "health" in t.value.columns)
    assert table.loc["ok.zarr", "health"] == "✅ healthy" and table.loc["off.zarr", "health"] == "not recorded"
    assert table.loc["qk.zarr", "health"].startswith("🔴")
    at.multiselect(key="runs").set_value(["qk.zarr", "off.zarr"]).run()
    at.switch_page("views/health.py").run()
    assert not at.exception, at.exception
    figs = _figures(at)
    timeline = next(f for f in figs if f["layout"]["title"]["text"].startswith("health alerts"))
    from spectralscope.dashboards import data

    expected = spans(data.health_events(tmp_path / "qk.zarr"))
    assert len(timeline["data"]) == len(expected) > 0
    for trace, s in zip(timeline["data"], expected, strict=True):
        assert trace["x"][0] == s["start"] and trace["y"][0] == f"{s['rule']} · {s['layer']}"
        assert trace["line"]["color"] == {"critical": "#d62728", "warning": "#ff7f0e"}[s["severity"]]
    rows = next(t.value for t in at.dataframe if "message" in t.value.columns)
    assert len(rows) == len(expected) and "MuonClip" in " ".join(rows["message"])
    logits = next(f for f in figs if f["layout"]["title"]["text"].startswith("max attention logit"))
    stored = ss.open_run(tmp_path / "qk.zarr")["attention"]["attn_logit_max"].max("head")
    assert any(np.allclose(_array(t["y"]), stored.isel(module=0).values) for t in logits["data"])
    assert any("τ = 100" in str(a.get("text")) for a in logits["layout"].get("annotations", []))
    assert any("recorded without health rules" in c.value for c in at.caption)


def test_the_per_layer_lines_mark_where_each_series_settled(monkeypatch, tmp_path):
    from test_fit import _write_series

    from spectralscope.settle import settled_from

    def series(depth, n, step):  # depth 0 settles after a transient; depth 1 still grows at the end
        return n ** -0.5 * ((1 + 3 * np.exp(-step / 4.0)) if depth == 0 else np.exp(step / 10.0))

    _write_series(tmp_path / "s.zarr", 1e6, series)
    at = _app(monkeypatch, tmp_path)
    at.switch_page("views/optimizer.py").run()
    assert not at.exception, at.exception
    lines = next(f for f in _figures(at) if "per layer" in f["layout"]["title"]["text"])
    marks = [t for t in lines["data"] if t["name"].startswith("settled · ")]
    sv = ss.open_run(tmp_path / "s.zarr")["optimizer"]["momentum_sv"].sel(quantile=0.5)
    start = settled_from(sv.isel(layer=0).values).start
    assert [t["name"] for t in marks] == ["settled · h.0.attn.o_proj.weight · s.zarr"]  # not the one still moving
    assert marks[0]["x"] == [int(sv["step"].values[start])] and "settled from step" in marks[0]["hovertemplate"]
