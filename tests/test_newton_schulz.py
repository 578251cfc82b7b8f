from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import prescribed
from torch.optim._muon import _zeropower_via_newtonschulz

from spectralscope.adapters import adapter_for, muon_lr_ratio
from spectralscope.newton_schulz import (
    NSConfig,
    fewest_ns_steps,
    newton_schulz,
    ns_threshold,
    recover_applied,
    scalar_map,
    step_coefficients,
)

A, B, C = 3.4445, -4.7750, 2.0315


def _ref_map(x: np.ndarray, triples) -> np.ndarray:
    # independent float64 evaluation of the composed polynomial via numpy.polynomial
    y = np.asarray(x, dtype=np.float64)
    for a, b, c in triples:
        y = np.polynomial.polynomial.polyval(y, [0.0, a, 0.0, b, 0.0, c])
    return y


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (1, 20), (20, 1)])
@pytest.mark.parametrize("steps", [1, 5, 7])
def test_matrix_iteration_is_bitwise_torch_muon(shape, steps):
    g = torch.randn(*shape)
    ours = newton_schulz(g, NSConfig((A, B, C), steps, 1e-7, torch.bfloat16))
    theirs = _zeropower_via_newtonschulz(g, (A, B, C), steps, 1e-7)
    assert ours.dtype == torch.bfloat16 and ours.shape == g.shape
    assert torch.equal(ours, theirs)


def test_float64_iteration_acts_on_singular_values_by_the_scalar_map():
    s = np.geomspace(1.0, 1e-3, 16)
    m = prescribed(16, 40, s, seed=2)
    o = newton_schulz(torch.from_numpy(m), NSConfig((A, B, C), 5, 0.0, torch.float64)).numpy()
    got = np.sort(np.linalg.svd(o, compute_uv=False))
    want = np.sort(np.abs(_ref_map(s / np.linalg.norm(s), [(A, B, C)] * 5)))
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_scalar_map_fixed_and_per_step_coefficients():
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(scalar_map(x, (A, B, C), 5), _ref_map(x, [(A, B, C)] * 5), rtol=1e-12, atol=1e-15)
    sched = [(4.0, -5.0, 2.0), (3.5, -4.5, 1.9), (3.0, -3.0, 1.0)]
    np.testing.assert_allclose(scalar_map(x, sched, 3), _ref_map(x, sched), rtol=1e-12, atol=1e-15)
    assert float(scalar_map(0.5545, (A, B, C), 1)) == pytest.approx(1.2024, abs=1e-4)
    assert float(scalar_map(1.0, (A, B, C), 5)) == pytest.approx(0.696, abs=1e-3)
    with pytest.raises(ValueError, match="per-step"):
        step_coefficients(sched, 5)


@pytest.mark.parametrize(
    "steps,floor,ref", [(5, 0.5, 1.067e-3), (10, 0.5, 2.201e-6), (5, 0.1, 2.065e-4), (10, 0.1, 4.259e-7)]
)
def test_ns_threshold_reference_values(steps, floor, ref):
    thr = ns_threshold(steps, floor=floor)
    assert thr == pytest.approx(ref, rel=5e-4)
    # definition: f_k ≥ floor on [thr, 1] and < floor just below thr
    grid = np.linspace(thr, 1.0, 200001)
    assert np.all(_ref_map(grid, [(A, B, C)] * steps) >= floor - 1e-12)
    assert _ref_map(thr * (1 - 1e-6), [(A, B, C)] * steps) < floor


def test_ns_threshold_without_a_qualifying_sigma_raises():
    with pytest.raises(ValueError, match="floor"):
        ns_threshold(5, floor=0.7)
    with pytest.raises(ValueError):
        ns_threshold(5, floor=0.0)


def test_ns_threshold_per_step_schedule_matches_bisection_of_reference_map():
    sched = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]
    thr = ns_threshold(5, sched, floor=0.5)
    assert _ref_map(thr, sched) >= 0.5 - 1e-12
    assert _ref_map(thr * (1 - 1e-6), sched) < 0.5
    assert np.all(_ref_map(np.linspace(thr, 1, 100001), sched) >= 0.5 - 1e-12)


@pytest.mark.parametrize("sigma", [0.3, 1.1e-3, 5e-5, 1e-7])
def test_fewest_ns_steps_against_direct_iteration(sigma):
    k = fewest_ns_steps(sigma)
    grid = np.geomspace(sigma, 1.0, 20001)

    def lifted(steps):  # direct float64 iteration of the scalar map on [σ, 1]
        return np.all(_ref_map(grid, [(A, B, C)] * steps) >= 0.5)

    assert lifted(k) and (k == 1 or not lifted(k - 1))
    if sigma == 5e-5:
        assert k == 8  # RESEARCH.md: the final O projection at σ ≈ 5e-5 needs 8 steps, not 5


def _muon_step(shape, lr, wd, adjust_lr_fn=None, seed=3):
    """One real torch.optim.Muon step on W (float32) with a prescribed gradient; returns (W_before, param,
    group, torch's own NS output of the M that step used)."""
    rng = np.random.default_rng(seed)
    w = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(shape) * 0.05).float())
    opt = torch.optim.Muon([w], lr=lr, weight_decay=wd, adjust_lr_fn=adjust_lr_fn)
    w.grad = torch.from_numpy(prescribed(*shape, np.geomspace(1.0, 1e-3, min(shape)), seed=seed)).float()
    before = w.detach().clone()
    opt.step()
    group = opt.param_groups[0]
    m = w.grad.lerp(opt.state[w]["momentum_buffer"], group["momentum"])
    ref = _zeropower_via_newtonschulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"])
    return before, w, group, ref.double(), opt


@pytest.mark.parametrize("shape,adjust", [((48, 80), None), ((96, 40), None), ((64, 64), "match_rms_adamw")])
def test_recover_applied_reads_back_torch_muons_own_output(shape, adjust):
    before, w, group, ref, opt = _muon_step(shape, lr=0.02, wd=0.1, adjust_lr_fn=adjust)
    got = adapter_for(opt).applied(w.detach(), group, before)
    assert got is not None and got.dtype == torch.float64
    # entry for entry torch's bf16 result, but for the few entries whose rounding straddles a bf16 midpoint
    assert (got != ref).double().mean() < 0.01
    step = group["lr"] * muon_lr_ratio(adjust, shape)
    bound = np.linalg.norm(2.0**-24 * (w.detach().double().abs().numpy() / step + 2 * ref.abs().numpy()))
    sv_got = np.linalg.svd(got.numpy(), compute_uv=False)
    sv_ref = np.linalg.svd(ref.numpy(), compute_uv=False)
    assert np.abs(sv_got - sv_ref).max() <= 2 * bound


def test_recover_applied_refuses_what_it_cannot_read_back():
    before, w, group, ref, _ = _muon_step((48, 80), lr=1e-9, wd=0.1)
    decayed = before * (1 - group["lr"] * group["weight_decay"])
    # a step far below the weights' float32 resolution: the digits are gone
    assert recover_applied(decayed, w.detach(), group["lr"]) is None
    # a float32 direction is not on the bf16 grid: not a step of the form W − s·O with bf16 O
    o = torch.randn(48, 80)
    assert recover_applied(before, before - 0.02 * o, 0.02) is None
    # the same step with a bf16 direction is read back exactly
    o16 = o.bfloat16().float()
    assert torch.equal(recover_applied(before, before - 0.02 * o16, 0.02), o16.double())
    assert recover_applied(before, before, 0.02) is None  # no step at all
    assert recover_applied(before, before - 0.02 * o16, 0.0) is None


def test_a_muon_subclass_with_its_own_step_gets_ns_recomputed():
    class Clipped(torch.optim.Muon):
        def step(self, closure=None):
            return super().step(closure)

    class Plain(torch.optim.Muon):
        pass

    w = torch.nn.Parameter(torch.zeros(8, 8))
    assert adapter_for(Clipped([w])).applied is None
    assert adapter_for(Plain([w])).applied is not None
    assert adapter_for(torch.optim.Muon([w])).ns is not None


HEAVYBALL_SCHEDULE = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                      (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


@pytest.mark.parametrize("sigma", [0.3, 1e-3, 2e-5, 1e-7])
def test_fewest_ns_steps_of_a_per_step_schedule_against_direct_iteration(sigma):
    # a schedule run for k steps: its first k triples, then its last one repeated
    k = fewest_ns_steps(sigma, HEAVYBALL_SCHEDULE)
    grid = np.geomspace(sigma, 1.0, 20001)

    def lifted(steps):
        triples = [HEAVYBALL_SCHEDULE[min(i, 4)] for i in range(steps)]
        return np.all(_ref_map(grid, triples) >= 0.5)

    assert lifted(k) and (k == 1 or not lifted(k - 1))
    if sigma == 1e-7:
        assert k > 5  # beyond the schedule's own length: the last quintic repeated
