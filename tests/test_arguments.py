"""Bad arguments to `watch`: each raises at once, in one line naming the argument, before anything is hooked
or written."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import spectralscope as ss


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _not(*good):
    return lambda x: x not in good


#: For each argument, values it must refuse.
BAD = {
    "every": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans()),
    "quantiles": st.one_of(st.floats(), st.just([0.5, 0.1]), st.just([]), st.text(min_size=1, max_size=3),
                           st.lists(st.floats(min_value=1.01, max_value=10), min_size=1, max_size=3),
                           st.just([0.1, "x"]), st.just({"q": 0.5})),
    "layers": st.one_of(st.sampled_from(["(", "[a-", "*x", "(?P<", "a{2,1}"]), st.integers(), st.floats()),
    "kinds": st.one_of(st.just({"x": "mlp"}), st.just({"(": "mlp_in"}), st.integers(), st.just(["attn_q"])),
    "flush_seconds": st.one_of(st.text(max_size=3), st.floats(max_value=0), st.sampled_from([float("inf"), float("nan")]),
                               st.none()),
    "ns_floor": st.one_of(st.text(max_size=3), st.floats(max_value=0), st.none(), st.just(float("nan"))),
    "tensorboard": st.one_of(st.booleans(), st.integers(), st.just("")),
    "model_size": st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.just(True)),
    "meta": st.one_of(st.integers(), st.text(max_size=3), st.just({"x": object()}), st.just([1, 2])),
    "name": st.one_of(st.integers(), st.just(""), st.just(["a"])),
    "resume": st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=2), st.none()),
    "overwrite": st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=2), st.none()),
    "lend_core": st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=2), st.none()),
    "storage_options": st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.just([("a", 1)])),
    "exact_max": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=2)),
    "sv_method": st.one_of(st.text(max_size=4).filter(_not("auto", "exact", "slq")), st.integers(), st.none()),
    "background": st.one_of(st.text(max_size=4).filter(_not("auto", "thread", "process")), st.integers(min_value=2),
                            st.none()),
    "activations": st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=3), st.just(Net())),
    "gradients": st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=3)),
    "sharpness": st.one_of(st.booleans(), st.integers(), st.just(Net())),
}


def _hooks(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) + \
        len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_bad_argument_raises_one_line_naming_it(tmp_path, data):
    arg = data.draw(st.sampled_from(sorted(BAD)), label="argument")
    value = data.draw(BAD[arg], label="value")
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / f"bad-{arg}.zarr"
    with pytest.raises((TypeError, ValueError)) as caught:
        ss.watch(opt, model, path, **{arg: value})
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert arg in message, message
    assert "Linear(" not in message and "Net(" not in message  # never a module's repr
    assert not path.exists() and _hooks(model, opt) == 0


def test_the_message_says_what_is_accepted_and_what_was_given(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        ({"quantiles": 0.5}, "watch(): quantiles must be a sequence of increasing distinct levels in [0, 1], e.g. "
                             "(0.1, 0.5, 0.9), got 0.5"),
        ({"flush_seconds": "5"}, "watch(): flush_seconds must be a number of seconds > 0, got '5'"),
        ({"ns_floor": "x"}, "watch(): ns_floor must be a number > 0 (the f_k floor, default 0.5), got 'x'"),
        ({"tensorboard": True}, "watch(): tensorboard must be a log directory (str or Path) or None, got True"),
        ({"activations": Net()}, "watch(): activations must be an ss.ActivationSpectra, True (defaults) or "
                                 "None/False (off), got a test_arguments.Net"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ValueError) as caught:
            ss.watch(opt, model, tmp_path / "r.zarr", **kwargs)
        assert str(caught.value) == text
    with pytest.raises(ValueError, match=r"^watch\(\): layers must be a valid regex, got '\(' \(missing \), "):
        ss.watch(opt, model, tmp_path / "r.zarr", layers="(")


def test_swapped_wrapped_and_foreign_models_are_named(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^watch\(\): optimizer and model are swapped: the call is watch\(optimizer, "):
        ss.watch(model, opt, tmp_path / "r.zarr")

    class Wrapper:  # holds an optimizer as .optimizer, but is none: unwrapped like the real wrappers
        def __init__(self, optimizer):
            self.optimizer = optimizer

    ss.watch(Wrapper(opt), model, tmp_path / "w.zarr", background=False).close()
    accepted = r"^watch\(\): optimizer must be a torch\.optim\.Optimizer \(or an object with param_groups, state"
    with pytest.raises(ValueError, match=accepted + r".*\), got a "):
        ss.watch(Wrapper(model), model, tmp_path / "r.zarr")
    with pytest.raises(ValueError, match=r"^watch\(\): model holds none of the optimizer's 4 parameters: pass the model"):
        ss.watch(opt, Net(), tmp_path / "r.zarr")
    with pytest.raises(ValueError, match=accepted + r".*\), got 'sgd'$"):
        ss.watch("sgd", model, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_a_path_that_cannot_be_written_is_named(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"path '.*a-file/run\.zarr' cannot be created: .*a-file is a file, not a folder"):
        ss.watch(opt, model, tmp_path / "a-file" / "run.zarr")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r"cannot be written: .*locked is not writable by this user"):
            ss.watch(opt, model, locked / "run.zarr")


def _one_step(opt, model, path, **kw):
    with ss.watch(opt, model, path, **kw):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_resume_says_what_changed(tmp_path):
    path = tmp_path / "r.zarr"
    model = Net()
    _one_step(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, path, every=10)
    with pytest.raises(ValueError, match=r"cannot resume .*r\.zarr: it was recorded with every=10, not every=5$"):
        _one_step(torch.optim.SGD(model.parameters(), lr=0.1), model, path, every=5, resume=True)
    wider = Net(width=32)
    with pytest.raises(ValueError, match=r"its optimizer layer fc1\.weight was 16×8, the watched one is 32×8$"):
        _one_step(torch.optim.SGD(wider.parameters(), lr=0.1), wider, path, every=10, resume=True)
    with pytest.raises(ValueError, match=r"its optimizer layers differ from the watched ones: 1 no longer watched "
                                         r"\(fc2\.weight\)$"):
        _one_step(torch.optim.SGD(model.fc1.parameters(), lr=0.1), model, path, every=10, resume=True)
    with pytest.raises(ValueError, match=r"its optimizer quantile levels are \[0\.0, 0\.01, .*, the watched ones "
                                         r"\[0\.5\]$"):
        _one_step(torch.optim.SGD(model.parameters(), lr=0.1), model, path, every=10, resume=True, quantiles=[0.5])
    _one_step(torch.optim.SGD(model.parameters(), lr=0.1), model, path, every=10, resume=True)  # unchanged: fine
