"""The GPU benchmark is run by hand where CUDA is available; its --smoke mode keeps the script from rotting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectralscope.demo import usable_cores

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_the_cpu():
    out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.count("watched/plain") == 3  # defaults, defaults on a worker thread, every instrument
    assert "background=True" in text
    assert "1. weight spectra" in text and "2. activation" in text and "3. curvature probe" in text


def test_gpu_benchmark_refuses_a_cpu_without_smoke():
    import torch

    if torch.cuda.is_available():  # there it would run the real benchmark
        pytest.skip("CUDA available")
    out = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no CUDA device" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--inline"], ["--threads", "1"], ["--lend-core"]])
def test_overhead_benchmark_runs_and_states_its_thread_setting(mode):
    # its tables are docs/benchmarks.md's: it must keep running against the recorder as it is (it once read a
    # recorder attribute a refactor had removed, and nobody saw)
    small = ["--pairs", "2", "--group", "1", "--block", "2", "--every", "2", "--width", "32", "--depth", "1",
             "--batch", "4", "--ctx", "16"]
    out = subprocess.run([sys.executable, "benchmarks/overhead.py", *small, *mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "watched/plain" in out.stdout and "direct account" in out.stdout
    assert ("torch on 1 thread(s);" if mode == ["--threads", "1"] else "(its default)") in out.stdout
    # the process clock sums every torch thread's CPU: it times inline records only where torch has one thread
    one = "torch on 1 thread(s)" in out.stdout
    assert ("process clock" if mode == ["--inline"] and one else "wall clock") in out.stdout
    assert ("a core lent to it" in out.stdout) == (mode == ["--lend-core"])
    assert "failed" not in out.stderr


def test_learning_rate_sweep_prints_its_table_and_choice():
    out = subprocess.run([sys.executable, "benchmarks/learning_rates.py", "--width", "16", "--steps", "4", "--seeds", "0",
                          "--optimizers", "normuon"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| normuon |")]
    assert [r.split("|")[2].strip() for r in rows] == ["0.01", "0.02", "0.04"]
    scores = [float(r.split("|")[-2]) for r in rows]
    best = ["0.01", "0.02", "0.04"][scores.index(min(scores))]
    assert f"**normuon: best lr {best}**" in out.stdout and "held-out loss after the last step" in out.stdout


def test_weight_alpha_benchmark_prints_agreement_and_speed():
    out = subprocess.run([sys.executable, "benchmarks/weight_alpha.py", "--repeats", "2", "--shapes", "60x90"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [ln.split("|") for ln in out.stdout.splitlines() if ln.startswith("| student") or ln.startswith("| gauss")]
    assert len(rows) == 2
    for r in rows:
        assert float(r[5]) <= 1e-9 and abs(float(r[3]) - float(r[4])) <= 1e-6  # the same α as WeightWatcher's


def test_demo_cost_benchmark_prints_a_row_per_instrument_left_out():
    # its table is docs/benchmarks.md's "Where the demo's time goes": it must keep running against the demo as it is
    out = subprocess.run([sys.executable, "benchmarks/demo_cost.py", "--repeats", "1", "--steps", "12", "--width", "16",
                          "--only", "but", "core lent"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln[:46].strip(): ln[46:].split() for ln in out.stdout.splitlines()[2:]}
    assert set(rows) == {"plain (not watched)", "optimizer records only, core lent", "every instrument, core lent"} | {
        f"every instrument but {n}" for n in ("activations", "gradients", "sharpness", "weights", "attention")}
    assert rows["plain (not watched)"][1] == "1.00" and all(0 < float(r[2].rstrip("%")) <= 100 for r in rows.values())
    assert "torch on" in out.stdout.splitlines()[0]


@pytest.mark.skipif(usable_cores() < 2, reason="one core: there is nothing to train side by side")
def test_demo_jobs_benchmark_prints_one_job_against_several():
    # its table is docs/benchmarks.md's "The demo's runs side by side"
    out = subprocess.run([sys.executable, "benchmarks/demo_jobs.py", "--repeats", "1", "--steps", "20", "--widths",
                          "8", "12", "16", "--optimizers", "muon", "--jobs", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {ln[:34].strip(): ln[34:].split() for ln in out.stdout.splitlines()[2:]}
    assert list(rows) == [f"1 job, torch on {torch.get_num_threads()} thread" + "s" * (torch.get_num_threads() > 1),
                          "2 jobs, torch on " + ("1 thread" if usable_cores() < 4 else f"{usable_cores() // 2} threads")
                          + " each"]
    assert rows[list(rows)[0]][1] == "1.00" and all(0 < float(r[2].rstrip("%")) <= 100 for r in rows.values())
