"""Hypothesis fuzzing: every public spectral function over shapes from 1×1 to 257×3 (and 3×257), four dtypes,
zeros, NaN/Inf, huge and tiny entries — never an exception, NaN exactly where the input has no spectrum,
numpy's float64 SVD where it has one; and `watch` on random models with frozen parameters, parameters
without gradients, NaN gradients and a parameter group added mid-run — never an exception into training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import spectralscope as ss
from spectralscope.covariance import CovarianceStats, activation_metrics, covariance_eigenvalues
from spectralscope.newton_schulz import NSConfig, newton_schulz, recover_applied
from spectralscope.optimizer_metrics import momentum_metrics, newton_schulz_metrics, update_metrics, weight_metrics
from spectralscope.per_sample import gradient_metrics, per_sample_gram
from spectralscope.spectra import (
    eigvalsh,
    entropy_rank,
    gram_spectrum,
    matrix_spectrum,
    participation_rank,
    quantiles,
    singular_values,
    spectral_norm,
    top_singular_value,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SPECIAL = [0.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def matrices(draw, max_side: int = 257, thin: int = 3):
    """A matrix from 1×1 up to max_side×thin or thin×max_side (and anything smaller in between), of one of
    four dtypes, with a random fill: Gaussian, all zeros, a rank-1 outer product, or Gaussian with a few
    special entries (0, NaN, ±Inf, 1e30, 1e-30)."""
    m = draw(st.integers(1, max_side))
    n = draw(st.integers(1, thin)) if draw(st.booleans()) else draw(st.integers(1, 24))
    if draw(st.booleans()):
        m, n = n, m
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    fill = draw(st.sampled_from(["gauss", "zeros", "rank1", "special"]))
    if fill == "zeros":
        a = np.zeros((m, n))
    elif fill == "rank1":
        a = np.outer(g.standard_normal(m), g.standard_normal(n))
    else:
        a = g.standard_normal((m, n)) * draw(st.sampled_from([1.0, 1e-6, 1e6]))
    if fill == "special":
        for _ in range(draw(st.integers(1, 3))):
            a[g.integers(m), g.integers(n)] = draw(st.sampled_from(SPECIAL))
    return torch.from_numpy(a).to(dtype)


def _held(t: torch.Tensor) -> np.ndarray:
    """The float64 values a (possibly low-precision) tensor really holds."""
    return t.to(torch.float64).numpy()


@FAST
@given(matrices())
def test_singular_value_routes_never_raise_and_agree_with_numpy(a):
    held = _held(a)
    finite = np.isfinite(held).all()
    r = min(held.shape)
    ref = np.linalg.svd(held, compute_uv=False) if finite else None
    outs = [singular_values(a), singular_values(a, method="svd"), matrix_spectrum(a).sigma,
            matrix_spectrum(a, k_hint=10_000).sigma]
    try:
        outs.append(gram_spectrum(a)[0])
    except np.linalg.LinAlgError:  # documented: gram_spectrum itself may raise on a LAPACK failure
        pass
    for out in outs:
        assert out.shape == (r,) and out.dtype == torch.float64
        if not finite:
            assert torch.isnan(out).all()
            continue
        got = out.numpy()
        scale = ref[0] if ref[0] > 0 else 1.0
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * scale)
    top = top_singular_value(a)
    assert torch.isnan(top) if not finite else float(top) == pytest.approx(ref[0], rel=1e-9, abs=1e-300)
    s1, _ = spectral_norm(a, max_iter=50)
    assert torch.isnan(s1) if not finite else float(s1) <= ref[0] * (1 + 1e-9) + 1e-300


@FAST
@given(matrices())
def test_statistics_of_a_spectrum_never_raise(a):
    v = a.reshape(-1).to(torch.float64)
    q = quantiles(v)
    if not torch.isfinite(v).all():
        assert torch.isnan(q).all()
    else:
        np.testing.assert_allclose(q.numpy(), np.quantile(v.numpy(), ss.DEFAULT_QUANTILES), rtol=1e-12)
    for f in (entropy_rank, participation_rank):
        out = f(v.abs())
        assert out.shape == () and (torch.isnan(out) or out >= 0)
    if a.shape[0] == a.shape[1]:
        sym = a.to(torch.float64) + a.to(torch.float64).T
        lam = eigvalsh(sym)
        if not torch.isfinite(sym).all():
            assert torch.isnan(lam).all()
        else:
            np.testing.assert_allclose(lam.numpy(), np.linalg.eigvalsh(sym.numpy()), rtol=1e-9,
                                       atol=1e-9 * max(1.0, float(sym.abs().max())))


@FAST
@given(matrices(), st.integers(0, 7))
def test_optimizer_metrics_never_raise_and_nan_only_without_a_spectrum(a, steps):
    finite = bool(torch.isfinite(a.to(torch.float64)).all())
    nonzero = bool((a != 0).any())
    cfg = NSConfig(steps=steps)
    outs = {**momentum_metrics(a, ns_config=cfg), **update_metrics(a), **weight_metrics(a)[0]}
    outs.update(newton_schulz_metrics(newton_schulz(a, cfg).to(torch.float64)))
    for name, value in outs.items():
        if name in ("ns_out_sv", "ns_polar_err", "ns_orth_err"):
            continue  # bf16 NS of huge entries overflows by design: NaN/Inf there is the optimizer's own output
        if not finite:
            assert torch.isnan(value).all(), name
        elif nonzero and name not in ("neuron_norm", "neuron_cv"):
            assert torch.isfinite(value).all(), name
    w = a.to(torch.float32)
    if bool((w != 0).any()):  # nonzero weights that did not move: no step of the form W − s·O to read back
        assert recover_applied(w, w, 0.02) is None


@FAST
@given(st.integers(1, 257), st.integers(1, 40), st.sampled_from(DTYPES), st.sampled_from([None, *SPECIAL]))
def test_covariance_and_per_sample_spectra_never_raise(tokens, d, dtype, special):
    x = torch.randn(tokens, d).to(dtype)
    if special is not None:
        x[0, 0] = special
    st_ = CovarianceStats.zeros(d)
    st_.add(x)
    lam = covariance_eigenvalues(st_)
    metrics = activation_metrics(lam)
    assert lam.shape == (d,) and set(metrics) >= {"act_eig", "act_soft_rank", "act_hard_rank"}
    if not torch.isfinite(x.to(torch.float64)).all() or tokens < 2:
        assert torch.isnan(lam).all()
    k = per_sample_gram(x.reshape(tokens, 1, d).float(), torch.randn(tokens, 1, 3))
    assert k.shape == (tokens, tokens)
    gradient_metrics(k)


class _Net(nn.Module):
    def __init__(self, widths: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == 0 else lin(torch.tanh(x))
        return x


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(widths=st.lists(st.integers(1, 257), min_size=2, max_size=4), opt_name=st.sampled_from(["muon", "sgd", "adamw"]),
       frozen=st.booleans(), bad_step=st.sampled_from([None, 1, 2]), bad=st.sampled_from([0.0, float("nan"), float("inf")]),
       add_group=st.booleans(), activations=st.booleans())
def test_watch_never_raises_into_training(tmp_path_factory, widths, opt_name, frozen, bad_step, bad, add_group,
                                          activations):
    torch.manual_seed(0)
    net = _Net(widths)
    if frozen and len(net.layers) > 1:
        net.layers[0].weight.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    if opt_name == "muon":
        opt = torch.optim.Muon(params, lr=0.02)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    extra = nn.Parameter(torch.randn(5, 7))  # joins the optimizer mid-run; never gets a gradient
    path = tmp_path_factory.mktemp("fuzz") / "run.zarr"
    logging.disable(logging.WARNING)
    try:
        with ss.watch(opt, net, path, overhead=None, every=1, flush_seconds=0.05,
                      activations=ss.ActivationSpectra(every=2) if activations else None) as rec:
            for step in range(4):
                out = net(torch.randn(6, widths[0]))
                out.square().mean().backward()
                if step == bad_step:
                    for p in params:
                        p.grad.view(-1)[0] = bad
                opt.step()
                opt.zero_grad()
                rec.log(loss=out.square().mean())
                if add_group and step == 1:
                    opt.add_param_group({"params": [extra]})
    finally:
        logging.disable(logging.NOTSET)
    tree = ss.open_run(path)
    assert list(tree["optimizer"]["step"].values) == [0, 1, 2, 3]
