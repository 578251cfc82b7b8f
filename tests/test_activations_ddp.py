"""Under DDP the activation statistics are summed over ranks before the eigendecomposition: each rank's
record equals the single-process record on the full batch. Two real gloo processes."""

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
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 6))


def _batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 5, 10, generator=g) for _ in range(steps)]


def sign_of_first_feature(args, kwargs):
    """Token "ids" for a float input: 1 where the first feature is positive, else 0."""
    return (args[0][..., 0] > 0).long()


def _train(model, wrapped, path, batches, rank=0, world=1, buckets=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    acts = (ss.ActivationSpectra(every=1, buckets={"neg": [0], "pos": [1]}, tokens=sign_of_first_feature) if buckets
            else ss.ActivationSpectra(every=1))
    with ss.watch(opt, wrapped, path, every=1, activations=acts):
        for x in batches:
            part = x.chunk(world)[rank]
            wrapped(part).square().mean().backward()
            opt.step()
            opt.zero_grad()


def _worker(rank: int, world: int, out: str, buckets: bool) -> None:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(model, ddp, f"{out}/rank{rank}.zarr", _batches(3), rank, world, buckets)


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [False, True])  # True: each token-frequency bucket is summed over the ranks too
def test_ddp_record_equals_single_process_on_the_full_batch(tmp_path, buckets):
    mp.spawn(in_group, args=(_worker, 2, f"file://{tmp_path}/init", str(tmp_path), buckets), nprocs=2, join=True)
    model = _model()
    _train(model, model, tmp_path / "single.zarr", _batches(3), buckets=buckets)
    ref = ss.open_run(tmp_path / "single.zarr")["activations"].dataset
    assert not (tmp_path / "rank1.zarr").exists()  # only rank 0 writes (the sum is taken on every rank)
    for rank in range(1):
        ds = ss.open_run(tmp_path / f"rank{rank}.zarr")["activations"].dataset
        assert [m.removeprefix("module.") for m in ds["module"].values.tolist()] == ref["module"].values.tolist()
        np.testing.assert_array_equal(ds["act_tokens"].values, ref["act_tokens"].values)  # 40 tokens: the full batch
        if buckets:
            assert list(ds["bucket"].values) == ["all", "neg", "pos"]
            tokens = ref["act_tokens"].values
            assert (tokens[:, :, 0] == 40).all() and (tokens[:, :, 1] + tokens[:, :, 2] == 40).all()
            assert (tokens[:, :, 1] > 2).all() and (tokens[:, :, 2] > 2).all()
        else:
            assert (ref["act_tokens"].values == 40).all()
        for var in ("act_eig", "act_soft_rank", "act_hard_rank", "act_top10_share"):
            # step 0 sees identical weights: equal to float64 rounding
            np.testing.assert_allclose(ds[var].values[0], ref[var].values[0], rtol=1e-9, atol=1e-12)
            # later steps: DDP averages float32 gradients across ranks, the single process takes the mean over
            # the full batch; the weights, and so the second layer's inputs, differ in the last float32 bits
            np.testing.assert_allclose(ds[var].values[1:], ref[var].values[1:], rtol=1e-5, atol=1e-9)
