from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import spectralscope as ss
from spectralscope.cli import main
from spectralscope.gpt import GPT, GPTConfig


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _check_against_store(acc: EventAccumulator, tree) -> int:
    checked = 0
    opt = tree["optimizer"].dataset
    for j, layer in enumerate(opt["layer"].values.tolist()):
        for q in (0.1, 0.5, 0.9):
            events = acc.Scalars(f"momentum_sv_q{q:g}/{layer}")
            assert [e.step for e in events] == opt["step"].values.tolist()
            np.testing.assert_allclose([e.value for e in events], opt["momentum_sv"].sel(quantile=q).values[:, j],
                                       rtol=1e-6)  # TensorBoard stores float32
            checked += len(events)
        for var in ("ns_fail_frac", "neuron_cv", "update_erank"):
            events = acc.Scalars(f"{var}/{layer}")
            np.testing.assert_allclose([e.value for e in events], opt[var].values[:, j], rtol=1e-6)
    act = tree["activations"].dataset
    for j, module in enumerate(act["module"].values.tolist()):
        events = acc.Scalars(f"act_hard_rank/{module}")
        np.testing.assert_allclose([e.value for e in events], act["act_hard_rank"].values[:, j], rtol=1e-6)
    if "weights" in tree.children:  # ‖W‖₂ = σ(W) at q = 1 (weight_alpha: NaN on these 16-wide layers, skipped)
        w = tree["weights"].dataset
        for j, layer in enumerate(w["layer"].values.tolist()):
            events = acc.Scalars(f"weight_sv_q1/{layer}")
            assert [e.step for e in events] == w["step"].values.tolist() == [0, 4, 8]
            np.testing.assert_allclose([e.value for e in events], w["weight_sv"].sel(quantile=1.0).values[:, j],
                                       rtol=1e-6)
    nds = acc.Scalars("nds")
    np.testing.assert_allclose([e.value for e in nds], tree["sharpness"]["nds"].values, rtol=1e-6)
    loss = acc.Scalars("scalars/loss")  # what rec.log recorded
    assert [e.step for e in loss] == tree["scalars"]["step"].values.tolist()
    np.testing.assert_allclose([e.value for e in loss], tree["scalars"]["loss"].values, rtol=1e-6)
    for tag in acc.Tags()["scalars"]:  # one event per (tag, step)
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    return checked


@pytest.mark.slow
def test_live_and_exported_tensorboard_equal_the_store(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=20, width=16, depth=2, heads=2, ctx=8))
    muon = torch.optim.Muon(model.hidden_matrices(), lr=0.02)
    batch = torch.randint(0, 20, (4, 9))
    # overhead=None: the budget would stretch the cadence on a busy machine, and this compares step for step
    with ss.watch(muon, model, tmp_path / "r.zarr", every=2, tensorboard=tmp_path / "tb", overhead=None,
                  activations=ss.ActivationSpectra(every=3), weights=ss.WeightSpectra(every=4),
                  sharpness=ss.Sharpness(lambda m, b: m.loss(b), batch, every=4)) as rec:
        for _ in range(9):
            loss = model.loss(torch.randint(0, 20, (4, 9)))
            loss.backward()
            muon.step()
            muon.zero_grad()
            rec.log(loss=loss)
    tree = ss.open_run(tmp_path / "r.zarr")
    live = _events(tmp_path / "tb")
    assert _check_against_store(live, tree) == 12 * 5 * 3
    # the custom-scalars layout: one multi-line chart per metric
    from tensorboard.plugins.custom_scalar import layout_pb2

    config = layout_pb2.Layout()
    config.ParseFromString(live.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in config.category for c in cat.chart}
    assert charts["momentum_sv_q0.5"] == [r"^momentum_sv_q0.5(/.*)?$"] and "nds" in charts and len(charts) == 11
    assert charts["scalars"] == [r"^scalars/.*$"]
    assert main(["export-tb", str(tmp_path / "r.zarr"), "--logdir", str(tmp_path / "tb2")]) == 0
    assert _check_against_store(_events(tmp_path / "tb2"), tree) == 12 * 5 * 3
    # exported again, and exported into the live run's folder: nothing is written twice
    assert main(["export-tb", str(tmp_path / "r.zarr"), "--logdir", str(tmp_path / "tb2")]) == 0
    assert main(["export-tb", str(tmp_path / "r.zarr"), "--logdir", str(tmp_path / "tb")]) == 0
    assert "wrote 0 scalars" in capsys.readouterr().out
    for logdir in ("tb", "tb2"):
        acc = _events(tmp_path / logdir)
        assert _check_against_store(acc, tree) == 12 * 5 * 3
        assert len(acc.Tensors("custom_scalars__config__")) == 1
    assert main(["export-tb", str(tmp_path / "none.zarr"), "--logdir", str(tmp_path / "tb3")]) == 2
