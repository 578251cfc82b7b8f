from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch

import spectralscope as ss
from spectralscope.cli import main


@pytest.mark.slow
def test_demo_end_to_end_at_a_tiny_setting(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    monkeypatch.setattr(logging.root, "handlers", [])  # as from the command line: no logging set up
    assert main(["demo", "--out", str(out), "--widths", "16", "24", "32", "40", "--depth", "2", "--steps", "24",
                 "--data", "pcfg", "--imbalance", "1.5"]) == 0
    said = capsys.readouterr()
    text = said.out
    # the run's warnings and alerts are printed, each on a line of its own above the progress bar, not through it
    assert "spectralscope" in said.err and not re.search(r"[^\r\n]spectralscope", said.err)
    for opt in ("muon", "adamw", "normuon"):
        runs = sorted((out / opt).glob("w*.zarr"))
        assert [p.name for p in runs] == ["w16.zarr", "w24.zarr", "w32.zarr", "w40.zarr"]
        for p in runs:
            tree = ss.open_run(p)
            meta = tree.attrs["meta"]
            assert tree.attrs["status"] == "finished" and meta["data"] == "pcfg" and meta["optimizer"] == opt
            assert meta["imbalance"] == 1.5 and meta["sweep"] == "width"
            assert set(tree.children) == {"optimizer", "scalars", "activations", "gradients", "sharpness", "weights",
                                          "attention", "health"}
            assert tree["attention"].sizes["step"] == 6 and np.isfinite(tree["attention"]["attn_logit_max"]).all()
            assert tree["weights"].sizes["step"] == 6 and np.isfinite(tree["weights"]["weight_sv"].values).all()
            assert tree["optimizer"].sizes["step"] == 3 and tree["scalars"].sizes["step"] == 24
            assert np.isfinite(tree["sharpness"]["nds"].values).all()
            assert tree["sharpness"]["nds_within"].sizes["layer"] == 12  # per layer: the within/cross split
    # the learning rates are stated, the summary is short, and its exponents are the written tables'
    assert "muon lr 0.02, adamw lr 0.01, normuon lr 0.02" in text
    fits = pd.read_csv(out / "fits_act_hard_rank.csv").set_index(["optimizer", "kind"])
    line = next(ln.split() for ln in text.splitlines() if ln.split()[:1] == ["adamw"])
    assert float(line[7]) == pytest.approx(fits.loc[("adamw", "mlp_out"), "slope"], abs=0.006)  # hard β
    assert (out / "report.html").stat().st_size > 1e6 and (out / "runs.csv").exists()
    assert "Newton–Schulz steps for σ_0.5" in text and "hard rank β" in text
    back = next(ln for ln in text.splitlines() if ln.startswith("backtest (momentum σ"))
    assert all(re.search(rf"{o} ×[\d.]+/×[\d.]+/×[\d.]+, \d+% inside", back) for o in ("muon", "adamw", "normuon"))
    health = next(ln for ln in text.splitlines() if ln.startswith("health alerts"))
    assert all(f"{o}: " in health for o in ("muon", "adamw", "normuon")) and "critical" not in health
    done = re.search(r"demo done in (\d+) s wall time \(training (\d+) s; torch on (\d+) threads\)", text)
    assert done and int(done[1]) >= int(done[2]) and int(done[3]) == torch.get_num_threads()


@pytest.mark.slow
def test_demo_ffn_sweep_varies_the_ffn_width_at_a_fixed_width(tmp_path, capsys):
    out = tmp_path / "ffn"
    assert main(["demo", "--out", str(out), "--optimizers", "adamw", "muon", "--sweep", "ffn", "--width", "16",
                 "--ffn", "1", "2", "4", "--depth", "1", "--steps", "20"]) == 0
    text = capsys.readouterr().out
    for opt in ("adamw", "muon"):
        assert sorted(p.name for p in (out / opt).glob("*.zarr")) == ["ffn16.zarr", "ffn32.zarr", "ffn64.zarr"]
        tree = ss.open_run(out / opt / "ffn32.zarr")
        assert tree.attrs["meta"]["width"] == 16 and tree.attrs["meta"]["ffn_width"] == 32
        rows = dict(zip(tree["optimizer"]["layer"].values, tree["optimizer"]["rows"].values, strict=True))
        assert rows["transformer.h.0.mlp.c_fc.weight"] == 32
    assert "FFN widths [16, 32, 64] at width 16" in text and "~ ffn_width^β" in text
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["size"]) == [16, 32, 64, 16, 32, 64] and "normuon" not in text.split("full tables")[0]


def test_demo_bad_arguments_exit_2(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--widths", "16", "24"]) == 2
    assert "at least 3 sizes" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--data", str(tmp_path / "missing.txt")]) == 2
    assert main(["demo", "--out", str(tmp_path), "--optimizers", "muon", "sgd"]) == 2
    assert "--optimizers takes some of muon, adamw, normuon; got muon sgd" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--sweep", "ffn", "--ffn", "1", "2"]) == 2
    assert "--ffn needs at least 3 sizes" in capsys.readouterr().err
