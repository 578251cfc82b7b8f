from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import spectralscope as ss
from spectralscope.cli import main


@pytest.mark.slow
def test_demo_end_to_end_at_a_tiny_setting(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--widths", "16", "24", "32", "--depth", "2", "--steps", "24",
                 "--data", "pcfg", "--imbalance", "1.5"]) == 0
    text = capsys.readouterr().out
    runs = sorted(out.glob("w*.zarr"))
    assert [p.name for p in runs] == ["w16.zarr", "w24.zarr", "w32.zarr"]
    for p in runs:
        tree = ss.open_run(p)
        assert tree.attrs["status"] == "finished" and tree.attrs["meta"]["data"] == "pcfg"
        assert tree.attrs["meta"]["imbalance"] == 1.5
        assert set(tree.children) == {"optimizer", "scalars", "activations", "gradients", "sharpness"}
        assert tree["optimizer"].sizes["step"] == 3 and tree["scalars"].sizes["step"] == 24
        assert np.isfinite(tree["sharpness"]["nds"].values).all()
    # the printed fit table is the one fit_scaling gives on these stores
    fits = ss.fit_scaling([str(p) for p in runs], metric="momentum_sv", quantile=0.5)
    row = fits.set_index("group").loc["attn_o@1"]
    line = next(ln.split() for ln in text.splitlines() if ln.split()[:4] == ["attn_o", "1", "attn_o@1", "0.5"])
    assert float(line[4]) == pytest.approx(row["slope"], rel=1e-3)
    assert "Newton–Schulz steps needed at" in text and "activation hard rank" in text
    done = re.search(r"demo done in (\d+) s wall time \(training (\d+) s; torch on (\d+) threads\)", text)
    assert done and int(done[1]) >= int(done[2]) and int(done[3]) == torch.get_num_threads()


def test_demo_bad_arguments_exit_2(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--widths", "16", "24"]) == 2
    assert "at least 3 sizes" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--data", str(tmp_path / "missing.txt")]) == 2
