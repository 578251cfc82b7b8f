"""Runs on object storage: `watch`, `open_run`, `fit_scaling` and the dashboard's reader on ``s3://`` URLs with
``storage_options``, against a real S3 API server (moto in server mode, a separate process on loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import s3fs
import torch
from torch import nn

import spectralscope as ss

pytestmark = pytest.mark.slow  # a server process and hundreds of HTTP requests per run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """storage_options for a fresh S3 server with an empty bucket ``runs``."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="runs")
    yield opts
    proc.terminate()
    proc.wait(timeout=30)


def _train(path, width: int = 16, steps: int = 6, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width, bias=False), nn.Tanh(), nn.Linear(width, width, bias=False), nn.Tanh(),
                          nn.Linear(width, 4, bias=False))
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    with ss.watch(opt, model, path, overhead=None, every=1, activations=ss.ActivationSpectra(every=2), **kw) as rec:
        for _ in range(steps):
            model(torch.randn(16, 8, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=1.0)


def test_a_run_on_s3_holds_what_a_local_run_holds(s3, tmp_path):
    _train("s3://runs/a.zarr", storage_options=s3)
    _train(tmp_path / "a.zarr")
    remote, local = ss.open_run("s3://runs/a.zarr", storage_options=s3), ss.open_run(tmp_path / "a.zarr")
    assert remote.attrs["status"] == "finished" and remote.attrs["steps"] == 6
    for group in ("optimizer", "activations", "scalars"):
        r, loc = remote[group].dataset, local[group].dataset
        assert set(r.data_vars) == set(loc.data_vars) and r.sizes == loc.sizes
        for var in loc.data_vars:
            np.testing.assert_array_equal(r[var].values, loc[var].values, err_msg=f"{group}/{var}")


def test_existing_s3_store_needs_resume_or_overwrite(s3):
    _train("s3://runs/b.zarr", steps=3, storage_options=s3)
    with pytest.raises(FileExistsError, match="s3://runs/b.zarr"):
        _train("s3://runs/b.zarr", storage_options=s3)
    _train("s3://runs/b.zarr", steps=2, storage_options=s3, resume=True)
    np.testing.assert_array_equal(ss.open_run("s3://runs/b.zarr", storage_options=s3)["optimizer"]["step"].values,
                                  np.arange(5))
    _train("s3://runs/b.zarr", steps=1, storage_options=s3, overwrite=True)
    assert ss.open_run("s3://runs/b.zarr", storage_options=s3).attrs["steps"] == 1


def test_overwrite_on_s3_removes_runs_only(s3):
    fs = s3fs.S3FileSystem(**s3)
    fs.pipe("runs/ckpts/model.ckpt", b"weights")
    fs.pipe("runs/ckpts/notes.txt", b"epoch 3")
    with pytest.raises(FileExistsError, match=r"s3://runs/ckpts holds what is not a spectralscope run"):
        _train("s3://runs/ckpts", steps=1, storage_options=s3, overwrite=True)
    assert fs.cat("runs/ckpts/model.ckpt") == b"weights" and sorted(fs.ls("runs/ckpts")) == [
        "runs/ckpts/model.ckpt", "runs/ckpts/notes.txt"]
    _train("s3://runs/c.zarr", steps=2, storage_options=s3)
    fs.pipe("runs/c.zarr/optimizer/mine.txt", b"keep me")
    with pytest.raises(FileExistsError, match=r"optimizer/mine\.txt"):
        _train("s3://runs/c.zarr", steps=1, storage_options=s3, overwrite=True)
    assert fs.cat("runs/c.zarr/optimizer/mine.txt") == b"keep me"


def test_fit_scaling_reads_a_glob_of_s3_runs(s3, tmp_path):
    for w in (8, 16, 32):
        _train(f"s3://runs/sweep/w{w}.zarr", width=w, storage_options=s3)
        _train(tmp_path / f"w{w}.zarr", width=w)
    remote = ss.fit_scaling(["s3://runs/sweep/*.zarr"], metric="momentum_sv", quantile=0.5, storage_options=s3)
    local = ss.fit_scaling([str(tmp_path / "*.zarr")], metric="momentum_sv", quantile=0.5)
    assert len(remote) == len(local) > 0 and (remote["n_sizes"] == 3).all()
    np.testing.assert_allclose(remote["slope"].values, local["slope"].values, rtol=1e-12)
    with pytest.raises(ValueError, match="no run matches"):
        ss.fit_scaling(["s3://runs/nothing/*.zarr"], storage_options=s3)
    # the command line takes the same options as JSON
    import json

    from spectralscope.cli import fit_text, info_text, main

    text = fit_text(["s3://runs/sweep/*.zarr"], "momentum_sv", 0.5, None, None, s3)
    assert "attn" in text or "mlp" in text or "other" in text
    assert "s3://runs/sweep/w8.zarr" in info_text("s3://runs/sweep/w8.zarr", s3)
    assert main(["info", "s3://runs/sweep/w8.zarr", "--storage-options", json.dumps(s3)]) == 0
    assert main(["fit", "s3://runs/sweep/*.zarr", "--storage-options", "[1, 2]"]) == 2


def test_the_dashboard_serves_a_runs_folder_on_s3(s3, monkeypatch):
    import json
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import spectralscope.dashboards as dashboards
    from spectralscope.dashboards import data

    for w in (8, 12, 16):
        _train(f"s3://runs/dash/sweep/w{w}.zarr", width=w, steps=8, storage_options=s3)
    fs = s3fs.S3FileSystem(**s3)
    fs.pipe("runs/dash/broken.zarr/zarr.json", b"{not json")
    entries = data.find_runs("s3://runs/dash", storage_options=s3)
    assert [e.rel for e in entries] == ["broken.zarr", "sweep/w12.zarr", "sweep/w16.zarr", "sweep/w8.zarr"]
    assert not entries[0].ok and "corrupt" in entries[0].problem and all(e.ok for e in entries[1:])
    assert data.n_rows(entries[1].path, s3)["optimizer"] == 8
    assert data.last_update(entries[1].path, s3) is not None
    da = data.read(entries[1].path, "optimizer", "momentum_sv", quantile=0.5, storage_options=s3)
    local = ss.open_run("s3://runs/dash/sweep/w12.zarr", storage_options=s3)["optimizer"]["momentum_sv"]
    np.testing.assert_array_equal(da.values, local.sel(quantile=0.5).values)
    with pytest.raises(ValueError, match="outside the runs folder"):
        data.resolve("s3://runs/dash", "../other/x.zarr")

    monkeypatch.setenv("SPECTRALSCOPE_RUNS_DIR", "s3://runs/dash")
    monkeypatch.setenv("SPECTRALSCOPE_STORAGE_OPTIONS", json.dumps(s3))
    at = AppTest.from_file(str(Path(dashboards.__file__).parent / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    text = " ".join(t.value.reset_index().to_csv() for t in at.table)
    assert "sweep/w8.zarr" in text and "broken.zarr" in text
    for page in ("views/optimizer.py", "views/scaling.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
        assert any(trace.get("x") is not None or trace.get("z") is not None for f in figs for trace in f["data"]), page
