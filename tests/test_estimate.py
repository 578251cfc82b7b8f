"""SLQ spectrum estimates: every bracket holds the float64 numpy quantile, the recorded value lies inside it,
the brackets are useful, the cost model picks the route, and the recorder writes the method and bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr

import spectralscope as ss
from spectralscope.estimate import (
    EXACT_MAX,
    choose_method,
    quantile_bracket,
    representative_spectrum,
    sampling_error,
    slq,
    slq_cost,
)
from spectralscope.measure import ESTIMATE_BOUNDS
from spectralscope.spectra import DEFAULT_QUANTILES, quantiles, route_costs

LEVELS = np.linspace(0.0, 1.0, 201)


def prescribed(m: int, n: int, s: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


def spectrum(kind: str, r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    if kind == "power_law":  # heavy tail, as Muon's momentum
        return np.arange(1, r + 1) ** -0.8
    if kind == "marchenko_pastur":
        return np.linalg.svd(rng.standard_normal((r, 3 * r)), compute_uv=False)
    if kind == "low_rank":  # Lanczos finds an invariant subspace: the quadrature is exact
        return np.r_[np.linspace(3.0, 1.0, 7), np.zeros(r - 7)]
    if kind == "two_atoms":
        return np.r_[np.full(r // 3, 1.0), np.full(r - r // 3, 0.1)]
    if kind == "outliers":  # a bulk and a few spikes far above it
        return np.r_[[50.0, 20.0, 10.0], rng.uniform(0.5, 1.5, r - 3)]
    if kind == "wide_range":  # log-uniform over 12 decades
        return 10.0 ** rng.uniform(-12, 0, r)
    raise ValueError(kind)


KINDS = ["power_law", "marchenko_pastur", "low_rank", "two_atoms", "outliers", "wide_range"]
SHAPES = [(300, 900), (900, 300), (500, 500)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bracket_holds_numpy_quantile_at_every_level(kind, shape):
    m, n = shape
    r = min(shape)
    for seed in range(3):
        a = prescribed(m, n, spectrum(kind, r, seed), seed)
        true = np.linalg.svd(a, compute_uv=False)
        est = slq(torch.from_numpy(a), steps=32, generator=torch.Generator().manual_seed(seed))
        lo, hi = (x.numpy() for x in quantile_bracket(est, LEVELS.tolist()))
        q = np.quantile(true, LEVELS)
        assert (lo <= q).all() and (q <= hi).all(), (kind, shape, seed, np.flatnonzero((lo > q) | (q > hi)))
        rep = quantiles(representative_spectrum(est), LEVELS.tolist()).numpy()
        assert (lo <= rep).all() and (rep <= hi).all()


def test_bracket_scale_and_float32_input():
    a = prescribed(400, 700, spectrum("marchenko_pastur", 400, 1), 1)
    true = np.linalg.svd(a.astype(np.float32).astype(np.float64), compute_uv=False)
    est = slq(torch.from_numpy(a).float(), generator=torch.Generator().manual_seed(5))
    scale = float(np.linalg.norm(a.astype(np.float32)))
    lo, hi = quantile_bracket(est, list(DEFAULT_QUANTILES), scale)
    q = np.quantile(true / scale, DEFAULT_QUANTILES)
    assert (lo.numpy() <= q).all() and (q <= hi.numpy()).all()


def test_the_shift_and_the_sampling_term_are_needed():
    """Without the one-node shift and the sampling term t, the plain quadrature quantile misses the truth:
    the bracket's two ingredients are not decoration."""
    misses = 0
    for seed in range(4):
        a = prescribed(300, 900, spectrum("power_law", 300, seed), seed)
        q = np.quantile(np.linalg.svd(a, compute_uv=False), LEVELS)
        est = slq(torch.from_numpy(a), n_vectors=1, steps=8, generator=torch.Generator().manual_seed(seed))
        rep = quantiles(representative_spectrum(est), LEVELS.tolist()).numpy()
        misses += int(np.sum(~np.isclose(rep, q, rtol=1e-3)))
        lo, hi = quantile_bracket(est, LEVELS.tolist())
        assert (lo.numpy() <= q).all() and (q <= hi.numpy()).all()  # still holds at 1 vector, 8 steps
    assert misses > 100


def test_brackets_are_useful_on_a_large_bulk():
    """At r = 1,500 with the defaults: median bracket within ±12% of the value, recorded quantiles of the
    Marchenko–Pastur bulk within 2% of σ_max, σ_max to 1e-6."""
    r = 1500
    a = prescribed(r, 2 * r, spectrum("marchenko_pastur", r, 0), 0)
    true = np.linalg.svd(a, compute_uv=False)
    est = slq(torch.from_numpy(a), generator=torch.Generator().manual_seed(0))
    q = np.quantile(true, DEFAULT_QUANTILES)
    lo, hi = (x.numpy() for x in quantile_bracket(est, list(DEFAULT_QUANTILES)))
    rep = quantiles(representative_spectrum(est), list(DEFAULT_QUANTILES)).numpy()
    mid = list(DEFAULT_QUANTILES).index(0.5)
    assert (hi[mid] - lo[mid]) / q[mid] < 0.25
    assert np.max(np.abs(rep - q)) / true[0] < 0.02
    assert rep[-1] == pytest.approx(true[0], rel=1e-6)
    assert est.t == pytest.approx(sampling_error(r, 8), rel=1e-12)


def test_sampling_error_formula():
    assert sampling_error(4096, 4, 1e-3) == pytest.approx(math.sqrt(math.log(2 * 4097 / 1e-3) / (4 * 4098)))
    assert sampling_error(4096, 16) == pytest.approx(sampling_error(4096, 4) / 2)


def test_non_finite_zero_and_tiny():
    a = torch.randn(50, 80, dtype=torch.float64)
    a[3, 4] = float("inf")
    est = slq(a)
    assert torch.isnan(representative_spectrum(est)).all()
    assert all(torch.isnan(x).all() for x in quantile_bracket(est, [0.5]))
    z = slq(torch.zeros(40, 60))
    assert (representative_spectrum(z) == 0).all()
    lo, hi = quantile_bracket(z, [0.0, 0.5, 1.0])
    assert (lo == 0).all() and (hi == 0).all()
    one = slq(torch.ones(1, 30))  # r = 1: one step spans R^1, exact
    assert representative_spectrum(one).item() == pytest.approx(math.sqrt(30))


def test_cost_model_chooses_the_route():
    assert choose_method(8192, 8192) == "slq"
    assert choose_method(8192, 8192, exact_max=None) == "exact"
    assert choose_method(8192, 8192, policy="exact") == "exact"
    assert choose_method(8192, 8192, exact_max=8192) == "exact"
    assert choose_method(EXACT_MAX, 4 * EXACT_MAX, policy="slq") == "exact"  # at the threshold: always exact
    assert choose_method(EXACT_MAX + 1, EXACT_MAX + 1, policy="slq") == "slq"
    # above the threshold the cost model rules: memory-bound products make 2,048×8,192 cheaper exactly
    for shape in [(2048 + 1, 8192), (8192, 8192), (4096, 11008), (4096, 16384)]:
        gram, _, direct = route_costs(*shape, 0)
        assert choose_method(*shape) == ("slq" if slq_cost(*shape) < min(gram, direct) else "exact")
    assert choose_method(2049, 8192) == "exact" and choose_method(4096, 11008) == "slq"
    assert slq_cost(8192, 8192, n_vectors=64) > slq_cost(8192, 8192)
    with pytest.raises(ValueError, match="policy"):
        choose_method(10, 10, policy="fast")


def test_recorder_writes_method_and_bounds(tmp_path):
    """A 1,100-wide layer above exact_max=1,000 is estimated (sv_method="slq"; the cost model would measure it
    exactly on a CPU): ``sv_method`` says so, the bounds hold the
    float64 numpy quantiles of M̃, ΔW and O, and the small layer stays exact with zero bounds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1100, 1100, bias=False), torch.nn.Linear(1100, 24, bias=False))
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    seen = {}

    def capture(optimizer, args, kwargs):  # the matrices the recorder will measure, for the reference
        p = model[0].weight
        st = optimizer.state[p]
        g = p.grad.detach().double()
        buf = st["momentum_buffer"].double() if "momentum_buffer" in st else torch.zeros_like(g)
        buf = buf.lerp(g, 1 - 0.95)
        seen["m"] = g.lerp(buf, 0.95).numpy()
        seen["w0"] = p.detach().double().clone().numpy()

    opt.register_step_pre_hook(capture)
    rec = ss.watch(opt, model, tmp_path / "big.zarr", every=1, exact_max=1000, sv_method="slq", activations=None)
    x = torch.randn(64, 1100)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    rec.close()
    ds = xr.open_zarr(tmp_path / "big.zarr", group="optimizer", consolidated=False)
    assert list(ds["sv_method"].values) == ["slq", "exact"]
    last = ds.isel(step=-1)
    m = seen["m"]
    dw = model[0].weight.detach().double().numpy() - seen["w0"]
    qs = list(DEFAULT_QUANTILES)
    # Muon's step on a square matrix: W1 = W0·(1 − lr·wd) − lr·O (lr 0.02, wd 0.1); O to float32 rounding
    o = (seen["w0"] * (1 - 0.02 * 0.1) - model[0].weight.detach().double().numpy()) / 0.02
    for var, mat, scale, slack in (("momentum_sv", m, np.linalg.norm(m), 1e-12), ("update_sv", dw, 1.0, 1e-12),
                                   ("ns_out_sv", o, 1.0, 1e-5)):
        true = np.quantile(np.linalg.svd(mat, compute_uv=False) / scale, qs)
        got = last[var].values[0]
        err = last[f"{var}_err"].values[0]
        assert (np.abs(got - true) <= err + slack * true.max()).all(), var
        assert (err > 0).all()
        assert (last[f"{var}_err"].values[1] == 0).all()  # exact layer
    # ΔW's σ_max from Lanczos is accurate; NS lifts the gradient's few directions (rank ≤ 2·24) to about 1
    assert last["update_sv"].values[0, -1] == pytest.approx(np.linalg.norm(dw, 2), rel=1e-6)
    assert 0.5 < last["ns_out_sv"].values[0, -1] < 1.5
    assert ds.sizes["step"] == 2


def test_exact_runs_have_no_bound_variables(tmp_path):
    model = torch.nn.Linear(16, 8, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with ss.watch(opt, model, tmp_path / "small.zarr", every=1, activations=None):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
    ds = xr.open_zarr(tmp_path / "small.zarr", group="optimizer", consolidated=False)
    assert list(ds["sv_method"].values) == ["exact"]
    assert not set(ESTIMATE_BOUNDS) & set(ds.data_vars)


def test_exact_max_is_validated(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="exact_max"):
        ss.watch(opt, model, tmp_path / "x.zarr", exact_max=0)
    with pytest.raises(ValueError, match="sv_method"):
        ss.watch(opt, model, tmp_path / "x.zarr", sv_method="fast")
