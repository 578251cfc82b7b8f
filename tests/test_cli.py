from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import spectralscope as ss
from spectralscope.cli import main


def _run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4))
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    path = tmp_path / "w24.zarr"
    with ss.watch(opt, model, path, every=5, meta={"width": 24}) as rec:
        for _ in range(12):
            loss = model(torch.randn(16, 8)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss)
    return path


def test_info_prints_attributes_layers_steps_and_last_values(tmp_path, capsys):
    path = _run(tmp_path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    ds = ss.open_run(path)["optimizer"].dataset
    assert "status     finished" in out and '"width": 24' in out and '"class": "torch.optim.Muon"' in out
    assert "[optimizer] 3 rows, steps 0..10" in out and "[scalars] 12 rows, steps 0..11" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("0.weight", "2.weight"))}
    assert lines["0.weight"][1:4] == ["other", "NaN", "24x8"]
    assert lines["2.weight"][3] == "4x24"
    last = float(ds["momentum_sv"].sel(quantile=0.5).values[-1, 0])
    assert float(lines["0.weight"][4]) == float(f"{last:.4g}")
    assert lines["0.weight"][-1] == "exact" and lines["2.weight"][-1] == "exact"  # the spectra column
    # activation spectra (on by default, recorded at step 0): one row per module with its last values
    act = ss.open_run(path)["activations"].dataset
    assert "[activations] last recorded step 0" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["0", "other"])
    header = next(line.split() for line in out.splitlines() if line.split()[:2] == ["module", "kind"])
    hard = float(act["act_hard_rank"].values[-1, 0])
    assert float(row[header.index("act_hard_rank")]) == float(f"{hard:.4g}")


def test_user_mistakes_print_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spectralscope.cli", "info", str(tmp_path / "nope.zarr")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.zarr" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "plain.zarr").mkdir()
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    proc = subprocess.run([sys.executable, "-m", "spectralscope.cli", "info", str(tmp_path / "plain.zarr")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a spectralscope run" in proc.stderr and "Traceback" not in proc.stderr


def test_a_reader_that_closes_the_pipe_early_stops_the_command_quietly(tmp_path):
    path = _run(tmp_path)
    for command in (["info", str(path)], ["doctor", str(path)]):
        proc = subprocess.Popen([sys.executable, "-m", "spectralscope.cli", *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # as `| head` does, long before the command has imported torch and written
        err = proc.stderr.read()
        assert proc.wait() == 141 and err == "", (command, err)


def test_fit_prints_the_table_and_the_recommendation(tmp_path, capsys):
    import pandas as pd
    from test_fit import ALPHA, _law, _write_run

    layers = [("h.0.attn.o_proj.weight", "attn_o", 0.0), ("h.1.attn.o_proj.weight", "attn_o", 1.0)]
    for size in (1e6, 4e6, 1.6e7):
        _write_run(tmp_path / f"m{int(size)}.zarr", size, layers, _law)
    csv = tmp_path / "fits.csv"
    assert main(["fit", str(tmp_path / "*.zarr"), "--quantile", "0.5", "--target-size", "1.6e8", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(csv)
    assert table["slope"].tolist() == [pytest.approx(-ALPHA[("attn_o", 0.0)]), pytest.approx(-ALPHA[("attn_o", 1.0)])]
    assert "attn_o@1" in out and "Newton–Schulz steps for a model of 1.6e+08 parameters" in out
    sigma = 0.25 * 1.6e8 ** -0.66
    steps = ss.fewest_ns_steps(sigma)
    # kind depth group quantile sigma ns_steps sigma_low ns_steps_conservative current_steps extrapolation far
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["attn_o"] and "@1" in line
               and len(line.split()) == 11)
    assert int(row[5]) == steps and int(row[8]) == 5 and float(row[9]) == pytest.approx(10) and row[10] == "False"
    assert int(row[7]) == steps  # an exact power law: a zero-width prediction interval
    assert {"pred_low", "pred_high", "prediction"} <= set(table.columns)
    assert main(["fit", str(tmp_path / "nothing*.zarr")]) == 2
    assert "no run matches" in capsys.readouterr().err


def test_dashboard_refuses_a_missing_folder_and_a_bad_port(tmp_path, capsys):
    from spectralscope.cli import main

    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["dashboard", str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_fit_of_a_mup_ratio_is_against_width_and_says_where_it_holds(optimizer_sweep, tmp_path, capsys):
    import pandas as pd

    csv = tmp_path / "mup.csv"
    assert main(["fit", *optimizer_sweep[:3], "--metric", "mup_weight_ratio", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(csv)
    ref = ss.fit_scaling(optimizer_sweep[:3], "mup_weight_ratio", size="width")
    assert table["slope"].tolist() == pytest.approx(ref["slope"].tolist(), rel=1e-12)
    assert table["holds"].tolist() == [bool(lo <= 0 <= hi) for lo, hi in zip(ref["ci_low"], ref["ci_high"], strict=True)]
    assert "against width" in out and f"{int(table['holds'].sum())} of {len(table)} groups" in out
    assert main(["fit", *optimizer_sweep[:3], "--metric", "mup_weight_ratio", "--target-size", "1e8"]) == 2
    assert "--size model_size" in capsys.readouterr().err
