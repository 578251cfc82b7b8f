from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
import torch

import spectralscope as ss
from spectralscope.cli import main
from spectralscope.demo import DemoConfig, plan_jobs, train_all, usable_cores


@pytest.mark.slow
def test_demo_end_to_end_at_a_tiny_setting(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    monkeypatch.setattr(logging.root, "handlers", [])  # as from the command line: no logging set up
    assert main(["demo", "--out", str(out), "--widths", "16", "24", "32", "40", "--depth", "2", "--steps", "24",
                 "--data", "pcfg", "--imbalance", "1.5", "--jobs", "2"]) == 0
    said = capsys.readouterr()
    text = said.out
    # the job processes' warnings and alerts are printed here (a child's own stderr is not captured), each on a
    # line of its own above the progress bar, not through it, and each names the run it came from
    logged = [m for m in re.finditer(r"(^|[\r\n])?([^\r\n]*?)spectralscope", said.err)]
    assert logged and all(re.fullmatch(r"(muon|adamw|normuon) w(16|24|32|40): ", m[2]) for m in logged), said.err
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
    done = re.search(r"demo done in (\d+) s wall time \(training (\d+) s; 2 runs at a time, torch on (\d+) "
                     r"threads? each\)", text)
    assert done and int(done[1]) >= int(done[2]) and int(done[3]) == max(1, usable_cores() // 2)


@pytest.mark.slow
def test_demo_ffn_sweep_varies_the_ffn_width_at_a_fixed_width(tmp_path, capsys):
    out = tmp_path / "ffn"
    assert main(["demo", "--out", str(out), "--optimizers", "adamw", "muon", "--sweep", "ffn", "--width", "16",
                 "--ffn", "1", "2", "4", "--depth", "1", "--steps", "20", "--jobs", "1"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"\(training \d+ s; torch on {torch.get_num_threads()} threads?\)", text)  # in this process
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


def test_plan_jobs_takes_one_job_per_core_at_most_one_per_run():
    cores = usable_cores()

    def jobs_the_memory_allows() -> int:  # the default needs a GiB of available memory per job
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")) // (1 << 30)

    before = jobs_the_memory_allows()
    n, threads = plan_jobs(None, 100)
    bounds = sorted((before, jobs_the_memory_allows()))  # the available memory moves meanwhile
    assert max(1, min(cores, bounds[0])) <= n <= max(1, min(cores, bounds[1]))
    assert threads == (max(1, cores // n) if n > 1 else torch.get_num_threads())
    assert plan_jobs(1, 12) == (1, torch.get_num_threads())  # in this process, at torch's own threads
    assert plan_jobs(3, 2) == (2, max(1, cores // 2))  # never more jobs than runs
    assert plan_jobs(4, 12) == (4, max(1, cores // 4))


class _Steps:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **_) -> None:
        pass

    def set_postfix_str(self, *_, **__) -> None:
        pass


@pytest.mark.slow
def test_runs_trained_side_by_side_are_the_runs_trained_one_after_another(tmp_path, monkeypatch):
    from spectralscope.corpus import load_corpus

    corpus = load_corpus("pcfg", 1.0)
    common = dict(optimizers=["muon", "adamw"], widths=[8, 16], depth=1, steps=20)
    monkeypatch.setattr(logging.root, "handlers", [])
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # both on one thread, where the two ways must agree to rounding
    try:
        one = DemoConfig(out=str(tmp_path / "one"), jobs=1, **common)
        one_bar = _Steps()
        one_runs, jobs, _ = train_all(one, corpus, one_bar)
    finally:
        torch.set_num_threads(threads_before)
    assert jobs == 1
    two = DemoConfig(out=str(tmp_path / "two"), jobs=2, **common)
    bar = _Steps()
    runs, jobs, threads = train_all(two, corpus, bar)
    assert (jobs, threads) == (2, max(1, usable_cores() // 2)) and bar.n == one_bar.n == 4 * 20
    # the same runs in the same order (optimizers, then widths), whichever job finished first
    names = [f"{o}/w{w}.zarr" for o in ("muon", "adamw") for w in (8, 16)]
    assert runs == [str(tmp_path / "two" / n) for n in names] and one_runs == [str(tmp_path / "one" / n) for n in names]
    for a, b in zip(one_runs, runs, strict=True):
        ta, tb = ss.open_run(a), ss.open_run(b)
        assert tb.attrs["status"] == "finished" and tb.attrs["meta"] == ta.attrs["meta"]
        np.testing.assert_allclose(tb["scalars"]["loss"].values, ta["scalars"]["loss"].values, rtol=1e-3)
        np.testing.assert_allclose(tb["optimizer"]["momentum_sv"].values, ta["optimizer"]["momentum_sv"].values,
                                   rtol=1e-3, atol=1e-7)


@pytest.mark.slow
def test_a_failing_job_stops_the_demo_with_its_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # the runs would go under a file: every job fails at its first run
    assert main(["demo", "--out", str(blocker / "demo"), "--optimizers", "muon", "--widths", "8", "12", "16",
                 "--depth", "1", "--steps", "20", "--jobs", "2", "--data", "pcfg"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err  # the job's error, said in this process
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_ctrl_c_closes_the_runs_in_training_and_starts_no_other(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out, err = tmp_path / "demo", tmp_path / "stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from spectralscope.cli import main; sys.exit(main())",
                                 "demo", "--out", str(out), "--optimizers",
                                 "muon", "adamw", "--widths", "16", "24", "32", "--depth", "1", "--steps", "400",
                                 "--jobs", "2", "--data", "pcfg"], stdout=subprocess.DEVNULL, stderr=f,
                                start_new_session=True)  # its own process group, as a terminal's Ctrl-C reaches
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"\| +([2-9]\d|\d{3,})/2400", err.read_text()):  # both jobs are training
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = err.read_text()
    assert "KeyboardInterrupt" in said and "BrokenPipeError" not in said
    started = sorted(out.glob("*/*.zarr"))
    assert 1 <= len(started) <= 3, started  # the runs in training, not the 6 of the sweep
    for run in started:
        tree = ss.open_run(run)
        assert tree.attrs["status"] == "finished" and 0 < tree["scalars"].sizes["step"] < 400
    deadline = time.monotonic() + 60  # the job processes and their measuring children are gone
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the demo are left"
        time.sleep(0.5)
