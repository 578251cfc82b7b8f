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
from spectralscope import store
from spectralscope.store import GroupSpec, RunWriter

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from workers import expected, group_spec  # noqa: E402


def _worker(mode: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "workers.py"), mode, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_rows(ds: xr.Dataset, start: int = 0) -> int:
    """Every committed row from ``start`` on holds exactly what the writer appended at its step."""
    steps = ds["step"].values
    n = len(steps)
    np.testing.assert_array_equal(steps, np.arange(n))
    exp = expected(np.arange(start, n)[:, None, None])
    a, b = ds["a"].values[start:], ds["b"].values[start:]
    bad = ~(a == exp["a"]).all(axis=(1, 2)) | ~(b == exp["b"]).all(axis=1)
    assert not bad.any(), f"torn rows {np.nonzero(bad)[0][:10]} of {n}"
    return n


def _raw_rows(path: Path) -> xr.Dataset:
    """The committed rows read with Zarr alone, as the commit protocol prescribes: n_rows first, then rows below."""
    g = zarr.open_group(zarr.storage.LocalStore(str(path), read_only=True), mode="r")["optimizer"]
    n = int(g.attrs.get("n_rows", 0))
    return xr.Dataset({"a": (("step", "layer", "quantile"), g["a"][:n]), "b": (("step", "layer"), g["b"][:n])},
                      coords={"step": g["step"][:n]})


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
    assert attrs["status"] == "finished"
    assert attrs["spectralscope"] == {"schema": 1, "version": ss.__version__, "chunks": "all"}


@pytest.mark.parametrize("tail_bytes", [4 << 20, 0])  # whole chunks from the kept copy / Zarr's own merge
def test_small_commits_and_a_resume_mid_chunk_keep_every_row(tmp_path, monkeypatch, tail_bytes):
    monkeypatch.setattr(store, "TAIL_BYTES", tail_bytes)
    path = tmp_path / "r.zarr"
    attrs = {"name": "t", "model_size": 1}
    w = RunWriter(path, [group_spec()], attrs, flush_seconds=60)
    for s in range(300):
        w.append("optimizer", s, expected(s))
        if s % 7 == 0:
            w.flush()  # commits of one to seven rows, one across the chunk boundary at 256
    w.close()
    w = RunWriter(path, [group_spec()], attrs, resume=True, flush_seconds=60)
    for s in range(300, 530):  # the resumed chunk's first 44 rows are read back from the store
        w.append("optimizer", s, expected(s))
        if s % 11 == 0:
            w.flush()
    w.flush()
    assert _check_rows(_raw_rows(path)) == 530
    w.close()
    assert _check_rows(xr.open_zarr(path, group="optimizer", consolidated=False)) == 530


def test_a_group_handed_to_another_writer_and_taken_back_keeps_every_row(tmp_path):
    # the worker process's protocol: the owner releases a group, a second writer appends to it (and, here,
    # dies half-way through growing its arrays), the owner adopts it again at its committed n_rows
    path = tmp_path / "r.zarr"
    owner = RunWriter(path, [group_spec()], {"name": "t", "model_size": 1}, flush_seconds=60, initial_chunks=1)
    for s in range(100):
        owner.append("optimizer", s, expected(s))
    assert owner.release(["optimizer"]) == {"optimizer": 100}  # committed on release
    owner.append("optimizer", 999, expected(999))  # no longer the owner's to write: dropped
    other = RunWriter.attach(path, [group_spec()], flush_seconds=60)
    for s in range(100, 300):  # across the chunk boundary and one resize (capacity 256 → 512)
        other.append("optimizer", s, expected(s))
    other.flush()
    assert _check_rows(_raw_rows(path)) == 300
    for s in range(300, 310):  # measured, never committed: lost with the writer
        other.append("optimizer", s, expected(s))
    g = zarr.open_group(str(path), mode="r+")["optimizer"]
    g["step"].resize((1024,))  # a growth the dead writer left half done: one array longer than the others
    assert owner.adopt([group_spec()]) == {"optimizer": 300}
    for s in range(300, 600):  # past the shorter arrays' 512 rows: all grow to one length again
        owner.append("optimizer", s, expected(s))
    owner.close()
    ds = xr.open_zarr(path, group="optimizer", consolidated=False)
    assert ds.sizes["step"] == 600 and _check_rows(ds) == 600
    assert ss.open_run(path).attrs["status"] == "finished"
    w = RunWriter(tmp_path / "s.zarr", [group_spec()], {"name": "s", "model_size": 1})
    with pytest.raises(KeyError):  # a group that is not there cannot be adopted; the writer goes on
        w.adopt([GroupSpec("missing", {}, {"x": ("step",)})])
    w.append("optimizer", 0, expected(0))
    w.close()
    assert ss.open_run(tmp_path / "s.zarr")["optimizer"].sizes["step"] == 1


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
        deadline = time.monotonic() + 600
        while reads < 1500 or seen <= 2048:  # at least until the arrays have grown past 2048 rows (3 resizes)
            assert time.monotonic() < deadline and proc.poll() is None, "the writer stopped before 2048 rows"
            # every 10th read through open_run (xarray), all rows checked; the others as the dashboard reads
            # (n_rows, then the rows below it), checked from two chunks before the last commit on: the rows a
            # writer could have touched since
            if reads % 10 == 0:
                n = _check_rows(ss.open_run(path)["optimizer"].dataset)
            else:
                n = _check_rows(_raw_rows(path), start=max(0, seen - 512))
            assert n >= seen, "committed rows never disappear"
            growth += n > seen
            seen = n
            reads += 1
        assert growth > 100, f"the writer should have committed many times during the reads ({growth})"
    finally:
        stop.touch()
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read()
    final = _check_rows(ss.open_run(path)["optimizer"].dataset)
    assert final >= seen > 2048, "the reads spanned several array resizes"


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    """Wait until process ``pid`` (not our child: we cannot wait() for it) has exited (gone, or a zombie)."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)
    assert not pid or time.monotonic() < deadline, f"the worker process {pid} did not exit after its parent's death"


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_an_intact_store(tmp_path):
    """12 kills at random moments: the store always opens, every committed row is intact, and what is lost is
    at most the last flush interval plus the writer thread's scheduling slack: 0.5 s on an idle machine, scaled by
    the load per core (the writer thread waits its turn behind every runnable thread; under CI beside other jobs
    a 0.5 s slack was once exceeded by a commit that came late, not by a row that was dropped)."""
    rnd = random.Random(20261122)
    flush = 0.25
    lost, late = [], []
    for trial in range(12):
        path = tmp_path / f"kill{trial}.zarr"
        proc = _worker("train", path, flush)
        word, child = proc.stdout.readline().split()
        assert word == "ready", proc.stderr.read()
        time.sleep(rnd.uniform(0.05, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        slack = 0.5 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        proc.wait()
        _wait_gone(int(child))  # the orphaned worker process commits the rows it measured, then exits
        reported = [line.split() for line in proc.stdout.read().splitlines() if line.startswith("step ")]
        done = {int(s): float(t) for _, s, t in reported}
        tree = ss.open_run(path)
        assert tree.attrs["status"] == "running"
        ds = tree["optimizer"].dataset
        steps = ds["step"].values
        np.testing.assert_array_equal(steps, np.arange(len(steps)))  # a prefix of the steps, none torn or skipped
        for var in ("momentum_sv", "momentum_norm", "ns_out_sv", "update_rms", "neuron_norm", "weight_spectral_norm"):
            assert np.isfinite(ds[var].values).all(), (trial, var)
        sc = tree["scalars"].dataset
        assert np.all(np.diff(sc["step"].values) > 0)
        if sc.sizes["step"]:
            assert np.isfinite(sc["loss"].values).all()
        # every step finished more than one flush interval before the kill is committed
        must = [s for s, t in done.items() if t < killed - flush - slack]
        assert not must or len(steps) > max(must), (
            f"trial {trial}: {len(steps)} rows committed, slack {slack:.2f} s; steps done at (s before the kill): "
            + ", ".join(f"{s}: {killed - t:.3f}" for s, t in sorted(done.items())))
        newest = done.get(len(steps) - 1, killed) if len(steps) else killed
        lost.append(killed - newest)
        if len(steps) in done:  # how long the first step not committed had been finished, beyond the flush interval
            late.append((killed - done[len(steps)] - flush, slack))
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
    print(f"\nSIGKILL x12, flush {flush} s: time between the kill and the newest committed step: "
          f"median {np.median(lost):.3f} s, max {max(lost):.3f} s; the latest commit, beyond the flush interval: "
          f"{max(late, default=(0.0, 0.5))[0]:.3f} s (slack {max(late, default=(0.0, 0.5))[1]:.2f} s)")


def test_nothing_is_ever_unpickled_or_evaluated(tmp_path):
    # Metadata is JSON, arrays are numeric or fixed strings, collectives carry int64 tensors. A guard on the
    # source: no pickle, eval/exec, torch.load, numpy allow_pickle or object collectives anywhere.
    import re

    root = HERE.parent
    banned = re.compile(r"\bpickle\b|(?<![.\w])eval\(|\bexec\(|torch\.load\(|allow_pickle\s*=\s*True|"
                        r"_object_list\(|gather_object\(|dtype\s*=\s*object")
    hits = []
    # The one exception: the worker process of watch(background=True) gets its jobs pickled by the training
    # process that started it, over an unnamed socket pair only the two of them hold; nothing read from a
    # store, a file or the network is unpickled.
    worker = (root / "spectralscope" / "worker.py").read_text()
    assert "socket.socketpair()" in worker and not re.search(r"Listener|\.bind\(|\.listen\(|\.connect\(", worker)
    for folder in ("spectralscope", "hooks", "dashboards"):
        for f in sorted((root / folder).rglob("*.py")):
            if f == root / "spectralscope" / "worker.py":
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if banned.search(code):
                    hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, hits
    # every array spectralscope creates is numeric or a string: no object dtype for a codec to decode
    RunWriter(tmp_path / "r.zarr", [group_spec()], {"name": "x", "model_size": 1}).close()
    g = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")
    kinds = {arr.dtype.kind for _, arr in g["optimizer"].arrays()}
    assert kinds <= {"f", "i", "U", "T"}, kinds


# ---- overwrite=True removes runs only ------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _writer(path, **kw) -> RunWriter:
    return RunWriter(path, [group_spec()], {"name": "t", "model_size": 1}, flush_seconds=60, **kw)


def test_overwrite_never_removes_a_directory_that_is_not_a_run(tmp_path):
    user = tmp_path / "checkpoints"
    (user / "sub").mkdir(parents=True)
    (user / "model.ckpt").write_bytes(os.urandom(4096))
    (user / "notes.txt").write_text("epoch 3: loss 2.1\n")
    (user / "sub" / "zarr.json").write_text("{}")
    before = _snapshot(user)
    with pytest.raises(FileExistsError, match=r"checkpoints holds what is not a spectralscope run \(model\.ckpt\)"):
        _writer(user, overwrite=True)
    assert _snapshot(user) == before  # byte for byte


def test_overwrite_refuses_a_file_a_foreign_zarr_group_and_a_run_with_a_file_of_the_users(tmp_path):
    file = tmp_path / "run.zarr"
    file.write_text("not a directory")
    with pytest.raises(FileExistsError, match="is a file"):
        _writer(file, overwrite=True)
    assert file.read_text() == "not a directory"

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="f8")[:] = 1.0
    before = _snapshot(other)
    with pytest.raises(FileExistsError, match="not a spectralscope run's"):
        _writer(other, overwrite=True)
    assert _snapshot(other) == before

    run = tmp_path / "mine.zarr"
    w = _writer(run)
    w.append("optimizer", 0, expected(0))
    w.close()
    (run / "optimizer" / "README.md").write_text("my notes about this run")
    (run / "empty").mkdir()
    before = _snapshot(run)
    with pytest.raises(FileExistsError, match=r"\(empty/\)"):
        _writer(run, overwrite=True)
    (run / "empty").rmdir()
    with pytest.raises(FileExistsError, match=r"\(optimizer/README\.md\)"):
        _writer(run, overwrite=True)
    assert _snapshot(run) == before


def test_overwrite_replaces_a_run_and_takes_an_empty_directory(tmp_path):
    run = tmp_path / "r.zarr"
    w = _writer(run)
    for s in range(300):  # a resized array, a chunk boundary: every kind of key a run holds
        w.append("optimizer", s, expected(s))
    w.close()
    w = _writer(run, overwrite=True)
    w.append("optimizer", 0, expected(0))
    w.close()
    assert ss.open_run(run)["optimizer"].sizes["step"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    _writer(empty, overwrite=True).close()
    assert ss.open_run(empty).attrs["status"] == "finished"


def test_foreign_entry_reads_the_keys_of_a_run():
    meta = {"node_type": "group", "zarr_format": 3, "attributes": {"spectralscope": {"schema": 1}}}
    tmp = "0123456789abcdef0123456789abcdef"
    ours = ["zarr.json", "optimizer/zarr.json", "optimizer/a/zarr.json", "optimizer/a/c/0/0/0",
            f"optimizer/a/c/1/0/0.{tmp}.partial", "optimizer/size/zarr.json", "optimizer/size/c",
            f"optimizer/zarr.{tmp}.partial", f"zarr.{tmp}.partial"]
    assert store.foreign_entry(ours, meta) is None
    assert store.foreign_entry([*ours, "optimizer/a/c/0/x.ckpt"], meta) == "optimizer/a/c/0/x.ckpt"
    assert store.foreign_entry([*ours, "stray/a/zarr.json"], meta) == "stray/a/zarr.json"  # no node above it
    assert store.foreign_entry([*ours, "notes.partial"], meta) == "notes.partial"  # not Zarr's temporary name
    assert store.foreign_entry(ours, {**meta, "attributes": {}}) is not None
    assert store.foreign_entry(ours, None) is not None
