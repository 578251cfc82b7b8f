"""Damaged stores are reported, not guessed; a run whose writer died reads as stopped."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spectralscope as ss
from spectralscope import integrity
from spectralscope.cli import main
from spectralscope.dashboards import data

HERE = Path(__file__).parent


def _run(path: Path, steps: int = 300, **kw) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # ns_* all NaN: their chunks must exist all the same
    with ss.watch(opt, model, path, overhead=None, every=1, background=False, activations=None, **kw) as rec:
        for _ in range(steps):
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=1.0)
    return path


def _info(path, capsys) -> tuple[int, str, str]:
    code = main(["info", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_intact_run_has_no_damage_even_where_every_value_is_nan(tmp_path):
    path = _run(tmp_path / "r.zarr")
    assert integrity.damaged_rows(path, decode=True) == []
    tree = ss.open_run(path, check="full")
    assert "damaged" not in tree.attrs and tree["optimizer"].sizes["step"] == 300
    assert np.isnan(tree["optimizer"]["ns_out_sv"].values).all()


@pytest.mark.parametrize("doc", ["optimizer/zarr.json", "optimizer/momentum_sv/zarr.json", "zarr.json"])
def test_a_truncated_metadata_document_is_named(tmp_path, capsys, doc):
    path = _run(tmp_path / "r.zarr", steps=3)
    text = (path / doc).read_text()
    (path / doc).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{doc} is damaged \\(JSONDecodeError: "):
        ss.open_run(path)
    code, out, err = _info(path, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and f"{doc} is damaged" in err
    assert "Traceback" not in err


def test_a_missing_chunk_is_reported_as_damaged_rows_not_nan(tmp_path, capsys, caplog):
    path = _run(tmp_path / "r.zarr")  # 300 rows: chunks of 256 steps, rows 256..299 in chunk 1
    before = ss.open_run(path)["optimizer"]["update_rms"].values
    (path / "optimizer" / "update_rms" / "c" / "1" / "0").unlink()
    tree = ss.open_run(path)
    assert tree.attrs["damaged"] == [
        "optimizer steps 256..299 (44 rows): chunk optimizer/update_rms/c/1/0 is missing"]
    ds = tree["optimizer"]
    assert list(ds["step"].values) == list(range(256))  # left out, not NaN
    np.testing.assert_array_equal(ds["update_rms"].values, before[:256])
    assert "is damaged, 1 row ranges left out" in caplog.text
    code, out, err = _info(path, capsys)
    assert code == 0 and err == ""
    assert "damaged    optimizer steps 256..299 (44 rows): chunk optimizer/update_rms/c/1/0 is missing (left out)" in out
    # the step array's own chunk: the rows have no step to name
    (path / "scalars" / "step" / "c" / "0").unlink()
    assert "scalars rows 0..255 (256 rows): chunk scalars/step/c/0 is missing" in ss.open_run(path).attrs["damaged"]


def test_an_undecodable_chunk_is_reported_by_a_full_check_and_info(tmp_path, capsys):
    path = _run(tmp_path / "r.zarr")
    chunk = path / "optimizer" / "neuron_cv" / "c" / "0" / "0"
    chunk.write_bytes(os.urandom(chunk.stat().st_size))
    assert "damaged" not in ss.open_run(path).attrs  # the files are all there
    tree = ss.open_run(path, check="full")
    (text,) = tree.attrs["damaged"]
    assert text.startswith("optimizer steps 0..255 (256 rows): chunk optimizer/neuron_cv/c/0/0 cannot be decoded (")
    assert list(tree["optimizer"]["step"].values) == list(range(256, 300))
    code, out, err = _info(path, capsys)
    assert code == 0 and "Traceback" not in out + err and "cannot be decoded" in out


def test_the_heartbeat_is_refreshed_while_the_writer_lives(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = ss.watch(opt, model, tmp_path / "r.zarr", flush_seconds=0.5, background=False)
    first = ss.open_run(rec.path).attrs["heartbeat"]
    assert first["pid"] == os.getpid() and first["interval"] == 0.5
    time.sleep(2.5)  # no step, nothing to commit: the beat goes on
    later = ss.open_run(rec.path).attrs["heartbeat"]
    assert later["time"] > first["time"]
    assert integrity.run_status(ss.open_run(rec.path).attrs) == "running"
    rec.close()
    assert integrity.run_status(ss.open_run(rec.path).attrs) == "finished"


def test_run_status_reads_a_stale_heartbeat_as_stopped():
    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    beat = {"host": "elsewhere", "pid": 1, "interval": 10.0}
    attrs = {"status": "running", "heartbeat": {**beat, "time": (now - dt.timedelta(seconds=30)).isoformat()}}
    assert integrity.run_status(attrs, now) == "running"
    attrs["heartbeat"]["time"] = (now - dt.timedelta(seconds=41)).isoformat()
    assert integrity.run_status(attrs, now) == "stopped"
    fifteen = (now - dt.timedelta(seconds=15)).isoformat()
    fast = {"status": "running", "heartbeat": {**beat, "interval": 0.5, "time": fifteen}}
    assert integrity.run_status(fast, now) == "running"  # never stale in less than 20 s: clocks differ
    assert integrity.run_status({**attrs, "status": "finished"}, now) == "finished"
    assert integrity.run_status({"status": "running"}, now) == "running"  # a run written before heartbeats


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_writer_reads_as_stopped(tmp_path, capsys, sig):
    path = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, str(HERE / "workers.py"), "train", str(path), "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        while int(proc.stdout.readline().split()[1]) < 5:
            pass
        assert integrity.run_status(ss.open_run(path).attrs) == "running"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    attrs = ss.open_run(path).attrs
    assert attrs["status"] == "running"  # as the dead writer left it
    assert integrity.run_status(attrs) == "stopped"
    code, out, _ = _info(path, capsys)
    assert code == 0 and f"status     stopped: its writer (pid {proc.pid} on " in out
    (row,) = data.overview(data.find_runs(tmp_path)).to_dict("records")
    assert row["status"] == "stopped"


def test_last_update_is_the_last_commit_not_the_last_heartbeat(tmp_path):
    import torch
    from torch import nn

    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = ss.watch(opt, model, tmp_path / "r.zarr", every=1, flush_seconds=0.5, background=False, activations=None)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    rec.flush()
    committed = data.last_update(rec.path)
    beat = ss.open_run(rec.path).attrs["heartbeat"]["time"]
    time.sleep(2.5)  # beats, no rows
    assert ss.open_run(rec.path).attrs["heartbeat"]["time"] > beat
    assert data.last_update(rec.path) == committed
    rec.close()
