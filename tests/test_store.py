from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import spectralscope as ss
from spectralscope.store import RunWriter

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from workers import expected, group_spec  # noqa: E402


def _worker(mode: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "workers.py"), mode, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_rows(ds: xr.Dataset) -> int:
    steps = ds["step"].values
    n = len(steps)
    np.testing.assert_array_equal(steps, np.arange(n))
    exp = expected(np.arange(n)[:, None, None])
    a, b = ds["a"].values, ds["b"].values
    bad = ~(a == exp["a"]).all(axis=(1, 2)) | ~(b == exp["b"]).all(axis=1)
    assert not bad.any(), f"torn rows {np.nonzero(bad)[0][:10]} of {n}"
    return n


def test_writer_commits_rows_and_trims_on_close(tmp_path):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, [group_spec()], {"name": "t", "model_size": 1}, flush_seconds=60)
    for s in range(600):  # crosses two chunk boundaries and one resize
        w.append("optimizer", s, expected(s))
    w.flush()
    assert zarr.open_group(str(path), mode="r")["optimizer"].attrs["n_rows"] == 600
    assert ss.open_run(path).attrs["status"] == "running"
    w.close()
    ds = xr.open_zarr(path, group="optimizer", consolidated=False)  # plain xarray on a finished run
    assert ds.sizes["step"] == 600 and _check_rows(ds) == 600
    assert ds["a"].dims == ("step", "layer", "quantile")
    assert zarr.open_array(str(path / "optimizer" / "a"), mode="r").chunks[0] >= 256
    attrs = ss.open_run(path).attrs
    assert attrs["status"] == "finished" and attrs["spectralscope"] == {"schema": 1, "version": ss.__version__}


def test_tail_is_flushed_every_flush_seconds(tmp_path):
    path = tmp_path / "r.zarr"
    w = RunWriter(path, [group_spec()], {"name": "t", "model_size": 1}, flush_seconds=0.2)
    for s in range(10):
        w.append("optimizer", s, expected(s))
    deadline = time.monotonic() + 10
    while ss.open_run(path)["optimizer"].sizes["step"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ss.open_run(path)["optimizer"].sizes["step"] == 10  # committed without close()
    w.close()


def test_not_a_run_or_other_schema_is_refused_by_name(tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").attrs["x"] = 1
    with pytest.raises(ValueError, match="not a spectralscope run") as e:
        ss.open_run(plain)
    assert str(plain) in str(e.value)
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["spectralscope"] = {"schema": 99, "version": "9"}
    with pytest.raises(ValueError, match="schema 99"):
        ss.open_run(other)
    with pytest.raises(FileNotFoundError, match="missing"):
        ss.open_run(tmp_path / "missing.zarr")


@pytest.mark.slow
def test_reader_beside_writer_never_sees_a_torn_row(tmp_path):
    path, stop = tmp_path / "live.zarr", tmp_path / "stop"
    proc = _worker("write", path, stop)
    try:
        deadline = time.monotonic() + 60
        while True:  # the root's attributes are written last, once the layout is complete
            try:
                ss.open_run(path)
                break
            except (FileNotFoundError, ValueError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
                time.sleep(0.05)
        reads, seen, growth = 0, 0, 0
        while reads < 2000:
            n = _check_rows(ss.open_run(path)["optimizer"].dataset)
            assert n >= seen, "committed rows never disappear"
            growth += n > seen
            seen = n
            reads += 1
        assert growth > 50, f"the writer should have committed many times during the reads ({growth})"
    finally:
        stop.touch()
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read()
    final = _check_rows(ss.open_run(path)["optimizer"].dataset)
    assert final >= seen and final > 1024, "the reads spanned several array resizes"


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_an_intact_store(tmp_path):
    rnd = random.Random(20261122)
    for trial in range(6):
        path = tmp_path / f"kill{trial}.zarr"
        proc = _worker("train", path)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rnd.uniform(0.05, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tree = ss.open_run(path)
        assert tree.attrs["status"] == "running"
        ds = tree["optimizer"].dataset
        steps = ds["step"].values
        assert np.all(np.diff(steps) > 0)
        for var in ("momentum_sv", "momentum_norm", "ns_out_sv", "update_rms", "neuron_norm", "weight_spectral_norm"):
            assert np.isfinite(ds[var].values).all(), (trial, var)
        sc = tree["scalars"].dataset
        assert np.all(np.diff(sc["step"].values) > 0)
        if sc.sizes["step"]:
            assert np.isfinite(sc["loss"].values).all()
        # the run can be resumed after the crash and continues the step axis
        if trial == 0 and len(steps):
            import torch

            model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
            opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
            with ss.watch(opt, model, path, every=1, resume=True) as rec:
                model(torch.randn(4, 16)).sum().backward()
                opt.step()
                assert rec.step > steps[-1]
            after = ss.open_run(path)["optimizer"]["step"].values
            assert after[-1] > steps[-1] and np.all(np.diff(after) > 0)
