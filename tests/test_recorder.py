from __future__ import annotations

import copy
import glob
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import np_quantile, prescribed, process_of, thread_of
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz
from torch.overrides import TorchFunctionMode

import spectralscope as ss
from spectralscope import worker as worker_module
from spectralscope.spectra import DEFAULT_QUANTILES as QS

THRESHOLD_5 = 1.067e-3  # SPEC §7 reference value of ns_threshold(5)


def _grad_spectrum(r: int) -> np.ndarray:
    return np.concatenate([np.geomspace(2.0, 0.05, r - 4), np.full(4, 2e-5)])


class Tiny(nn.Module):
    def __init__(self, d_in=12, d=16, d_out=6):
        super().__init__()
        self.embed = nn.Linear(d_in, d, bias=False)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"mlp": nn.ModuleDict({"c_fc": nn.Linear(d, 2 * d), "c_proj": nn.Linear(2 * d, d)})})
            for _ in range(2)
        )
        self.head = nn.Linear(d, d_out, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["mlp"]["c_proj"](torch.tanh(b["mlp"]["c_fc"](h)))
        return self.head(h)


def _one_param_step(tmp_path, opt_factory, grads, **watch_kw):
    """Run len(grads) optimizer steps on one 20×36 matrix with prescribed gradients; return (tree, param history)."""
    w = nn.Parameter(torch.zeros(20, 36))
    opt = opt_factory([w])
    rec = ss.watch(opt, None, tmp_path / "r.zarr", every=1, **watch_kw)
    hist = [w.detach().clone()]
    for g in grads:
        w.grad = torch.from_numpy(g).float()
        opt.step()
        hist.append(w.detach().clone())
    rec.close()
    return ss.open_run(tmp_path / "r.zarr"), hist


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_momentum_spectrum_is_exact(tmp_path, nesterov):
    mu = 0.9
    g1 = prescribed(20, 36, _grad_spectrum(20), seed=1)
    g2 = prescribed(20, 36, _grad_spectrum(20)[::-1].copy() * 0.5 + 0.01, seed=2)
    tree, hist = _one_param_step(
        tmp_path, lambda p: torch.optim.Muon(p, lr=0.01, momentum=mu, nesterov=nesterov, weight_decay=0.0), [g1, g2]
    )
    opt = tree["optimizer"]
    assert list(opt.step.values) == [0, 1]
    # reference: float64 numpy, from the gradients alone (B_t = μ B_{t-1} + (1−μ) g_t)
    g1f, g2f = g1.astype(np.float32).astype(np.float64), g2.astype(np.float32).astype(np.float64)
    b1 = (1 - mu) * g1f
    b2 = mu * b1 + (1 - mu) * g2f
    for t, (g, b) in enumerate([(g1f, b1), (g2f, b2)]):
        m = (1 - mu) * g + mu * b if nesterov else b
        sv = np.linalg.svd(m, compute_uv=False)
        fro = np.linalg.norm(m)
        # the optimizer forms M in float32: its tiny singular values carry ~1e-7·σ_max of rounding
        np.testing.assert_allclose(opt.momentum_sv.values[t, 0], np_quantile(sv / fro, QS), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.momentum_norm.values[t, 0], fro, rtol=1e-5)
        assert opt.ns_fail_frac.values[t, 0] == pytest.approx(np.mean(sv / fro < THRESHOLD_5))
    assert opt.ns_fail_frac.values[0, 0] == pytest.approx(4 / 20)
    # the NS output is the one the optimizer applied: with wd = 0, ΔW = −lr·O (adjust 1 for a wide matrix)
    for t in range(2):
        o = -(hist[t + 1] - hist[t]).double().numpy() / 0.01
        np.testing.assert_allclose(opt.ns_out_sv.values[t, 0], np_quantile(np.linalg.svd(o, compute_uv=False), QS),
                                   rtol=2e-3, atol=1e-4)
        dw = (hist[t + 1].double() - hist[t].double()).numpy()  # the exact realised step
        np.testing.assert_allclose(opt.update_sv.values[t, 0], np_quantile(np.linalg.svd(dw, compute_uv=False), QS),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lr", [0.02, 1e-9])
def test_ns_output_is_the_optimizers_own_with_weight_decay(tmp_path, lr):
    # lr = 0.02: O is read back from the applied step; lr = 1e-9: too small to read back, O is recomputed.
    # Either way ns_out_sv must be σ of torch's own NS output for that step.
    w = nn.Parameter(torch.from_numpy(np.random.default_rng(0).standard_normal((20, 36)) * 0.05).float())
    opt = torch.optim.Muon([w], lr=lr, weight_decay=0.1)
    rec = ss.watch(opt, None, tmp_path / "r.zarr", every=1)
    refs = []
    for seed in (1, 2, 3):
        w.grad = torch.from_numpy(prescribed(20, 36, _grad_spectrum(20), seed=seed)).float()
        opt.step()
        group = opt.param_groups[0]
        m = w.grad.lerp(opt.state[w]["momentum_buffer"], group["momentum"])
        o = _zeropower_via_newtonschulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"])
        refs.append(np.linalg.svd(o.double().numpy(), compute_uv=False))
    rec.close()
    opt_ds = ss.open_run(tmp_path / "r.zarr")["optimizer"]
    for t, sv in enumerate(refs):
        np.testing.assert_allclose(opt_ds.ns_out_sv.values[t, 0], np_quantile(sv, QS), rtol=1e-6, atol=1e-7)
        assert opt_ds.ns_polar_err.values[t, 0] == pytest.approx(np.sqrt(np.mean((sv - 1) ** 2)), rel=1e-6)


def test_sgd_and_adamw_record_their_momentum(tmp_path):
    g = prescribed(20, 36, _grad_spectrum(20), seed=3)
    sv = np.linalg.svd(g.astype(np.float32).astype(np.float64), compute_uv=False)
    for name, factory in [("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
                          ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-3))]:
        tree, _ = _one_param_step(tmp_path / name, factory, [g])
        opt = tree["optimizer"]
        # first step: SGD buf = g, AdamW exp_avg = (1 − β1)·g — same normalised spectrum
        np.testing.assert_allclose(opt.momentum_sv.values[0, 0], np_quantile(sv / np.linalg.norm(sv), QS),
                                   rtol=1e-5, atol=1e-6)
        assert np.isnan(opt.ns_fail_frac.values).all() and np.isnan(opt.ns_polar_err.values).all()
        assert np.isfinite(opt.update_rms.values).all()
        assert tree.attrs["optimizer"][0]["class"] == f"torch.optim.{type(factory([nn.Parameter(torch.zeros(1))])).__name__}"
        assert tree.attrs["notes"] == {"newton_schulz": f"not applicable ({tree.attrs['optimizer'][0]['class']} applies "
                                                        "no Newton–Schulz)"}


def test_optimizer_without_momentum_still_records_updates(tmp_path, caplog):
    g = prescribed(20, 36, _grad_spectrum(20), seed=4)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        tree, hist = _one_param_step(tmp_path, lambda p: torch.optim.SGD(p, lr=0.1), [g])
    opt = tree["optimizer"]
    assert np.isnan(opt.momentum_sv.values).all()
    # ... and says why: once in the log, in the run's notes
    said = [r.getMessage() for r in caplog.records if "keeps no momentum" in r.getMessage()]
    assert said == ["spectralscope: momentum_sv and momentum_norm of param0 are NaN: torch.optim.SGD keeps no "
                    "momentum for it (warned once)"]
    assert tree.attrs["notes"]["momentum"].startswith("not recorded for param0")
    dw = (hist[1].double() - hist[0].double()).numpy()
    np.testing.assert_allclose(opt.update_rms.values[0, 0], np.sqrt(np.mean(dw**2)), rtol=1e-12)


def _train(model, steps, watch_path=None, every=1, **watch_kw):
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and n.startswith("blocks"))]
    muon = torch.optim.Muon(hidden, lr=0.05, momentum=0.95)
    adamw = torch.optim.AdamW(rest, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(muon, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    recs = []
    if watch_path is not None:
        recs = [ss.watch(muon, model, watch_path / "muon.zarr", overhead=None, every=every, **watch_kw),
                ss.watch(adamw, model, watch_path / "adamw.zarr", overhead=None, every=every, **watch_kw)]
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        x = torch.randn(32, 12, generator=gen)
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(muon)
        scaler.step(adamw)
        scaler.update()
        sched.step()
        muon.zero_grad()
        adamw.zero_grad()
        if step == steps // 2:  # checkpoint round trip in the middle of training
            muon.load_state_dict(copy.deepcopy(muon.state_dict()))
            adamw.load_state_dict(copy.deepcopy(adamw.state_dict()))
            scaler.load_state_dict(copy.deepcopy(scaler.state_dict()))
    for r in recs:
        r.close()
    return muon, adamw


@pytest.mark.parametrize("background", [False, True])
def test_training_is_bit_for_bit_unchanged(tmp_path, background):
    torch.manual_seed(0)
    a = Tiny()
    b = copy.deepcopy(a)
    torch.manual_seed(1)
    opt_a = _train(a, 8)
    rng_a = torch.get_rng_state()
    torch.manual_seed(1)
    opt_b = _train(b, 8, watch_path=tmp_path, background=background)
    rng_b = torch.get_rng_state()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert torch.equal(rng_a, rng_b)
    for oa, ob in zip(opt_a, opt_b, strict=True):
        sa, sb = oa.state_dict(), ob.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for k in sa["state"]:
            for key, v in sa["state"][k].items():
                assert torch.equal(v, sb["state"][k][key]) if isinstance(v, torch.Tensor) else v == sb["state"][k][key]
    tree = ss.open_run(tmp_path / "muon.zarr")
    assert tree["optimizer"].sizes["step"] == 8
    assert np.isfinite(tree["optimizer"].momentum_sv.values).all()


def test_background_records_equal_the_inline_ones(tmp_path):
    # the LR scheduler and the checkpoint round trip change the param groups right after a step, while the
    # worker may still be measuring it: it must see the copies taken at the step
    torch.manual_seed(0)
    a = Tiny()
    b = copy.deepcopy(a)
    torch.manual_seed(1)
    _train(a, 9, watch_path=tmp_path / "inline")
    torch.manual_seed(1)
    _train(b, 9, watch_path=tmp_path / "worker", background=True)
    for name in ("muon.zarr", "adamw.zarr"):
        ds_a = ss.open_run(tmp_path / "inline" / name)["optimizer"].dataset
        ds_b = ss.open_run(tmp_path / "worker" / name)["optimizer"].dataset
        assert ds_a.sizes["step"] == ds_b.sizes["step"] == 9
        np.testing.assert_array_equal(ds_a["step"].values, ds_b["step"].values)
        for var in ds_a.data_vars:
            np.testing.assert_array_equal(ds_a[var].values, ds_b[var].values, err_msg=f"{name} {var}")
        assert np.isfinite(ds_b["ns_out_sv"].values).all() == (name == "muon.zarr")
        act_a = ss.open_run(tmp_path / "inline" / name)["activations"].dataset
        act_b = ss.open_run(tmp_path / "worker" / name)["activations"].dataset
        assert act_b.sizes["step"] == 1 and np.isfinite(act_b["act_soft_rank"].values).all()
        for var in act_a.data_vars:  # summed and decomposed on the worker from the hooks' copies
            np.testing.assert_array_equal(act_a[var].values, act_b[var].values, err_msg=f"{name} {var}")


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_lagging_worker_measures_the_step_as_it_was(tmp_path, where):
    # the worker is held until two more changes of lr (as a scheduler makes) and a third step have happened
    def run(path, background):
        torch.manual_seed(0)
        model = Tiny()
        opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.05, weight_decay=0.1)
        rec = ss.watch(opt, model, path, overhead=None, every=1, background=background, activations=None)
        gate = threading.Event()
        if background == "thread":
            measure = rec.record.finisher.finish

            def held(*args, **kwargs):
                gate.wait()
                return measure(*args, **kwargs)

            rec.record.finisher.finish = held
        elif background == "process":
            assert process_of(rec).wait_ready(120)  # else the records wait for no one: measured inline while it starts
            pid = process_of(rec).proc.pid
            os.kill(pid, signal.SIGSTOP)
            gate.set = lambda: os.kill(pid, signal.SIGCONT)
        gen = torch.Generator().manual_seed(3)
        for step in range(4):
            model(torch.randn(8, 12, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            opt.param_groups[0]["lr"] *= 0.3
            if step == 1:
                gate.set()  # step 0 is being measured, step 1 waits in the queue
        rec.close()
        return ss.open_run(path)["optimizer"].dataset

    inline, worker = run(tmp_path / "a.zarr", False), run(tmp_path / "b.zarr", where)
    for var in inline.data_vars:
        np.testing.assert_array_equal(inline[var].values, worker[var].values, err_msg=var)


class _HostWaits(TorchFunctionMode):
    """Notes every call that makes the host wait for an accelerator (a value read back, a copy to the CPU, a
    linalg routine's status check) made from spectralscope's own code, with the line that made it. Torch
    function modes are per thread: only the thread that enters the mode is watched. On the CPU nothing
    waits, but the calls are the same ones that would on a GPU."""

    WAITS = frozenset({"item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__",
                       "__index__", "__array__", "equal", "allclose"})

    def __init__(self) -> None:
        super().__init__()
        import spectralscope.hooks

        self.ours = (Path(ss.__file__).parent, Path(spectralscope.hooks.__file__).parent)
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a).startswith("cpu") for a in (*args[1:], kwargs.get("device")))
        solver = name.startswith("linalg_") and name not in ("linalg_vector_norm", "linalg_matrix_norm")
        if name in self.WAITS or solver or to_host:
            frame = sys._getframe(1)
            while frame is not None:
                path = Path(frame.f_code.co_filename)
                if any(d in path.parents for d in self.ours):
                    self.calls.append(f"{name} at {path.name}:{frame.f_lineno}")
                    break
                frame = frame.f_back
        return func(*args, **kwargs)


@pytest.mark.parametrize("background", [False, True])
def test_background_leaves_no_host_wait_on_the_training_thread(tmp_path, background):
    # with background=True the hooks on the training thread only copy (optimizer inputs, activation rows)
    # and queue; inline, the same run reads values back (the control: the detector sees them)
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02, weight_decay=0.1)
    rec = ss.watch(opt, model, tmp_path / "r.zarr", overhead=None, every=1, background=background,
                   activations=ss.ActivationSpectra(every=2, max_tokens=24))
    gen = torch.Generator().manual_seed(3)
    with _HostWaits() as waits:
        for _ in range(4):
            model(torch.randn(8, 5, 12, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    rec.close()
    tree = ss.open_run(tmp_path / "r.zarr")
    assert tree["optimizer"].sizes["step"] == 4 and tree["activations"].sizes["step"] == 2
    assert (tree["activations"]["act_tokens"].values == 24).all()  # subsampled on the training thread
    if background:
        assert waits.calls == []
    else:
        assert len(waits.calls) > 20, waits.calls


@pytest.mark.parametrize("background", ["thread", True, "auto"])  # True, "auto" on the CPU: a worker process
def test_background_flush_waits_for_the_worker_and_close_stops_it(tmp_path, background):
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    rec = ss.watch(opt, model, tmp_path / "r.zarr", overhead=None, every=1, background=background, activations=None)
    for _ in range(6):
        model(torch.randn(8, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    rec.flush()
    assert ss.open_run(tmp_path / "r.zarr")["optimizer"].sizes["step"] == 6  # measured and committed
    if background == "thread":
        worker = thread_of(rec)
        assert process_of(rec) is None
        assert worker is not None and worker.is_alive() and worker is not threading.current_thread()
        rec.close()
        assert not worker.is_alive()
    else:
        child = process_of(rec).proc
        assert thread_of(rec) is None and child.poll() is None and child.pid != os.getpid()
        rec.close()
        assert not process_of(rec).alive
        worker_module.shutdown()  # else it stops by itself a minute after its last recorder
        assert child.returncode == 0
        assert not glob.glob(f"{worker_module._shm_dir()}/spectralscope-{os.getpid()}-*")  # no copies left behind
    for bad in ("yes", 1, "processes"):
        with pytest.raises(ValueError, match="background"):
            ss.watch(opt, model, tmp_path / "s.zarr", background=bad)
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="CPU only"):
        ss.watch(torch.optim.Muon([meta.weight], lr=0.01), None, tmp_path / "t.zarr", background="process")


def test_a_killed_worker_process_loses_the_records_in_flight_and_training_goes_on(tmp_path, caplog):
    torch.manual_seed(0)
    model = Tiny()
    plain = copy.deepcopy(model)
    opts = [torch.optim.Muon([p for p in m.parameters() if p.ndim == 2], lr=0.02) for m in (model, plain)]
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec = ss.watch(opts[0], model, tmp_path / "r.zarr", overhead=None, every=1, background=True,
                       activations=ss.ActivationSpectra(every=2, max_tokens=32))
        assert process_of(rec).wait_ready(120)
        gen = torch.Generator().manual_seed(3)
        for step in range(6):
            x = torch.randn(8, 12, generator=gen)
            for m, o in zip((model, plain), opts, strict=True):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad()
            if step == 1:
                rec.flush()
                os.kill(process_of(rec).proc.pid, signal.SIGSTOP)  # steps 2 (optimizer and activations) in flight
            if step == 2:
                os.kill(process_of(rec).proc.pid, signal.SIGKILL)
                process_of(rec).child.proc.wait()  # dead before step 3's record: that one is measured elsewhere
        rec.close()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    tree = ss.open_run(tmp_path / "r.zarr")
    assert list(tree["optimizer"].step.values) == [0, 1, 3, 4, 5]  # step 2 was lost with the process
    assert list(tree["activations"].step.values) == [0, 4]
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all()
    assert tree.attrs["errors"]["optimizer"] == {"*": 1} and tree.attrs["errors"]["act_eig"] == {"*": 1}
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "measuring process exited with code -9" in said and "on a worker thread from now on" in said
    assert process_of(rec) is None and thread_of(rec) is not None


def _auto_run(path, steps, on_step=None, **watch_kw):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    watch_kw.setdefault("overhead", None)  # compared step for step with an inline run
    rec = ss.watch(opt, model, path, every=1, activations=ss.ActivationSpectra(every=2, max_tokens=32), **watch_kw)
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        if on_step is not None:
            on_step(rec, step)
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    rec.close()
    return rec, ss.open_run(path)


def test_the_default_measures_in_a_worker_process_and_inline_while_it_starts(tmp_path):
    # a fresh child is held (SIGSTOP) before it has even imported torch: the first records are measured
    # inline and committed by flush() without it, so a run killed while the child starts loses no more
    # than an inline one (SPEC §5); once it runs, the records go to it. The rows are bit for bit the inline
    # ones although the per-layer state (refine hints, power-iteration vectors) moved between the two.
    worker_module.shutdown()
    held = {}

    def on_step(rec, step):
        if step == 0:
            assert process_of(rec) is not None and thread_of(rec) is None  # the default on the CPU: a process
            held["pid"] = pid = process_of(rec).proc.pid
            os.kill(pid, signal.SIGSTOP)
            assert not process_of(rec).ready, "the child cannot have imported torch within these milliseconds"
        if step == 3:
            rec.flush()  # steps 0–2 measured inline, committed while the child is still stopped
            held["committed"] = list(ss.open_run(rec.path)["optimizer"].step.values)
            held["activations"] = list(ss.open_run(rec.path)["activations"].step.values)
            assert process_of(rec)._setup is not None  # nothing was sent to it
            os.kill(held["pid"], signal.SIGCONT)
            assert process_of(rec).wait_ready(120)
        if step == 5:
            assert process_of(rec)._setup is None  # steps 3 and 4 went to the child

    rec, tree = _auto_run(tmp_path / "auto.zarr", 8, on_step)
    assert held["committed"] == [0, 1, 2] and held["activations"] == [0, 2]
    _, inline = _auto_run(tmp_path / "inline.zarr", 8, background=False)
    for group in ("optimizer", "activations"):
        a, b = inline[group].dataset, tree[group].dataset
        np.testing.assert_array_equal(a.step.values, b.step.values)
        for var in a.data_vars:
            np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=f"{group} {var}")
    assert rec.errors == {}


def test_the_worker_process_writes_the_groups_it_measures(tmp_path):
    # the training process's interpreter spends no time in Zarr for them: its writer lets go of the groups at
    # the first record the process takes; flush() and close() still commit everything
    def on_step(rec, step):
        if step == 0:
            assert process_of(rec).wait_ready(120)
            assert {"optimizer", "activations"} <= set(rec.writer._groups)
        if step == 2:
            assert not {"optimizer", "activations"} & set(rec.writer._groups)  # written by the child only
            assert set(rec.runner.handed) == {"optimizer", "activations"}
            rec.flush()
            assert list(ss.open_run(rec.path)["optimizer"].step.values) == [0, 1]

    rec, tree = _auto_run(tmp_path / "r.zarr", 6, on_step, flush_seconds=3600)
    assert list(tree["optimizer"].step.values) == list(range(6)) and rec.runner.child_closed
    assert list(tree["activations"].step.values) == [0, 2, 4]
    assert tree.attrs["status"] == "finished" and rec.errors == {}
    arrays = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["optimizer"]
    assert {arrays[name].shape[0] for name in arrays.array_keys() if name != "layer" and arrays[name].ndim > 0
            and arrays[name].metadata.dimension_names[0] == "step"} == {6}  # trimmed by the child's close


def test_a_killed_training_process_keeps_what_the_worker_process_measured(tmp_path):
    # SIGKILL to the training process: the child sees its socket close and commits the rows it has, so even
    # with a flush interval of an hour the measured steps survive (inline they would be lost with the process);
    # the two records still in flight when it died (the child was held) are measured and kept too
    import subprocess

    path = tmp_path / "killed.zarr"
    script = tmp_path / "train.py"
    script.write_text(f"""
import time, torch, spectralscope as ss
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3, bias=False))
opt = torch.optim.Muon(model.parameters(), lr=0.02)
rec = ss.watch(opt, model, {str(path)!r}, overhead=None, every=1, flush_seconds=3600, activations=None)
assert rec.runner.process.wait_ready(120)
import os, signal
for step in range(7):
    if step == 5:
        rec.runner.process.join()
        os.kill(rec.runner.process.proc.pid, signal.SIGSTOP)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step(); opt.zero_grad()
print("measured", rec.runner.process.proc.pid, flush=True)
time.sleep(600)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    line = proc.stdout.readline()
    assert line.startswith("measured"), proc.stderr.read() if proc.poll() is not None else line
    child = int(line.split()[1])
    proc.kill()
    proc.wait()
    os.kill(child, signal.SIGCONT)
    for _ in range(600):  # the child commits, then exits
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker process outlived its training process by a minute")
    tree = ss.open_run(path)
    assert tree.attrs["status"] == "running"
    assert list(tree["optimizer"].step.values) == [0, 1, 2, 3, 4, 5, 6]
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all()


def test_rows_a_dying_worker_process_had_not_committed_are_counted_lost(tmp_path, caplog):
    def on_step(rec, step):
        if step == 0:
            assert process_of(rec).wait_ready(120)
        if step == 3:
            process_of(rec).join()  # steps 0–2 measured, confirmed, not committed (flush interval: an hour)
            os.kill(process_of(rec).proc.pid, signal.SIGKILL)
            process_of(rec).child.proc.wait()

    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, tree = _auto_run(tmp_path / "r.zarr", 6, on_step, flush_seconds=3600)
    # steps 3–5 measured inline and written here again; the rows of steps 0–2 died with the process
    assert list(tree["optimizer"].step.values) == [3, 4, 5]
    assert list(tree["activations"].step.values) == [4]
    assert rec.errors == {"optimizer": {"*": 3}, "act_eig": {"*": 2}} == tree.attrs["errors"]
    assert "not yet committed when the measuring process died" in caplog.text


def test_auto_goes_on_inline_when_the_worker_process_dies(tmp_path, caplog):
    def on_step(rec, step):
        if step == 0:
            assert process_of(rec).wait_ready(120)
        if step == 3:
            rec.flush()
            os.kill(process_of(rec).proc.pid, signal.SIGKILL)
            process_of(rec).child.proc.wait()
            deadline = time.monotonic() + 60
            while process_of(rec).alive and time.monotonic() < deadline:  # until its answering thread has seen it
                time.sleep(0.01)

    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, tree = _auto_run(tmp_path / "r.zarr", 7, on_step)
    # the child died between records: nothing in flight, nothing lost, steps 3–6 measured inline
    assert list(tree["optimizer"].step.values) == list(range(7))
    assert list(tree["activations"].step.values) == [0, 2, 4, 6]
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all() and rec.errors == {}
    assert process_of(rec) is None and thread_of(rec) is None  # inline, not a thread that would contend for the GIL
    assert "exited with code -9; records are measured inline from now on" in caplog.text


def test_a_record_the_worker_process_cannot_take_is_measured_on_a_thread(tmp_path, caplog):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec = ss.watch(opt, model, tmp_path / "r.zarr", every=1, background=True, activations=None, overhead=None)
        assert process_of(rec).wait_ready(120)
        for step in range(4):
            if step == 1:  # step 1 stays in flight in a held child while steps 2 and 3 go to the thread
                rec.flush()
                pid = process_of(rec).proc.pid
                os.kill(pid, signal.SIGSTOP)
                threading.Timer(1.0, os.kill, args=(pid, signal.SIGCONT)).start()
            if step == 2:  # no room for the copies from now on: the shared-memory folder is gone
                process_of(rec)._dir = str(tmp_path / "gone")
            model(torch.randn(8, 12)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        rec.close()
    ds = ss.open_run(tmp_path / "r.zarr")["optimizer"].dataset
    # in step order although step 1's answer came last: the thread's records wait for the process's
    assert list(ds.step.values) == [0, 1, 2, 3] and np.isfinite(ds["momentum_sv"].values).all()
    assert rec.errors == {} and thread_of(rec) is not None  # steps 2 and 3 on the thread, nothing lost
    warned = [r.getMessage() for r in caplog.records if "could not hand the record" in r.getMessage()]
    assert len(warned) == 1 and "FileNotFoundError" in warned[0]


def test_a_worker_process_needs_functions_it_can_import(tmp_path, caplog):
    def ns(group):  # a local function: a fresh interpreter cannot import it
        return None

    class Mine(torch.optim.SGD):
        pass

    ss.register_adapter(Mine, lambda p, g, s: s.get("momentum_buffer"), ns=ns)
    model = Tiny()
    opt = Mine(model.parameters(), lr=0.01, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):  # said at once, not only in a debug log
        with ss.watch(opt, model, tmp_path / "r.zarr", every=1, background=True) as rec:
            for _ in range(3):
                model(torch.randn(8, 12)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    # the optimizer records on the thread; the activations, whose finisher the child can load, go to the child
    assert "optimizer" not in rec.runner.groups and "activations" in rec.runner.groups and thread_of(rec) is not None
    assert "optimizer records are finished on a worker thread, not in a worker process, and that costs training " \
           "time" in caplog.text and "in a module your script imports" in caplog.text
    assert np.isfinite(ss.open_run(tmp_path / "r.zarr")["optimizer"]["momentum_sv"].values).all()
    # the default ("auto") measures such records inline: a thread would contend with training for the GIL
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "auto.zarr", every=1) as rec:
            assert [i.defer for i in rec.instruments] == [True]  # the activations' hooks copy, for the child
            for _ in range(3):
                model(torch.randn(8, 12)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    assert "optimizer" not in rec.runner.groups and thread_of(rec) is None
    assert "optimizer records are finished inline, not in a worker process" in caplog.text
    tree = ss.open_run(tmp_path / "auto.zarr")
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all() and tree["activations"].sizes["step"] == 1


def test_close_removes_every_hook(tmp_path):
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    before = (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks))
    rec = ss.watch(opt, model, tmp_path / "r.zarr")
    assert len(opt._optimizer_step_pre_hooks) == len(before[0]) + 1
    assert len(opt._optimizer_step_post_hooks) == len(before[1]) + 1
    rec.close()
    assert (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)) == before
    rec.close()  # idempotent


def test_layer_names_kinds_depths(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    with ss.watch(opt, model, tmp_path / "r.zarr") as rec:
        names = [lay.name for lay in rec.layers]
    assert names == ["embed.weight", "blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.weight", "blocks.1.mlp.c_fc.weight",
                     "blocks.1.mlp.c_proj.weight", "head.weight"]
    ds = ss.open_run(tmp_path / "r.zarr")["optimizer"]
    assert list(ds.kind.values) == ["embed", "mlp_in", "mlp_out", "mlp_in", "mlp_out", "head"]
    np.testing.assert_array_equal(ds["depth"].values, [np.nan, 0, 0, 1, 1, np.nan])
    assert list(ds["rows"].values) == [16, 32, 16, 32, 16, 6] and list(ds["cols"].values) == [12, 16, 32, 16, 32, 16]
    with ss.watch(opt, model, tmp_path / "c.zarr", layers=r"c_proj") as rec:
        assert [lay.name for lay in rec.layers] == ["blocks.0.mlp.c_proj.weight", "blocks.1.mlp.c_proj.weight"]
    with ss.watch(opt, model, tmp_path / "d.zarr", layers=lambda n, p: p.shape[0] == 6) as rec:
        assert [lay.name for lay in rec.layers] == ["head.weight"]


def test_conv_weights_are_viewed_as_matrices(tmp_path):
    conv = nn.Conv2d(3, 8, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    with ss.watch(opt, conv, tmp_path / "r.zarr", every=1):
        conv(torch.randn(4, 3, 10, 10)).square().mean().backward()
        grad = conv.weight.grad.detach().reshape(8, -1).double().numpy()
        opt.step()
    ds = ss.open_run(tmp_path / "r.zarr")["optimizer"]
    assert list(ds.layer.values) == ["weight"] and int(ds["rows"][0]) == 8 and int(ds["cols"][0]) == 27
    sv = np.linalg.svd(grad, compute_uv=False)
    np.testing.assert_allclose(ds.momentum_sv.values[0, 0], np_quantile(sv / np.linalg.norm(grad), QS), rtol=1e-5)


class SignMomentum(torch.optim.Optimizer):
    """A custom optimizer: keeps its momentum under an unusual key and steps by its sign."""

    def __init__(self, params, lr=0.01, beta=0.8):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st.setdefault("avg", torch.zeros_like(p)).mul_(group["beta"]).add_(p.grad)
                p.add_(st["avg"].sign(), alpha=-group["lr"])


def test_register_adapter_for_a_custom_optimizer(tmp_path):
    ss.register_adapter(SignMomentum, momentum=lambda p, group, state: state.get("avg"), describe=("lr", "beta"))
    g = prescribed(20, 36, _grad_spectrum(20), seed=6)
    tree, _ = _one_param_step(tmp_path, lambda p: SignMomentum(p), [g])
    sv = np.linalg.svd(g.astype(np.float32).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(tree["optimizer"].momentum_sv.values[0, 0], np_quantile(sv / np.linalg.norm(sv), QS),
                               rtol=1e-5, atol=1e-6)
    assert tree.attrs["optimizer"] == [{"class": f"{__name__}.SignMomentum", "lr": 0.01, "beta": 0.8, "ns_steps": None,
                                        "ns_coefficients": None, "nesterov": None, "momentum": None}]


def test_every_and_scalars(tmp_path):
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    with ss.watch(opt, model, tmp_path / "r.zarr", overhead=None, every=3) as rec:
        for i in range(10):
            model(torch.randn(8, 12)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=torch.tensor(float(i)), lr=0.01)
            if i == 4:
                rec.log(extra=7.0)
    tree = ss.open_run(tmp_path / "r.zarr")
    assert list(tree["optimizer"].step.values) == [0, 3, 6, 9]
    sc = tree["scalars"]
    assert list(sc.step.values) == list(range(10))
    np.testing.assert_array_equal(sc.loss.values, np.arange(10.0))
    assert sc.extra.values[4] == 7.0 and np.isnan(np.delete(sc.extra.values, 4)).all()
    assert tree.attrs["status"] == "finished" and tree.attrs["steps"] == 10


def _nan_run(tmp_path, caplog, name, **watch_kw):
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec = ss.watch(opt, model, tmp_path / name, overhead=None, every=1, **watch_kw)
        for i in range(4):
            model(torch.randn(8, 12)).square().mean().backward()
            if i in (2, 3):  # the head's gradient: NaN reaches its weights only after the last forward
                model.head.weight.grad[0, 0] = float("nan")
            opt.step()  # must not raise
            opt.zero_grad()
        rec.close()
    return rec


@pytest.mark.parametrize("background", [False, True])
def test_nan_gradient_never_raises_and_is_counted_once_warned(tmp_path, caplog, background):
    rec = _nan_run(tmp_path, caplog, "r.zarr", background=background)
    tree = ss.open_run(tmp_path / "r.zarr")
    ds = tree["optimizer"]
    bad = "head.weight"
    assert np.isfinite(ds.momentum_sv.sel(layer=bad).values[:2]).all()
    assert np.isnan(ds.momentum_sv.sel(layer=bad).values[2:]).all()
    errors = tree.attrs["errors"]
    assert errors == rec.errors
    assert errors["momentum_sv"][bad] == 2 and errors["update_rms"][bad] == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("of head.weight is not finite" in m and m.startswith("spectralscope: momentum") for m in msgs) == 1
    # each (metric family, reason) is logged exactly once, then one summary at close
    families = [m.split("Later ")[1].split(" values for")[0] for m in msgs if "values for the same reason" in m]
    assert "momentum" in families and len(families) == len(set(families))
    assert sum("values recorded as NaN or lost" in m for m in msgs) == 1
    others = [n for n in ds.layer.values if n != bad]
    assert np.isfinite(ds.momentum_sv.sel(layer=others).values[:3]).all()  # step 3 sees NaN weights downstream


def test_diverging_run_never_raises(tmp_path, caplog):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e6, momentum=0.9)
    losses = []
    with caplog.at_level(logging.WARNING, logger="spectralscope"), ss.watch(opt, model, tmp_path / "r.zarr",
                                                                              overhead=None, every=1) as rec:
        for _ in range(12):
            loss = model(torch.randn(8, 12)).pow(4).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss)
            losses.append(loss.item())
    assert not np.isfinite(losses[-1])
    tree = ss.open_run(tmp_path / "r.zarr")
    assert tree["optimizer"].sizes["step"] == 12
    assert np.isnan(tree["optimizer"].momentum_sv.values[-1]).all()
    assert sum(sum(v.values()) for v in tree.attrs["errors"].values()) > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"every": 0}, "every"), ({"every": 1.5}, "every"), ({"quantiles": [0.5, 0.1]}, "quantiles"),
     ({"meta": {"x": object()}}, "meta"), ({"layers": 3}, "layers"), ({"flush_seconds": 0}, "flush_seconds"),
     ({"layers": "nothing-matches"}, "no parameter")],
)
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, match):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        ss.watch(opt, model, tmp_path / "r.zarr", **kwargs)
    with pytest.raises(ValueError, match="optimizer"):
        ss.watch("sgd", model, tmp_path / "r.zarr")


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    path = tmp_path / "r.zarr"

    def train(rec, n):
        for _ in range(n):
            model(torch.randn(8, 12)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=1.0)

    with ss.watch(opt, model, path, every=2) as rec:
        train(rec, 5)
    with pytest.raises(FileExistsError, match=str(path)):
        ss.watch(opt, model, path)
    with ss.watch(opt, model, path, every=2, resume=True) as rec:
        assert rec.step == 4
        train(rec, 5)
    tree = ss.open_run(path)
    assert list(tree["optimizer"].step.values) == [0, 2, 4, 6, 8]
    assert list(tree["scalars"].step.values) == list(range(10))
    other = torch.optim.Muon([model.blocks[0]["mlp"]["c_fc"].weight], lr=0.01)
    with pytest.raises(ValueError, match="layers differ"):
        ss.watch(other, model, path, every=2, resume=True)
    with ss.watch(opt, model, path, overwrite=True) as rec:
        train(rec, 1)
    assert ss.open_run(path)["optimizer"].sizes["step"] == 1


@pytest.mark.parametrize("background", [False, True])
def test_a_run_left_open_is_committed_when_the_interpreter_exits(tmp_path, background):
    # No close(): the exit hook must commit the tail before the thread pools Zarr writes through shut down
    # (and, with background=True, collect the worker process's answers first). The script is a file with
    # no `if __name__ == "__main__"` guard, as training scripts often are: the worker process must not
    # run it again (multiprocessing's spawn would).
    import subprocess
    import sys

    path = tmp_path / "open.zarr"
    script = tmp_path / "train.py"
    script.write_text(f"""
import torch, spectralscope as ss
print("script started", flush=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3, bias=False))
opt = torch.optim.Muon(model.parameters(), lr=0.02)
rec = ss.watch(opt, model, {str(path)!r}, overhead=None, every=1, flush_seconds=3600, activations=None,
               background={background})
proc = getattr(rec.runner, "process", None)
assert proc is None or proc.wait_ready(120)  # the records go to it, and its writer
for _ in range(7):
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step(); opt.zero_grad()
    rec.log(loss=1.0)
assert (getattr(rec.runner, "process", None) is not None) == {background}
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed" not in proc.stderr, proc.stderr
    assert proc.stdout.count("script started") == 1, proc.stdout
    tree = ss.open_run(path)
    assert tree.attrs["status"] == "finished"
    assert tree["optimizer"].sizes["step"] == 7 and tree["scalars"].sizes["step"] == 7
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all()


def test_an_optimizer_without_adapter_is_said_not_silently_nan(tmp_path, caplog):
    # a real third-party optimizer nobody registered: its momentum is NaN, and every reader is told why
    from pytorch_optimizer import Lion

    from spectralscope.cli import info_text
    from spectralscope.dashboards import data

    model = Tiny()
    opt = Lion(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "r.zarr", every=1, background=False) as rec:
            for _ in range(2):
                model(torch.randn(8, 12)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    warned = [r.getMessage() for r in caplog.records if "no adapter" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("spectralscope: no adapter for pytorch_optimizer.Lion: momentum_sv, momentum_norm, "
                                "ns_out_sv, ns_polar_err, ns_orth_err and ns_fail_frac will be NaN")
    assert "ss.register_adapter(Lion, momentum=" in warned[0]
    tree = ss.open_run(rec.path)
    assert tree.attrs["optimizer"][0]["class"] == "pytorch_optimizer.Lion"
    assert tree.attrs["notes"]["momentum"] == "not recorded (no adapter for pytorch_optimizer.Lion)"
    opt_ds = tree["optimizer"]
    assert np.isnan(opt_ds.momentum_sv.values).all() and np.isfinite(opt_ds.update_rms.values).all()
    assert "momentum: not recorded (no adapter for pytorch_optimizer.Lion)" in info_text(str(rec.path))
    row = data.overview(data.find_runs(tmp_path)).iloc[0]
    assert "momentum: not recorded (no adapter for pytorch_optimizer.Lion)" in row["notes"]


def test_a_failing_ns_configuration_blanks_only_what_depends_on_it(tmp_path):
    # ns_floor=2: no σ is lifted to 2 by the quintic, so ns_threshold raises; momentum_sv/momentum_norm stand
    model = Tiny()
    opt = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    with ss.watch(opt, model, tmp_path / "r.zarr", every=1, background=False, ns_floor=2.0) as rec:
        model(torch.randn(8, 12)).square().mean().backward()
        opt.step()
    ds = ss.open_run(rec.path)["optimizer"]
    assert np.isfinite(ds.momentum_sv.values).all() and np.isfinite(ds.momentum_norm.values).all()
    assert np.isnan(ds.ns_fail_frac.values).all() and np.isnan(ds.ns_out_sv.values).all()
    assert set(rec.errors) >= {"ns_fail_frac", "ns_out_sv"} and "momentum_sv" not in rec.errors

    class Broken(torch.optim.Muon):
        pass

    def broken_ns(group):
        raise KeyError("ns_steps")

    ss.register_adapter(Broken, momentum=lambda p, group, state: state.get("momentum_buffer"), ns=broken_ns)
    opt = Broken([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    with ss.watch(opt, model, tmp_path / "b.zarr", every=1, background=False) as rec:
        model(torch.randn(8, 12)).square().mean().backward()
        opt.step()
    ds = ss.open_run(rec.path)["optimizer"]
    assert np.isfinite(ds.momentum_sv.values).all() and np.isnan(ds.ns_fail_frac.values).all()
    assert "ns_fail_frac" in rec.errors and "momentum_sv" not in rec.errors


def test_a_diverged_deep_model_logs_a_line_per_family_and_reason_and_a_summary(tmp_path, caplog):
    # 14 layers go NaN at step 1 and stay so: hundreds of NaN values, a handful of lines
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(14)])
    opt = torch.optim.Muon([m.weight for m in model], lr=0.01)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "r.zarr", every=1, background=False,
                      activations=ss.ActivationSpectra(every=1)) as rec:
            for i in range(4):
                model(torch.randn(8, 16)).square().mean().backward()
                if i == 1:
                    for m in model:
                        m.weight.grad.fill_(float("nan"))
                opt.step()
                opt.zero_grad()
    lines = [r.getMessage() for r in caplog.records if "spectralscope health:" not in r.getMessage()]
    # the health rules say the divergence too: one critical non_finite alert per layer (and none other)
    alarms = [r.getMessage() for r in caplog.records if "spectralscope health:" in r.getMessage()]
    assert alarms and all(a.startswith("spectralscope health: critical non_finite started") for a in alarms)
    assert {a.split(" started ")[1].split(" at step ")[0] for a in alarms} == {f"{i}.weight" for i in range(14)}
    counted = sum(sum(per.values()) for per in rec.errors.values())
    assert counted > 200
    per_family = [ln for ln in lines if "values for the same reason are only counted" in ln]
    keys = {ln.split("Later ")[1].split(" values for the same reason")[0] for ln in per_family}
    assert len(per_family) == len(keys) <= 5 and keys >= {"momentum", "update", "activations"}
    summary = [ln for ln in lines if "values recorded as NaN or lost" in ln]
    assert len(summary) == 1 and len(lines) == len(per_family) + 1
    assert summary[0].startswith(f"spectralscope: {rec.path}: {counted} values recorded as NaN or lost: ")
    assert "momentum " in summary[0] and "(14 layers)" in summary[0]


def muon_and_adamw() -> tuple[nn.Module, torch.optim.Muon, torch.optim.AdamW]:
    """The split people train with: the hidden matrices under Muon, the embedding and the head under AdamW."""
    torch.manual_seed(0)
    model = Tiny()
    hidden = [b["mlp"][k].weight for b in model.blocks for k in ("c_fc", "c_proj")]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return model, torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)


@pytest.mark.parametrize("order", ["muon first", "adamw first"])
def test_several_optimizers_are_recorded_into_one_store(tmp_path, order):
    # the hidden matrices with Muon, the embedding and the head with AdamW, as people train: one row per step
    # holds every matrix, the layer coordinate optimizer says whose each is, whatever order they step in
    model, muon, adamw = muon_and_adamw()
    g = torch.Generator().manual_seed(1)
    background = False if order == "muon first" else "auto"  # inline, and the worker process
    with ss.watch([muon, adamw], model, tmp_path / "two.zarr", every=2, background=background) as rec:
        for _ in range(5):
            model(torch.randn(8, 12, generator=g)).square().mean().backward()
            for opt in ((muon, adamw) if order == "muon first" else (adamw, muon)):
                opt.step()
            muon.zero_grad()
            adamw.zero_grad()
            rec.log(loss=1.0)
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset
    assert list(ds["step"].values) == [0, 2, 4] and list(tree["scalars"]["step"].values) == list(range(5))
    whose = dict(zip(ds["layer"].values, ds["optimizer"].values, strict=True))
    assert whose == {"blocks.0.mlp.c_fc.weight": "torch.optim.Muon", "blocks.0.mlp.c_proj.weight": "torch.optim.Muon",
                     "blocks.1.mlp.c_fc.weight": "torch.optim.Muon", "blocks.1.mlp.c_proj.weight": "torch.optim.Muon",
                     "embed.weight": "torch.optim.AdamW", "head.weight": "torch.optim.AdamW"}
    assert [o["class"] for o in tree.attrs["optimizer"]] == ["torch.optim.Muon", "torch.optim.AdamW"]
    assert np.isfinite(ds["momentum_sv"].values).all() and np.isfinite(ds["update_rms"].values).all()
    muon_layers = [n for n, o in whose.items() if o == "torch.optim.Muon"]
    assert (ds["ns_consistency"].sel(layer=muon_layers).values > 1 - 1e-9).all()
    assert np.isnan(ds["ns_out_sv"].sel(layer=["embed.weight", "head.weight"]).values).all()
    assert "the layers of torch.optim.AdamW: not applicable" in tree.attrs["notes"]["newton_schulz"]
    # AdamW's momentum is its exp_avg at the last recorded step
    sv = np.linalg.svd(adamw.state[model.head.weight]["exp_avg"].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(ds["momentum_sv"].sel(layer="head.weight").values[-1],
                               np_quantile(sv / np.linalg.norm(sv), QS), rtol=1e-9)
    assert rec.errors == {}


@pytest.mark.parametrize("order", ["muon first", "adamw first"])
def test_a_step_one_optimizer_skipped_is_given_up_and_said(tmp_path, order, caplog):
    # a GradScaler skips optimizers one by one: the step AdamW skipped must not be completed with its next
    # step's tensors, later steps stay aligned, and the lost row is counted with its cause
    model, muon, adamw = muon_and_adamw()
    g = torch.Generator().manual_seed(1)
    head_after = {}
    with caplog.at_level(logging.WARNING, "spectralscope"), \
            ss.watch([muon, adamw], model, tmp_path / "skip.zarr", overhead=None, every=2, background=False) as rec:
        for step in range(7):
            model(torch.randn(8, 12, generator=g)).square().mean().backward()
            for opt in ((muon, adamw) if order == "muon first" else (adamw, muon)):
                if not (opt is adamw and step in (2, 6)):
                    opt.step()
            head_after[step] = model.head.weight.detach().double().clone()
            muon.zero_grad()
            adamw.zero_grad()
    ds = ss.open_run(rec.path)["optimizer"].dataset
    assert list(ds["step"].values) == [0, 4]
    # step 4's head row is AdamW's step 4 (its W_after), not a neighbour's
    norm = np.linalg.norm(head_after[4].numpy(), 2)
    np.testing.assert_allclose(ds["weight_spectral_norm"].sel(layer="head.weight").values[-1], norm, rtol=1e-6)
    assert rec.errors["optimizer"]["*"] == 2  # step 2 at once, step 6 at close
    assert "not every watched optimizer stepped in it" in caplog.text


class GradConsumingMuon(torch.optim.Muon):
    """Muon that clears each gradient as it steps, as heavyball's optimizers do (consume_grad=True)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        return loss


def test_an_optimizer_that_clears_grads_as_it_steps_still_counts_as_stepped(tmp_path):
    # "stepped" is whether the parameter had a gradient as the step began, not after it: the self-check and the
    # momentum note must not go quiet for optimizers that consume gradients
    torch.manual_seed(0)
    model = Tiny()
    opt = GradConsumingMuon([p for p in model.parameters() if p.ndim == 2], lr=0.02, nesterov=False)
    g = torch.Generator().manual_seed(1)
    with ss.watch(opt, model, tmp_path / "c.zarr", background=False) as rec:
        for _ in range(3):
            model(torch.randn(8, 12, generator=g)).square().mean().backward()
            opt.step()
            assert all(p.grad is None for group in opt.param_groups for p in group["params"])
    ds = ss.open_run(rec.path)["optimizer"].dataset
    assert (ds["ns_consistency"].values > 1 - 1e-6).all()
    assert np.isfinite(ds["momentum_sv"].values).all() and rec.errors == {}


class HandStepped:
    """An optimizer that is not a torch.optim.Optimizer (as modded-nanogpt's are): param_groups, state and step(),
    with no step hooks. Its rule: buf ← μ·buf + g, W ← W − lr·buf."""

    def __init__(self, params, lr=0.05, momentum=0.9):
        self.param_groups = [{"params": list(params), "lr": lr, "momentum": momentum}]
        self.defaults = {"lr": lr, "momentum": momentum}
        self.state: dict = {}

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    buf = self.state.setdefault(p, {}).setdefault("buf", torch.zeros_like(p))
                    buf.mul_(g["momentum"]).add_(p.grad)
                    p.add_(buf, alpha=-g["lr"])

    def zero_grad(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None


@pytest.mark.parametrize("background", [False, True])
def test_an_optimizer_without_step_hooks_is_recorded_through_stepping(tmp_path, caplog, background):
    ss.register_adapter(HandStepped, lambda p, g, s: s.get("buf"), describe=("lr", "momentum"))
    torch.manual_seed(0)
    model = Tiny()
    opt = HandStepped(model.parameters())
    bufs, deltas = {}, {}
    with ss.watch(opt, model, tmp_path / "h.zarr", every=1, background=background) as rec:
        for step in range(3):
            model(torch.randn(8, 12)).square().mean().backward()
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            with rec.stepping():
                opt.step()
            opt.zero_grad()
            bufs[step] = {n: opt.state[p]["buf"].double().clone() for n, p in model.named_parameters()}
            deltas[step] = {n: p.detach().double() - before[n] for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match="not one this recorder watches"):
            with rec.stepping(torch.optim.SGD(model.parameters(), lr=0.1)):
                pass
    ds = ss.open_run(tmp_path / "h.zarr")["optimizer"].dataset
    assert list(ds["step"].values) == [0, 1, 2] and rec.errors == {}
    for step in range(3):
        for j, name in enumerate(ds["layer"].values):
            sv = np.linalg.svd(bufs[step][name].numpy(), compute_uv=False)
            np.testing.assert_allclose(ds["momentum_sv"].values[step, j], np_quantile(sv / np.linalg.norm(sv), QS),
                                       rtol=1e-9, atol=1e-12)
            d = deltas[step][name].numpy()
            np.testing.assert_allclose(ds["update_rms"].values[step, j], np.sqrt(np.mean(d ** 2)), rtol=1e-9)


def test_a_users_adapter_can_switch_newton_schulz_per_parameter_with_settings(tmp_path):
    # an optimizer that marks in each parameter's state whether it is orthogonalised (as Moonlight's does)
    class Marked(HandStepped):
        pass

    def settings(p, group, state):
        return {**group, "orthogonal": state.get("orthogonal", False)}

    ss.register_adapter(Marked, lambda p, g, s: s.get("buf"),
                        ns=lambda group: ss.NSConfig(steps=5) if group["orthogonal"] else None, settings=settings)
    torch.manual_seed(0)
    model = Tiny()
    opt = Marked(model.parameters())
    opt.state[model.head.weight] = {"orthogonal": True}
    with ss.watch(opt, model, tmp_path / "s.zarr", every=1, background=False) as rec:
        for _ in range(2):
            model(torch.randn(8, 12)).square().mean().backward()
            with rec.stepping():
                opt.step()
            opt.zero_grad()
    tree = ss.open_run(tmp_path / "s.zarr")
    ns_out = tree["optimizer"]["ns_out_sv"]
    assert np.isfinite(ns_out.sel(layer="head.weight").values).all()
    assert np.isnan(ns_out.sel(layer="embed.weight").values).all()
    assert "not applicable to 9 of 10 parameters" in tree.attrs["notes"]["newton_schulz"]


def test_stepping_is_refused_for_a_hooked_optimizer_and_its_absence_is_said(tmp_path, caplog):
    model = Tiny()
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ss.watch(torch_opt, model, tmp_path / "t.zarr") as rec:
        with pytest.raises(ValueError, match="has torch's step hooks"):
            with rec.stepping():
                pass
    ss.register_adapter(HandStepped, lambda p, g, s: s.get("buf"))
    opt = HandStepped(model.parameters())
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        with ss.watch(opt, model, tmp_path / "n.zarr", background=False):
            model(torch.randn(8, 12)).square().mean().backward()
            opt.step()  # not through rec.stepping()
    assert "none of its steps went through rec.stepping()" in caplog.text
    with pytest.raises(ValueError, match="or an object with param_groups, state and step"):
        ss.watch(object(), model, tmp_path / "x.zarr")
