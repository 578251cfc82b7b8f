"""spectralscope.health and ``spectralscope doctor``: runs made to trip each rule raise exactly the expected alerts,
checked against the stored values with numpy; a healthy run raises none."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import spectralscope as ss
from spectralscope.cli import main
from spectralscope.doctor import alerts, recorded_events, replayed_events
from spectralscope.gpt import GPT, GPTConfig
from spectralscope.health import Finding, Rule


def _run(path, lr=0.02, steps=12, qk=1.0, ns_steps=5, edit=None, **kw) -> tuple[ss.Recorder, GPT]:
    """A one-block GPT trained with Muon, recorded every 2 steps; ``edit(model, step)`` runs before each step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=32, width=32, depth=1, heads=2, ctx=16))
    with torch.no_grad():
        for b in model.transformer["h"]:
            b.attn.q_proj.weight.mul_(qk)
            b.attn.k_proj.weight.mul_(qk)
    opt = torch.optim.Muon(model.hidden_matrices(), lr=lr, ns_steps=ns_steps)
    data = torch.randint(0, 32, (steps, 8, 17), generator=torch.Generator().manual_seed(1))
    options = {"every": 2, "background": False, "overhead": None, "activations": None, **kw}
    with ss.watch(opt, model, path, **options) as rec:
        for s in range(steps):
            if edit is not None:
                edit(model, s)
            loss = model.loss(data[s])
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss)
    return rec, model


def _alerts(path):
    frame, source = alerts(ss.open_run(path))
    assert source == "recorded"
    return frame


def test_a_healthy_run_raises_nothing_and_one_ns_step_raises_exactly_ns_undershoot(tmp_path, capsys):
    _run(tmp_path / "ok.zarr")
    assert len(_alerts(tmp_path / "ok.zarr")) == 0
    assert main(["doctor", str(tmp_path / "ok.zarr")]) == 0
    assert "healthy: no rule raised an alert" in capsys.readouterr().out
    rec, _ = _run(tmp_path / "ns1.zarr", ns_steps=1, steps=64)
    frame = _alerts(tmp_path / "ns1.zarr")
    assert set(frame["rule"]) == {"ns_undershoot"} and set(frame["severity"]) == {"warning"}
    ds = ss.open_run(tmp_path / "ns1.zarr")["optimizer"].dataset
    frac = ds["ns_fail_frac"].values
    for r in frame.itertuples():
        j = list(ds["layer"].values).index(r.layer)
        i = list(ds["step"].values).index(r.start)
        settled = np.median(frac[i - 2 : i + 1, j])  # the last 3 records, this one included
        assert settled > 0.5 and r.value == pytest.approx(settled, rel=1e-12)
        # it starts at the first record that finds it, from step 50 on (the burn-in)
        assert r.start == 50 or np.median(frac[i - 3 : i, j]) <= 0.5
        assert "raise ns_steps from 1 to" in r.message
    assert set(frame["layer"]) == {lay.name for lay in rec.layers if np.median(frac[-3:, [
        list(ds["layer"].values).index(lay.name)]]) > 0.5}
    assert main(["doctor", str(tmp_path / "ns1.zarr")]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "WARNING  ns_undershoot" in out and f"by rule: ns_undershoot ×{len(frame)} (warning)" in out


def test_a_too_large_learning_rate_raises_curvature_from_the_second_positive_probe(tmp_path):
    probe = torch.randint(0, 32, (12, 8, 17), generator=torch.Generator().manual_seed(1))[0]  # the first batch
    _run(tmp_path / "lr.zarr", lr=0.3, sharpness=ss.Sharpness(GPT.loss, probe, every=2))
    frame = _alerts(tmp_path / "lr.zarr")
    ds = ss.open_run(tmp_path / "lr.zarr")["sharpness"].dataset
    pos = ds["predicted_delta"].values > 0
    steps = ds["step"].values
    both = pos[1:] & pos[:-1]
    assert both.any(), "the run no longer overshoots: pick a larger lr"
    starts = [int(steps[i + 1]) for i in range(len(both)) if both[i] and (i == 0 or not both[i - 1])]
    assert list(frame["rule"]) == ["curvature"] * len(starts) and list(frame["start"]) == starts
    assert set(frame["layer"]) == {"*"} and "lower the learning rate" in frame["message"][0]


def test_a_scaled_up_qk_init_raises_critical_max_logits_and_doctor_fails(tmp_path, capsys):
    _run(tmp_path / "qk.zarr", qk=12.0, attention=ss.AttentionLogits(every=2))
    frame = _alerts(tmp_path / "qk.zarr")
    ds = ss.open_run(tmp_path / "qk.zarr")["attention"].dataset
    top = ds["attn_logit_max"].values
    over = {(f"{m}[head {h}]", int(ds["step"].values[np.argmax(top[:, j, h] > 100)]))
            for j, m in enumerate(ds["module"].values) for h in range(top.shape[2]) if (top[:, j, h] > 100).any()}
    assert over, "no head passed τ: scale the init up"
    critical = frame[frame["severity"] == "critical"]
    assert set(frame["rule"]) == {"attention_logit"}
    assert {(r.layer, r.start) for r in critical.itertuples()} == over
    assert main(["doctor", str(tmp_path / "qk.zarr")]) == 1
    assert "CRITICAL attention_logit" in capsys.readouterr().out and "MuonClip" in critical["message"].iloc[0]


def test_a_heavy_tailed_layer_raises_weight_alpha_on_that_layer_only(tmp_path):
    def heavy(model, step):
        if step == 0:  # an ESD λ = σ² with a Pareto tail of exponent 1.5: α < 2
            g = torch.Generator().manual_seed(3)
            w = model.transformer["h"][0].mlp.c_fc.weight
            u, _, v = torch.linalg.svd(torch.randn(w.shape, generator=g), full_matrices=False)
            lam = torch.rand(min(w.shape), generator=g, dtype=torch.float64) ** -2.0
            with torch.no_grad():
                w.copy_((u * (lam.sqrt() / lam.sqrt().max()).float()) @ v)

    _run(tmp_path / "ht.zarr", lr=1e-4, edit=heavy, weights=ss.WeightSpectra(every=2))
    frame = _alerts(tmp_path / "ht.zarr")
    alpha = ss.open_run(tmp_path / "ht.zarr")["weights"]["weight_alpha"]
    low = alpha.isel(step=0) < 2
    assert list(alpha["layer"].values[low.values]) == ["transformer.h.0.mlp.c_fc.weight"]
    assert list(frame["rule"]) == ["weight_alpha"] and list(frame["layer"]) == ["transformer.h.0.mlp.c_fc.weight"]
    assert frame["value"][0] == pytest.approx(float(alpha.isel(step=0).sel(layer="transformer.h.0.mlp.c_fc.weight")))


def test_a_weight_that_turns_infinite_raises_non_finite_at_that_step(tmp_path, capsys):
    def poison(model, step):
        if step == 5:
            with torch.no_grad():
                model.transformer["h"][0].attn.v_proj.weight[0, 0] = float("inf")

    _run(tmp_path / "inf.zarr", every=1, edit=poison)
    frame = _alerts(tmp_path / "inf.zarr")
    assert set(frame["rule"]) == {"non_finite"} and set(frame["severity"]) == {"critical"}
    assert frame["start"].min() == 5
    assert {"transformer.h.0.attn.v_proj.weight", "loss"} <= set(frame[frame["start"] == 5]["layer"])
    assert main(["doctor", str(tmp_path / "inf.zarr")]) == 1
    capsys.readouterr()


def test_a_weight_scaled_away_from_its_mup_size_raises_mup_drift_until_it_is_back(tmp_path):
    def scale(model, step):
        w = model.transformer["h"][0].mlp.c_proj.weight
        with torch.no_grad():
            if step == 4:
                w.mul_(10.0)
            if step == 8:
                w.div_(10.0)

    _run(tmp_path / "mup.zarr", lr=1e-4, edit=scale)
    frame = _alerts(tmp_path / "mup.zarr")
    assert list(frame["rule"]) == ["mup_drift"] and list(frame["layer"]) == ["transformer.h.0.mlp.c_proj.weight"]
    assert (frame["start"][0], frame["end"][0]) == (4, 8) and frame["severity"][0] == "info"
    ds = ss.open_run(tmp_path / "mup.zarr")["optimizer"].dataset.sel(layer="transformer.h.0.mlp.c_proj.weight")
    ratio = float(ds["weight_spectral_norm"].sel(step=4)) / np.sqrt(int(ds["rows"]) / int(ds["cols"]))
    assert frame["value"][0] == pytest.approx(ratio, rel=1e-12)


def test_a_resumed_run_ends_the_alert_it_left_open_instead_of_starting_it_again(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=32, width=32, depth=1, heads=2, ctx=16))
    opt = torch.optim.Muon(model.hidden_matrices(), lr=1e-4)
    data = torch.randint(0, 32, (12, 8, 17), generator=torch.Generator().manual_seed(1))
    w = model.transformer["h"][0].mlp.c_proj.weight
    path = tmp_path / "resumed.zarr"
    for steps, resume in ((range(0, 6), False), (range(6, 12), True)):  # ×10 at step 4, back at step 8
        with ss.watch(opt, model, path, every=2, background=False, overhead=None, activations=None, resume=resume):
            for s in steps:
                with torch.no_grad():
                    w.mul_(10.0 if s == 4 else 0.1 if s == 8 else 1.0)
                model.loss(data[s]).backward()
                opt.step()
                opt.zero_grad()
    frame = _alerts(path)
    assert list(frame["rule"]) == ["mup_drift"] and (frame["start"][0], frame["end"][0]) == (4, 8)
    states = [e["state"] for e in recorded_events(ss.open_run(path))]
    assert states == ["start", "end"]


def test_user_rules_are_recorded_and_a_failing_rule_is_said_once(tmp_path, caplog):
    def loss_above_three(record):
        if record.group == "scalars" and record.row["loss"] > 3:
            yield Finding("*", record.row["loss"], "warning", "loss above 3")

    def broken(record):
        raise RuntimeError("oops")

    with caplog.at_level(logging.WARNING, "spectralscope"):
        _run(tmp_path / "user.zarr", health=[loss_above_three, Rule("broken", ("optimizer",), broken)])
    frame = _alerts(tmp_path / "user.zarr")
    losses = ss.open_run(tmp_path / "user.zarr")["scalars"]["loss"].values
    assert list(frame["rule"]) == ["loss_above_three"] and frame["start"][0] == int(np.argmax(losses > 3))
    assert caplog.text.count("health rule broken failed") == 1
    assert "rule broken failed" in ss.open_run(tmp_path / "user.zarr").attrs["notes"]["health"]
    with pytest.raises(ValueError, match="health"):
        _run(tmp_path / "bad.zarr", health=["not a rule"])


def test_log_lines_say_each_alert_start_and_end(tmp_path, caplog):
    def scale(model, step):
        w = model.transformer["h"][0].mlp.c_proj.weight
        with torch.no_grad():
            w.mul_(10.0 if step == 4 else 0.1 if step == 8 else 1.0)

    with caplog.at_level(logging.INFO, "spectralscope"):
        _run(tmp_path / "log.zarr", lr=1e-4, edit=scale)
    lines = [r.getMessage() for r in caplog.records if "health:" in r.getMessage()]
    assert len(lines) == 2
    assert "mup_drift started transformer.h.0.mlp.c_proj.weight at step 4" in lines[0]
    assert "mup_drift ended transformer.h.0.mlp.c_proj.weight at step 8" in lines[1]


def test_doctor_replays_the_rules_over_a_run_recorded_without_them(tmp_path, capsys):
    _run(tmp_path / "on.zarr", ns_steps=1, qk=12.0, steps=56, attention=ss.AttentionLogits(every=2))
    _run(tmp_path / "off.zarr", ns_steps=1, qk=12.0, steps=56, attention=ss.AttentionLogits(every=2), health=None)
    on, off = ss.open_run(tmp_path / "on.zarr"), ss.open_run(tmp_path / "off.zarr")
    assert "health" not in off.children
    key = ("step", "rule", "group", "layer", "state", "severity")
    recorded = [tuple(e[k] for k in key) for e in recorded_events(on)]
    assert recorded and recorded == [tuple(e[k] for k in key) for e in replayed_events(off)]
    assert main(["doctor", str(tmp_path / "off.zarr")]) == 1
    assert "replayed now over its stored records" in capsys.readouterr().out
    assert main(["doctor", str(tmp_path / "missing.zarr")]) == 2


@pytest.mark.slow
def test_the_demo_runs_raise_no_critical_alert(optimizer_sweep, capsys):
    for run in optimizer_sweep:
        tree = ss.open_run(run)
        frame, source = alerts(tree)
        assert source == "recorded" and "critical" not in set(frame["severity"]), (run, frame)
        assert main(["doctor", run]) == 0
        key = ("step", "rule", "layer", "state")
        assert [tuple(e[k] for k in key) for e in recorded_events(tree)] == \
               [tuple(e[k] for k in key) for e in replayed_events(tree)], run
    capsys.readouterr()


def test_max_logits_growing_fourfold_from_above_ten_warn_and_early_sharpening_does_not():
    from spectralscope.health import Record, attention_logit

    def found(series):
        rows = [{"attn_logit_max": np.array([[v]])} for v in series]
        rec = Record("attention", 6, rows[-1], ["h.0.attn"], (), rows[:-1])
        return [(f.layer, f.severity) for f in attention_logit(rec)]

    assert found([12, 20, 35, 60]) == [("h.0.attn[head 0]", "warning")]
    assert found([1.5, 5, 9, 12]) == []  # attention sharpening from its O(1) start
    assert found([12, 11, 30, 60]) == []  # not monotonic
    assert found([30, 40, 50, 60]) == []  # ×2, not ×4
    assert found([12, 20, 35, 101]) == [("h.0.attn[head 0]", "critical")]  # over τ: critical, not both
