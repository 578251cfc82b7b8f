"""Under torch.distributed only rank 0 writes, and what it writes equals a single-process run on the full
batch; a failure to open the store on rank 0 fails every rank instead of hanging them; resume keeps the
ranks' step counts aligned. Two real gloo processes (torch.multiprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import in_group
from torch import nn

import spectralscope as ss


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32, bias=False), nn.Tanh(), nn.Linear(32, 24, bias=False), nn.Tanh(),
                         nn.Linear(24, 6, bias=False))


def _batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 5, 10, generator=g) for _ in range(steps)]


def _train(model, wrapped, path, batches, rank=0, world=1, named=None, **kw):
    """Train ``wrapped`` (the model or its DDP wrapper); ``watch`` names layers after ``named`` (default
    ``wrapped``)."""
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    with ss.watch(opt, named or wrapped, path, overhead=None, every=1, activations=ss.ActivationSpectra(every=2),
                  **kw) as rec:
        for x in batches:
            part = x.chunk(world)[rank]
            wrapped(part).square().mean().backward()
            opt.step()
            opt.zero_grad()
    return rec


def _ddp_worker(rank: int, world: int, out: str) -> None:
    model = _model()
    # a path per rank, so that anything rank 1 wrote would show
    _train(model, nn.parallel.DistributedDataParallel(model), f"{out}/rank{rank}.zarr", _batches(4), rank, world)


def _budget_worker(rank: int, world: int, out: str) -> None:
    import json

    from spectralscope import budget

    # rank 1 on its own would never end a window, rank 0 would at every decision step (a tiny budget: stretched
    # each time): only rank 0's decisions, taken by both, keep their records (and the activations' all-reduce) in step
    budget.MIN_WINDOW_SECONDS = 0.0 if rank == 0 else 1e9
    model = _model()
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    seen = []
    with ss.watch(opt, wrapped, f"{out}/rank{rank}.zarr", every=1, overhead=1e-6,
                  activations=ss.ActivationSpectra(every=2)) as rec:
        for x in _batches(40):
            wrapped(x.chunk(world)[rank]).square().mean().backward()
            opt.step()
            opt.zero_grad()
            seen.append([obj.every for obj in rec._all()])
    with open(f"{out}/cadence{rank}.json", "w") as f:
        json.dump({"seen": seen, "stretch": rec.budget.stretch}, f)


@pytest.mark.slow
def test_under_a_budget_every_rank_takes_rank_0s_cadence(tmp_path):
    import json

    mp.spawn(in_group, args=(_budget_worker, 2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"cadence{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stretch"] > 1 and ranks[0] == ranks[1]
    steps = ss.open_run(tmp_path / "rank0.zarr")["optimizer"]["step"].values
    assert len(steps) < 40 and ss.open_run(tmp_path / "rank0.zarr").attrs["overhead"]["stretch"] == ranks[0]["stretch"]


@pytest.mark.slow
def test_only_rank_0_writes_what_a_single_process_records(tmp_path):
    mp.spawn(in_group, args=(_ddp_worker, 2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    shared = tmp_path / "rank0.zarr"
    model = _model()
    _train(model, model, tmp_path / "single.zarr", _batches(4))
    got, ref = ss.open_run(shared), ss.open_run(tmp_path / "single.zarr")
    assert got.attrs["status"] == "finished" and got.attrs["steps"] == 4
    opt, opt_ref = got["optimizer"].dataset, ref["optimizer"].dataset
    assert [n.removeprefix("module.") for n in opt["layer"].values.tolist()] == opt_ref["layer"].values.tolist()
    np.testing.assert_array_equal(opt["step"].values, [0, 1, 2, 3])
    # step 0: identical weights; the DDP gradient is a float32 average of two halves, the single process's a
    # mean over the whole batch — equal to float32 rounding. Later steps carry bf16 Newton–Schulz rounding.
    # (momentum_sv is σ/‖M‖_F: float32 rounding of the gradient moves every value by up to ~1e-7 absolute)
    for var in ("momentum_sv", "momentum_norm", "weight_spectral_norm"):
        np.testing.assert_allclose(opt[var].values[0], opt_ref[var].values[0], rtol=1e-5, atol=1e-6)
    for var in ("ns_out_sv", "update_sv", "neuron_norm", "momentum_sv"):
        np.testing.assert_allclose(opt[var].values, opt_ref[var].values, rtol=2e-2, atol=1e-6)
    act, act_ref = got["activations"].dataset, ref["activations"].dataset
    np.testing.assert_array_equal(act["step"].values, [0, 2])
    assert (act["act_tokens"].values == 40).all()  # both ranks' 20 tokens: the full batch
    np.testing.assert_allclose(act["act_eig"].values[0], act_ref["act_eig"].values[0], rtol=1e-9, atol=1e-12)
    assert not (tmp_path / "rank1.zarr").exists(), "rank 1 must not write"


def _exists_worker(rank: int, world: int, path: str, out: str) -> None:
    opt = torch.optim.Muon(_model().parameters(), lr=0.02)
    try:
        ss.watch(opt, None, path)
        outcome = "opened"
    except (FileExistsError, RuntimeError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(outcome)


@pytest.mark.slow
def test_a_store_rank_0_cannot_open_fails_every_rank_without_hanging(tmp_path):
    path = tmp_path / "taken.zarr"
    ss.watch(torch.optim.Muon(_model().parameters()), None, path).close()
    mp.spawn(in_group, args=(_exists_worker, 2, f"file://{tmp_path}/init", str(path), str(tmp_path)), nprocs=2,
             join=True)
    assert (tmp_path / "rank0.txt").read_text().startswith("FileExistsError")
    assert (tmp_path / "rank1.txt").read_text().startswith("RuntimeError: watch(): rank 0 could not open")


def _resume_worker(rank: int, world: int, path: str, out: str) -> None:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    # named after the inner model, as the single-process run that started the store
    rec = _train(model, ddp, path, _batches(3), rank, world, named=model, resume=True)
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(str(rec.step))


@pytest.mark.slow
def test_resume_aligns_every_ranks_step_count(tmp_path):
    path = tmp_path / "run.zarr"
    model = _model()
    _train(model, model, path, _batches(5))  # steps 0–4 on disk; rank 1 has no store to read them from
    mp.spawn(in_group, args=(_resume_worker, 2, f"file://{tmp_path}/init", str(path), str(tmp_path)), nprocs=2,
             join=True)
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text() == "7"
    ds = ss.open_run(path)["optimizer"].dataset
    np.testing.assert_array_equal(ds["step"].values, np.arange(8))
    # activations every 2 steps: the resumed ranks agreed on steps 6 (and would have hung on a mismatch)
    np.testing.assert_array_equal(ss.open_run(path)["activations"].dataset["step"].values, [0, 2, 4, 6])


def _spawn(fn, args, timeout: float = 180.0) -> None:
    """mp.spawn with a deadline: a collective that hangs fails the test instead of stalling the suite."""
    import time

    ctx = mp.spawn(in_group, args=(fn, *args), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {timeout:.0f} s: a collective hung")


def _fsdp_model() -> nn.Module:
    torch.manual_seed(0)  # odd widths: FSDP2's shards of dim 0 are uneven (17 + 16 rows, 4 + 3 …)
    return nn.Sequential(nn.Linear(10, 33, bias=False), nn.Tanh(), nn.Linear(33, 24, bias=False), nn.Tanh(),
                         nn.Linear(24, 7, bias=False))


def _fsdp_worker(rank: int, world: int, out: str, nan_step: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _fsdp_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    weights = [model[i].weight for i in (0, 2, 4)]
    with ss.watch(opt, model, f"{out}/rank{rank}.zarr", overhead=None, every=1, activations=None):
        for step, x in enumerate(_batches(4)):
            model(x.chunk(world)[rank]).square().mean().backward()
            if step == nan_step and rank == 1:  # one rank's shard of one gradient turns NaN
                model[2].weight.grad.to_local().fill_(float("nan"))
            before = [w.detach().full_tensor() for w in weights]
            opt.step()
            # the full matrices of this step, for the test's float64 reference (M as Muon forms it)
            full = {}
            for i, (w, w0) in enumerate(zip(weights, before, strict=True)):
                m = w.grad.lerp(opt.state[w]["momentum_buffer"], opt.param_groups[0]["momentum"])
                full.update({f"m{i}": m.detach().full_tensor().numpy(), f"w0_{i}": w0.numpy(),
                             f"w1_{i}": w.detach().full_tensor().numpy()})
            if rank == 0:
                np.savez(f"{out}/full{step}.npz", **full)
            opt.zero_grad()


@pytest.mark.slow
def test_fsdp2_spectra_are_those_of_the_full_matrices(tmp_path):
    from conftest import np_quantile

    from spectralscope.adapters import muon_lr_ratio
    from spectralscope.spectra import DEFAULT_QUANTILES as QS

    _spawn(_fsdp_worker, (2, f"file://{tmp_path}/init", str(tmp_path), -1))
    assert not (tmp_path / "rank1.zarr").exists(), "rank 1 must not write"
    ds = ss.open_run(tmp_path / "rank0.zarr")["optimizer"].dataset
    assert ds["layer"].values.tolist() == ["0.weight", "2.weight", "4.weight"]
    np.testing.assert_array_equal(ds["step"].values, [0, 1, 2, 3])
    lr, wd = 0.02, 0.1  # Muon's defaults but lr
    # float64 numpy on the full matrices the worker saved (a shard's spectrum would differ grossly)
    for step in range(4):
        full = np.load(tmp_path / f"full{step}.npz")
        for i in range(3):
            m, w0, w1 = (full[k].astype(np.float64) for k in (f"m{i}", f"w0_{i}", f"w1_{i}"))
            sv = np.linalg.svd(m, compute_uv=False)
            np.testing.assert_allclose(ds["momentum_sv"].values[step, i], np_quantile(sv / np.linalg.norm(m), QS),
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(ds["update_sv"].values[step, i],
                                       np_quantile(np.linalg.svd(w1 - w0, compute_uv=False), QS), rtol=1e-9, atol=1e-15)
            assert ds["weight_spectral_norm"].values[step, i] == pytest.approx(np.linalg.norm(w1, 2), rel=1e-9)
            # O as Muon applied it: (W0·(1 − lr·wd) − W1)/(lr·ratio) on the bf16 grid
            decayed = (torch.from_numpy(full[f"w0_{i}"]) * (1 - lr * wd)).double().numpy()
            o = torch.from_numpy((decayed - w1) / (lr * muon_lr_ratio(None, w1.shape))).bfloat16().double().numpy()
            np.testing.assert_allclose(ds["ns_out_sv"].values[step, i],
                                       np_quantile(np.linalg.svd(o, compute_uv=False), QS), rtol=1e-9, atol=1e-12)
    # and against a single process on the full batch: the step-0 momentum agrees to float32 rounding of the
    # averaged gradient (later steps differ at bf16 level: Muon runs Newton–Schulz on the sharded DTensors)
    model = _fsdp_model()
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    with ss.watch(opt, model, tmp_path / "single.zarr", overhead=None, every=1, activations=None):
        model(_batches(1)[0]).square().mean().backward()
        opt.step()
    ref = ss.open_run(tmp_path / "single.zarr")["optimizer"].dataset
    for var in ("momentum_sv", "momentum_norm"):
        np.testing.assert_allclose(ds[var].values[0], ref[var].values[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_a_nan_on_one_rank_never_hangs_the_others(tmp_path):
    _spawn(_fsdp_worker, (2, f"file://{tmp_path}/init", str(tmp_path), 2), timeout=120)
    tree = ss.open_run(tmp_path / "rank0.zarr")
    ds = tree["optimizer"].dataset
    np.testing.assert_array_equal(ds["step"].values, [0, 1, 2, 3])
    layer = ds["layer"].values.tolist().index("2.weight")
    assert np.isfinite(ds["momentum_sv"].values[:2, layer]).all()
    assert np.isnan(ds["momentum_sv"].values[2, layer]).all()  # the NaN reached the full matrix, measured as NaN
    assert np.isfinite(ds["momentum_sv"].values[2, 0]).all()  # the other layers are unaffected at that step
    assert tree.attrs["errors"]["momentum_sv"]["2.weight"] >= 1
