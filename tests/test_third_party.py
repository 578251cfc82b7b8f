"""The adapters of the Muon implementations people use, against the packages themselves (installed in the dev
extra): the optimizer's own orthogonalisation is wrapped to capture what it was given and what it returned at
the recorded steps, and every recorded value is checked against numpy float64 on those tensors and on the
realised step."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import np_quantile
from torch import nn

import spectralscope as ss

QS = ss.DEFAULT_QUANTILES


class Net(nn.Module):
    """Distinct shapes (one matrix per NS call, wide and tall), two of one shape (batched by pytorch-optimizer),
    and with ``conv`` a conv kernel (viewed (out, in·k·k); muon-optimizer 0.1.0 cannot step one: it applies the
    (out, in·k·k) update to the 4-D weight without reshaping it back)."""

    def __init__(self, conv: bool = True):
        super().__init__()
        self.has_conv = conv
        self.conv = nn.Conv2d(2, 6, (1, 3))
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(24, 40), nn.Linear(40, 24), nn.Linear(24, 24), nn.Linear(24, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x.unsqueeze(2))).flatten(1)
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(h))))
        return self.head(torch.tanh(self.fc4(torch.tanh(self.fc3(h)))))

    def hidden(self):
        return [*([self.conv.weight] if self.has_conv else []), self.fc1.weight, self.fc2.weight, self.fc3.weight,
                self.fc4.weight]


def _capture(monkeypatch, module, name, unbatch=True, calls=None):
    """Wrap ``module.name`` (the package's NS function): every call the package itself makes (not spectralscope's
    recomputation), as (input, output), split along a batch axis."""
    import sys

    calls = [] if calls is None else calls
    inner = getattr(module, name)

    def wrapped(g, *args, **kwargs):
        out = inner(g, *args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None:  # spectralscope's recomputation, through the package's own helpers or not
            if frame.f_globals.get("__name__", "").startswith("spectralscope"):
                return out
            frame = frame.f_back
        if unbatch and g.ndim > 2:
            calls.extend(zip(g.detach().clone().unbind(0), out.detach().clone().unbind(0), strict=True))
        else:
            calls.append((g.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _np_sv(t):
    m = t.detach().double().reshape(t.shape[0], -1).numpy()
    return np.linalg.svd(m, compute_uv=False)


def _train(opt, model, path, steps, calls, capture_at, **kw):
    """Train; at each step in ``capture_at`` keep the NS calls of that step and the realised ΔW."""
    captured, deltas = {}, {}
    g = torch.Generator().manual_seed(5)
    kw.setdefault("overhead", None)  # every step is compared with its captures: the cadence must be the one given
    with ss.watch(opt, model, path, every=1, activations=None, **kw) as rec:
        for step in range(steps):
            before = {id(p): p.detach().double().clone() for p in model.parameters()}
            calls.clear()
            model(torch.randn(8, 2, 6, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if step in capture_at:
                captured[step] = list(calls)
                deltas[step] = {id(p): p.detach().double() - before[id(p)] for p in model.parameters()}
    return rec, captured, deltas


def _check(ds, j, g_in, o_out, dw, errors):
    """Layer j's recorded values against numpy on the captured NS input and output and the realised ΔW."""
    sv = _np_sv(g_in)
    got = ds["momentum_sv"].values[j]
    np.testing.assert_allclose(got, np_quantile(sv / np.linalg.norm(sv), QS), rtol=1e-6, atol=1e-9)
    o = np_quantile(_np_sv(o_out), QS)
    np.testing.assert_allclose(ds["ns_out_sv"].values[j], o, rtol=1e-6, atol=1e-9)
    d = dw.reshape(dw.shape[0], -1).numpy()
    np.testing.assert_allclose(ds["update_rms"].values[j], np.sqrt(np.mean(d**2)), rtol=1e-9)
    rho = np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(ds["neuron_cv"].values[j], rho.std() / rho.mean(), rtol=1e-9)
    assert ds["ns_consistency"].values[j] >= 0.999
    errors.append(max(np.max(np.abs(got - np_quantile(sv / np.linalg.norm(sv), QS)) / np.abs(got).max()),
                      np.max(np.abs(ds["ns_out_sv"].values[j] - o) / np.abs(o).max())))


def _check_matched(ds, model, params, captured, deltas) -> float:
    """Each recorded step's NS calls matched to the parameters by shape and input norm (batched calls come in any
    order), every parameter checked by `_check`; returns the largest relative error."""
    names, errors = list(ds["layer"].values), []
    for step, got in captured.items():
        row = ds.sel(step=step)
        left = list(got)
        for p in params:
            j = names.index(next(n for n, q in model.named_parameters() if q is p))
            shape = p.reshape(p.shape[0], -1).shape  # batched by (min, max): a tall one stacked transposed
            k = next(i for i, (g_in, _) in enumerate(left) if g_in.shape in (shape, shape[::-1])
                     and np.isclose(float(g_in.double().norm()), row["momentum_norm"].values[j], rtol=1e-6))
            g_in, o_out = left.pop(k)
            _check(row, j, g_in, o_out, deltas[step][id(p)], errors)
    print(f"largest relative error: {max(errors):.2e}")
    return max(errors)


@pytest.mark.parametrize("cls", ["SingleDeviceMuon", "SingleDeviceMuonWithAuxAdam"])
def test_keller_jordans_muon_records_what_its_newton_schulz_is_given(tmp_path, monkeypatch, cls):
    import muon

    torch.manual_seed(0)
    model = Net(conv=False)
    hidden = model.hidden()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    if cls == "SingleDeviceMuon":
        opt = muon.SingleDeviceMuon(hidden, lr=0.02, weight_decay=0.1)
    else:
        opt = muon.SingleDeviceMuonWithAuxAdam([dict(params=hidden, use_muon=True, lr=0.02, weight_decay=0.1),
                                                dict(params=rest, use_muon=False, lr=3e-3)])
    calls = _capture(monkeypatch, muon, "zeropower_via_newtonschulz5")
    rec, captured, deltas = _train(opt, model, tmp_path / "k.zarr", 4, calls, {1, 3})
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset
    assert tree.attrs["optimizer"][0]["class"] == f"muon.{cls}" and rec.errors == {}
    names = list(ds["layer"].values)
    errors: list[float] = []
    for step, got in captured.items():
        assert len(got) == len(hidden)  # one NS call per hidden matrix, in the group's order
        row = ds.sel(step=step)
        for p, (g_in, o_out) in zip(hidden, got, strict=True):
            name = next(n for n, q in model.named_parameters() if q is p)
            _check(row, names.index(name), g_in, o_out, deltas[step][id(p)], errors)
    if cls != "SingleDeviceMuon":  # the aux-Adam groups are recorded as Adam: exp_avg, no NS, and said so
        j = names.index("head.weight")
        m = opt.state[model.head.weight]["exp_avg"]
        sv = _np_sv(m)
        np.testing.assert_allclose(ds["momentum_sv"].values[-1, j], np_quantile(sv / np.linalg.norm(sv), QS), rtol=1e-9)
        assert np.isnan(ds["ns_out_sv"].values[:, j]).all() and np.isnan(ds["ns_consistency"].values[:, j]).all()
        assert "not applicable to the layers of 1 of 2 param groups" in tree.attrs["notes"]["newton_schulz"]
        assert tree.attrs["optimizer"][0]["ns_steps"] == 5  # described by its Muon group
    print(f"largest relative error: {max(errors):.2e}")
    assert max(errors) < 1e-6


# foreach None: pytorch-optimizer's default, batching equal shapes; polar_express: its 8-step schedule with the
# safety divisors built in, run for ns_steps=5 (the first five)
@pytest.mark.parametrize("foreach,coeffs", [(None, "original"), (False, "original"), (None, "polar_express")])
def test_pytorch_optimizer_muon_records_what_its_newton_schulz_is_given(tmp_path, monkeypatch, foreach, coeffs):
    from pytorch_optimizer.optimizer.muon import base
    from pytorch_optimizer.optimizer.utils.matrix import NS_COEFFICIENTS

    torch.manual_seed(0)
    model = Net()
    hidden = model.hidden()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = __import__("pytorch_optimizer").Muon(
        [dict(params=hidden, use_muon=True, weight_decay=0.05), dict(params=rest, use_muon=False)],
        lr=0.02, ns_coeffs=coeffs, foreach=foreach)
    calls = _capture(monkeypatch, base, "zero_power_via_newton_schulz_5")
    rec, captured, deltas = _train(opt, model, tmp_path / "p.zarr", 4, calls, {1, 3})
    tree = ss.open_run(rec.path)
    assert _check_matched(tree["optimizer"].dataset, model, hidden, captured, deltas) < 1e-6 and rec.errors == {}
    recorded = tree.attrs["optimizer"][0]["ns_coefficients"]
    schedule = [list(t) for t in NS_COEFFICIENTS[coeffs]]
    assert recorded == (schedule[0] if len(schedule) == 1 else schedule[:5])


def test_a_wrong_adapter_is_caught_by_the_self_check(tmp_path, caplog):
    # the torch adapter's momentum (g.lerp(buf, μ)) copied for Keller's Muon, whose step has already lerped
    # p.grad in place: plausible values, wrong ones — and the self-check says so, once per layer
    import muon

    class KellerCopy(muon.SingleDeviceMuon):
        pass

    def torch_style(p, group, state):
        return p.grad.lerp(state["momentum_buffer"], group["momentum"]) if "momentum_buffer" in state else None

    ss.register_adapter(KellerCopy, momentum=torch_style, ns=lambda group: ss.NSConfig(eps=1e-7))
    torch.manual_seed(0)
    model = Net(conv=False)
    opt = KellerCopy(model.hidden(), lr=0.02)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, _, _ = _train(opt, model, tmp_path / "w.zarr", 4, [], set(), background=False)
    tree = ss.open_run(rec.path)
    consistency = tree["optimizer"]["ns_consistency"].values
    assert np.nanmin(consistency[1:]) < 0.99
    warned = [r.getMessage() for r in caplog.records if "does not reproduce the update" in r.getMessage()]
    assert warned and len(warned) == len({w.split(" of ")[1].split(" does")[0] for w in warned})  # once per layer
    assert "the adapter for test_third_party.KellerCopy" in warned[0] or "KellerCopy is probably wrong" in warned[0]
    assert "check the adapter for" in tree.attrs["notes"]["consistency"]


@pytest.mark.parametrize("make", ["torch", "keller", "keller_aux", "pytorch_optimizer", "heavyball"])
def test_every_built_in_adapter_passes_the_self_check(tmp_path, caplog, monkeypatch, make):
    import heavyball
    import muon
    import pytorch_optimizer

    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    torch.manual_seed(0)
    model = Net(conv=make == "pytorch_optimizer")
    hidden = model.hidden()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = {"torch": lambda: torch.optim.Muon(hidden[1:], lr=0.02, weight_decay=0.1),
           "keller": lambda: muon.SingleDeviceMuon(hidden, lr=0.02),
           "keller_aux": lambda: muon.SingleDeviceMuonWithAuxAdam([dict(params=hidden, use_muon=True),
                                                                   dict(params=rest, use_muon=False)]),
           "pytorch_optimizer": lambda: pytorch_optimizer.Muon([dict(params=hidden, use_muon=True)], lr=0.02),
           "heavyball": lambda: heavyball.MuonAdamW(model.parameters(), lr=0.02, weight_decay=0.1),
           }[make]()
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, _, _ = _train(opt, model, tmp_path / "b.zarr", 5, [], set())
    consistency = ss.open_run(rec.path)["optimizer"]["ns_consistency"].values
    muon_layers = ~np.isnan(consistency[-1])
    # heavyball's stochastic rounding cannot be reproduced bit for bit: agreement within M's leading subspace
    assert muon_layers.sum() >= 3 and (consistency[:, muon_layers] >= (0.995 if make == "heavyball" else 0.999)).all()
    assert "does not reproduce" not in caplog.text and rec.errors == {}


@pytest.mark.parametrize("wrapper", ["accelerate", "lightning"])
def test_a_wrapped_optimizer_is_unwrapped(tmp_path, wrapper):
    # the HF Trainer hands out accelerate's AcceleratedOptimizer, Lightning its LightningOptimizer: both are
    # torch.optim.Optimizer subclasses around the one that steps
    torch.manual_seed(0)
    model = Net(conv=False)
    inner = torch.optim.Muon(model.hidden(), lr=0.02)
    if wrapper == "accelerate":
        from accelerate import Accelerator

        model, wrapped = Accelerator(cpu=True).prepare(model, inner)
    else:
        from lightning.pytorch.core.optimizer import LightningOptimizer

        wrapped = LightningOptimizer(inner)
    g = torch.Generator().manual_seed(5)
    with ss.watch(wrapped, model, tmp_path / "u.zarr", every=1, background=False) as rec:
        for _ in range(3):
            model(torch.randn(8, 2, 6, generator=g)).square().mean().backward()
            # a bare LightningOptimizer steps only through a Trainer's strategy, which steps the inner one
            (inner if wrapper == "lightning" else wrapped).step()
            wrapped.zero_grad()
    tree = ss.open_run(rec.path)
    assert tree.attrs["optimizer"][0]["class"] == "torch.optim.Muon" and rec.optimizer is inner
    assert list(tree["optimizer"]["step"].values) == [0, 1, 2]
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all() and rec.errors == {}


def test_the_readme_adapter_example_reads_keller_style_nesterov_right(tmp_path):
    import re
    from pathlib import Path

    import muon

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class MyMuon" in b)
    scope = {"ss": ss}
    exec(block, scope)  # the README's own example, run as a user would
    torch.manual_seed(0)
    model = Net(conv=False)
    opt = scope["MyMuon"](model.hidden(), lr=0.02)
    rec, _, _ = _train(opt, model, tmp_path / "x.zarr", 3, [], set(), background=False)
    consistency = ss.open_run(rec.path)["optimizer"]["ns_consistency"].values
    assert (consistency >= 0.999).all() and rec.errors == {}
    del muon


def test_an_adapter_returning_a_wrong_shape_or_dtype_is_told_in_one_line(tmp_path, caplog):
    class Transposed(torch.optim.SGD):
        pass

    ss.register_adapter(Transposed, momentum=lambda p, group, state: state["momentum_buffer"].T.contiguous()
                        if "momentum_buffer" in state else None)
    torch.manual_seed(0)
    model = Net(conv=False)
    opt = Transposed(model.hidden(), lr=0.01, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, _, _ = _train(opt, model, tmp_path / "t.zarr", 2, [], set(), background=False)
    said = [r.getMessage() for r in caplog.records if "as the momentum of a parameter" in r.getMessage()]
    assert len(said) == 1 and "returned a torch.float32 tensor of shape (24, 40) as the momentum of a parameter of " \
                              "shape (40, 24); it must return a floating tensor of the parameter's shape" in said[0]
    assert "\n" not in said[0] and set(rec.errors) >= {"momentum_sv"}
    ds = ss.open_run(rec.path)["optimizer"]
    # the two non-square layers are refused (a transposed square one has the parameter's shape: not detectable)
    assert np.isnan(ds["momentum_sv"].sel(layer=["fc1.weight", "fc2.weight"]).values).all()
    assert np.isfinite(ds["update_rms"].values).all()


HEAVYBALL = {"Muon": ("Muon", {}), "Muon-ema": ("Muon", dict(nesterov=False)),
             "Muon-heavyball": ("Muon", dict(heavyball_momentum=True)),
             "Muon-heavyball-plain": ("Muon", dict(heavyball_momentum=True, nesterov=False)),
             "Muon-warmup": ("Muon", dict(warmup_steps=1, multi_tensor=False)),  # step 0 at lr/2
             "MuonAdamW": ("MuonAdamW", {}), "MuonLaProp": ("MuonLaProp", {})}


def _heavyball(monkeypatch, variant, compiled=False):
    import heavyball
    from heavyball import utils

    if not compiled:  # its default compiles every fused kernel with inductor: minutes of a CPU test's time
        monkeypatch.setattr(utils, "compile_mode", None)
    torch.manual_seed(0)
    model = Net()
    cls, kw = HEAVYBALL[variant]
    # MuonAdamW routes the matrices (head included) through Muon and the vectors through AdamW
    params = list(model.parameters()) if cls == "MuonAdamW" else model.hidden()
    opt = getattr(heavyball, cls)(params, lr=0.02, weight_decay=0.1, **kw)
    return model, opt, utils


@pytest.mark.parametrize("variant", list(HEAVYBALL))
def test_heavyball_records_what_its_newton_schulz_is_given(tmp_path, monkeypatch, variant):
    # heavyball clears p.grad as it steps: the adapter keeps the gradient as the step begins and rebuilds the NS
    # input from it and the momentum in the state (nested: optimizer.state[p][0]["nesterov_ema_momentum_2"])
    model, opt, utils = _heavyball(monkeypatch, variant)
    calls = _capture(monkeypatch, utils, "zeropower_via_newtonschulz5")
    rec, captured, deltas = _train(opt, model, tmp_path / "h.zarr", 5, calls, {0, 2, 4})
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset
    assert tree.attrs["optimizer"][0]["class"] == f"heavyball.{HEAVYBALL[variant][0]}" and rec.errors == {}
    matrices = [p for p in model.parameters() if p.ndim >= 2 and any(p is q for q in opt.param_groups[0]["params"])]
    assert all(len(got) == len(matrices) for got in captured.values())  # one NS call per matrix
    assert _check_matched(ds, model, matrices, captured, deltas) < 1e-6


@pytest.mark.slow
def test_heavyball_compiled_as_it_ships(tmp_path, monkeypatch):
    # its default: every fused step compiled by inductor (on the CPU too); what NS is given is the same
    model, opt, utils = _heavyball(monkeypatch, "Muon", compiled=True)
    calls = _capture(monkeypatch, utils, "zeropower_via_newtonschulz5")
    rec, captured, deltas = _train(opt, model, tmp_path / "c.zarr", 3, calls, {2})
    ds = ss.open_run(rec.path)["optimizer"].dataset.sel(step=2)
    names, errors = list(ds["layer"].values), []
    for p, (g_in, o_out) in zip(model.hidden(), captured[2], strict=True):
        j = names.index(next(n for n, q in model.named_parameters() if q is p))
        _check(ds, j, g_in, o_out, deltas[2][id(p)], errors)
    assert max(errors) < 1e-6 and rec.errors == {}


def test_a_wrong_heavyball_adapter_is_caught_despite_its_stochastic_rounding(tmp_path, monkeypatch, caplog):
    # heavyball rounds its NS stochastically, so its self-check compares within M's leading subspace; a momentum
    # missing the Nesterov gradient term (the state alone) must still trip it, and the right one (test above) not
    import heavyball

    class Forgetful(heavyball.Muon):
        pass

    def state_only(p, group, state):
        return next(v for k, v in state[0].items() if k.startswith("nesterov_ema_momentum_")) if state else None

    ss.register_adapter(Forgetful, momentum=state_only, ns=lambda group: ss.NSConfig(
        __import__("spectralscope.third_party").third_party.HEAVYBALL_COEFFICIENTS, 5), stochastic=True)
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    torch.manual_seed(0)
    model = Net()
    opt = Forgetful(model.hidden(), lr=0.02)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, _, _ = _train(opt, model, tmp_path / "f.zarr", 5, [], set(), background=False)
    consistency = ss.open_run(rec.path)["optimizer"]["ns_consistency"].values
    assert np.nanmin(consistency) < 0.99 and "Forgetful is probably wrong" in caplog.text



@pytest.mark.parametrize("name,foreach", [("AdaMuon", False), ("AdaMuon", True), ("NorMuon", None),
                                          ("NorMuon", False), ("AdaGO", None), ("AdaGO", False)])
def test_pytorch_optimizer_adamuon_normuon_and_adago_record_what_their_newton_schulz_is_given(tmp_path, monkeypatch,
                                                                                       name, foreach):
    # AdaMuon and NorMuon divide O by a second moment after NS (element-wise, per output neuron), AdaGO scales it by
    # a step from its gradient-norm accumulator, so the applied O cannot be read back: it is recomputed by
    # MuonBase._orthogonalize, and the self-check applies their division
    import pytorch_optimizer
    from pytorch_optimizer.optimizer.muon import adago, adamuon, base, normuon

    torch.manual_seed(0)
    model = Net()
    hidden = model.hidden()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = getattr(pytorch_optimizer, name)([dict(params=hidden, use_muon=True, weight_decay=0.05),
                                            dict(params=rest, use_muon=False)], lr=0.02, foreach=foreach)
    calls = _capture(monkeypatch, base, "zero_power_via_newton_schulz_5")
    module = {"AdaMuon": adamuon, "NorMuon": normuon, "AdaGO": adago}[name]
    _capture(monkeypatch, module, "zero_power_via_newton_schulz_5", calls=calls)  # its per-tensor path's import
    rec, captured, deltas = _train(opt, model, tmp_path / "a.zarr", 4, calls, {1, 3})
    ds = ss.open_run(rec.path)["optimizer"].dataset
    assert rec.errors == {}
    assert _check_matched(ds, model, hidden, captured, deltas) < 1e-6


def test_keller_newton_schulz_is_the_muon_packages_bit_for_bit():
    # the copies of Keller's reference (Moonlight's, the NorMuon reference's) are recomputed with this function
    import muon

    from spectralscope.third_party import keller_newton_schulz

    g = torch.Generator().manual_seed(3)
    for shape in [(24, 40), (40, 24), (17, 17)]:
        m = torch.randn(shape, generator=g) * torch.logspace(0, -3, shape[1])
        assert torch.equal(keller_newton_schulz(m, 5), muon.zeropower_via_newtonschulz5(m, 5))


@pytest.mark.parametrize("layout", ["moonlight", "moonlight-plain", "normuon-reference"])
def test_layouts_of_copied_reference_optimizers_record_what_their_newton_schulz_is_given(tmp_path, layout):
    # no package to import: recognised by class name and hyper-parameters, whatever module they were copied into
    import reference_optimizers as ref

    torch.manual_seed(0)
    model = Net(conv=False)
    hidden = model.hidden()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    if layout.startswith("moonlight"):
        opt = ref.Muon(lr=0.02, wd=0.1, muon_params=hidden, adamw_params=rest, nesterov=layout == "moonlight")
    else:
        opt = ref.NorMuon(hidden, lr=0.02, weight_decay=0.1)
    ref.CALLS.clear()
    rec, captured, deltas = _train(opt, model, tmp_path / "l.zarr", 4, ref.CALLS, {1, 3})
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset
    assert rec.errors == {} and tree.attrs["optimizer"][0]["class"].endswith(("reference_optimizers.Muon",
                                                                              "reference_optimizers.NorMuon"))
    assert _check_matched(ds, model, hidden, captured, deltas) < 1e-6
    if layout.startswith("moonlight"):  # its AdamW parameters: moment1, no NS, and said so
        j = list(ds["layer"].values).index("head.weight")
        sv = _np_sv(opt.state[model.head.weight]["moment1"])
        np.testing.assert_allclose(ds["momentum_sv"].values[-1, j], np_quantile(sv / np.linalg.norm(sv), QS), rtol=1e-9)
        assert np.isnan(ds["ns_out_sv"].values[:, j]).all()
        assert "not applicable to 8 of 12 parameters" in tree.attrs["notes"]["newton_schulz"]


def test_a_layout_matches_only_its_own_hyper_parameters():
    import reference_optimizers as ref

    from spectralscope.adapters import adapter_for
    from spectralscope.third_party import MOONLIGHT, NORMUON_REFERENCE

    w = torch.nn.Parameter(torch.zeros(3, 4))
    assert adapter_for(ref.NorMuon([w])) is NORMUON_REFERENCE and adapter_for(ref.Muon(muon_params=[w])) is MOONLIGHT

    class NorMuon(torch.optim.Optimizer):  # a user's own class of that name, with other hyper-parameters
        def __init__(self, params):
            super().__init__(params, dict(lr=0.1, weight_decay=0, momentum=0.9, beta2=0.95, eps=1e-8))

    assert not adapter_for(NorMuon([w])).known
    import reference_dion as dion

    from spectralscope.third_party import dion_normuon_direction

    # Dion's, beside Moonlight's Muon of the same class name: matched by its hyper-parameters and NS function
    muon, normuon = adapter_for(dion.Muon([w], use_polar_express=True)), adapter_for(dion.NorMuon([w]))
    assert muon.known and muon.direction is None and normuon.direction is dion_normuon_direction
    assert muon.ns.args == ("polar_express",) and muon.orthogonalize.args == (dion.polar_express,)
    assert adapter_for(dion.Muon([w])).ns.args == ("zeropower_via_newtonschulz5",)


def test_every_built_in_adapter_can_be_handed_to_the_worker_process():
    # a lambda anywhere in an adapter keeps every record of its optimizer in the training process (SGD's and
    # Adam's were, until this test)
    import reference_dion as dion

    from spectralscope import adapters
    from spectralscope.worker import can_pickle

    w = torch.nn.Parameter(torch.zeros(3, 4))
    built = [adapters.adapter_for(dion.Muon([w])), adapters.adapter_for(dion.NorMuon([w]))]  # from a factory
    registered = [*adapters._REGISTRY.values(), *adapters._BY_NAME.values(), *built,
                  *(a for _, _, a in adapters._LAYOUTS if isinstance(a, adapters.Adapter))]
    built_in = [a for a in registered if (getattr(a.momentum, "__module__", None) or "").startswith("spectralscope")]
    assert len(built_in) >= 12
    assert [(a, can_pickle(a)) for a in built_in if can_pickle(a) is not None] == []


@pytest.mark.parametrize("cls,ns,nesterov", [("Muon", "quintics", False), ("Muon", "polar_express", True),
                                             ("NorMuon", "polar_express", False), ("NorMuon", "quintics", True)])
def test_dions_muon_and_normuon_record_what_their_newton_schulz_is_given(tmp_path, caplog, cls, ns, nesterov):
    # Dion keeps its NS function on the instance: the layout's adapter is built per optimizer and recomputes O with
    # that very function (its step rounds lr'·O to bf16, so O cannot be read back)
    import reference_dion as dion

    from spectralscope.third_party import DION_NS_FUNCTIONS

    torch.manual_seed(0)
    model = Net(conv=False)
    hidden = model.hidden()
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = getattr(dion, cls)([dict(params=hidden, weight_decay=0.1), dict(params=rest, algorithm="adamw")], lr=0.02,
                             nesterov=nesterov, use_polar_express=ns == "polar_express")
    dion.CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, captured, deltas = _train(opt, model, tmp_path / "d.zarr", 4, dion.CALLS, {1, 3})
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset
    assert rec.errors == {} and caplog.text == ""  # no warning: measured in the worker process, self-check passed
    assert all(len(got) == len(hidden) for got in captured.values())
    assert _check_matched(ds, model, hidden, captured, deltas) < 1e-6
    name = "polar_express" if ns == "polar_express" else "zeropower_via_newtonschulz5"
    assert tree.attrs["optimizer"][0]["ns_coefficients"] == [list(t) for t in DION_NS_FUNCTIONS[name]]
    j = list(ds["layer"].values).index("head.weight")  # AdamW group: its first moment, no NS, said so
    sv = _np_sv(opt.state[model.head.weight]["momentum"])
    np.testing.assert_allclose(ds["momentum_sv"].values[-1, j], np_quantile(sv / np.linalg.norm(sv), QS), rtol=1e-9)
    assert np.isnan(ds["ns_out_sv"].values[:, j]).all()
    assert "not applicable to the layers of 1 of 2 param groups" in tree.attrs["notes"]["newton_schulz"]


def test_dions_polar_express_schedule_folds_its_input_scaling_into_the_first_step():
    # ns_fail_frac is of σ(M/‖M‖_F); Dion's polar_express first divides by 1.02·‖X‖_F: the recorded schedule's map
    # must be the polynomials composed on x/1.02 (composed here in float64 from the published coefficients)
    import reference_dion as dion

    from spectralscope.newton_schulz import scalar_map
    from spectralscope.third_party import DION_NS_FUNCTIONS

    x = np.linspace(1e-4, 1.0, 2001)
    y = x / 1.02
    for a, b, c in dion._POLAR_EXPRESS:
        y = a * y + b * y**3 + c * y**5
    np.testing.assert_allclose(scalar_map(x, DION_NS_FUNCTIONS["polar_express"], 5), y, rtol=1e-12)


def test_dion_with_a_newton_schulz_function_of_the_users_is_recomputed_and_its_unknown_map_said(tmp_path):
    import reference_dion as dion

    torch.manual_seed(0)
    model = Net(conv=False)
    opt = dion.Muon(model.hidden(), lr=0.02, newton_schulz_func=dion.my_orthogonalise)
    dion.CALLS.clear()
    rec, captured, deltas = _train(opt, model, tmp_path / "u.zarr", 3, dion.CALLS, {2})
    tree = ss.open_run(rec.path)
    ds = tree["optimizer"].dataset.sel(step=2)
    j = list(ds["layer"].values).index("fc1.weight")
    g_in, _ = captured[2][0]  # fc1: the first matrix it stepped
    sv = _np_sv(g_in)
    np.testing.assert_allclose(ds["momentum_sv"].values[j], np_quantile(sv / np.linalg.norm(sv), QS), rtol=1e-6)
    assert np.isnan(ds["ns_fail_frac"].values[j]) and np.isnan(ds["ns_out_sv"].values[j]).all()
    assert "'my_orthogonalise' is not one spectralscope knows" in tree.attrs["notes"]["newton_schulz"]


def test_dion_variants_the_adapter_does_not_rebuild_are_nan_with_the_reason(tmp_path, caplog):
    # per-head NS (num_heads) is not NS of the whole matrix; cautious decay is not a factor the self-check removes
    import reference_dion as dion

    torch.manual_seed(0)
    model = Net(conv=False)
    fc1, fc2, fc3, fc4 = model.hidden()
    opt = dion.NorMuon([dict(params=[fc1, fc2], num_heads=4), dict(params=[fc3, fc4], cautious_wd=True)], lr=0.02)
    with caplog.at_level(logging.WARNING, logger="spectralscope"):
        rec, _, _ = _train(opt, model, tmp_path / "v.zarr", 2, [], set())
    assert rec.errors == {"momentum_sv": {"fc1.weight": 2, "fc2.weight": 2},
                          "momentum_norm": {"fc1.weight": 2, "fc2.weight": 2},
                          "ns_fail_frac": {"fc1.weight": 2, "fc2.weight": 2},
                          "ns_consistency": {"fc3.weight": 2, "fc4.weight": 2}}
    assert "per head or row block (num_heads/split_sizes)" in caplog.text
    assert "cautious weight decay" in caplog.text
    ds = ss.open_run(rec.path)["optimizer"].dataset
    names = list(ds["layer"].values)
    assert np.isfinite(ds["momentum_sv"].values[:, names.index("fc3.weight")]).all()
