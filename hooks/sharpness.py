"""`Sharpness`: the normalized directional sharpness of the realised step (SPEC §6 "Sharpness").

Before a recorded step the parameters θ are kept; after it, u = θ_after − θ_before over every parameter
the optimizer updated. The probe then puts θ back, evaluates L0 = loss_fn(model, batch), g = ∇L0 and Hu
by double backward (under the MATH attention backend: fused attention kernels have no double backward),
and L(θ_after) on the same batch. Dropout is off during the probe; the parameters, their gradients, the
module buffers and modes, and the random state are restored exactly afterwards, so training continues
bit for bit. The other instruments are paused while it runs.

Where the records are measured in a worker process (`watch`'s default on the CPU) the probe runs there
too, on the process's own copy of the model (`SharpnessProbe`, pickled once without spectralscope's hooks):
after a probed step the training thread only hands over θ_before, the parameters and buffers after the step,
the modules' modes and the random state, and the probe — three to four training steps of work — is done
beside training. That needs ``loss_fn``, the model's classes and the batch to be importable or picklable
(not defined in ``__main__``); otherwise, and whenever the process cannot take the probe, it runs on the
training thread on the live model as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import nn

from spectralscope import schema
from spectralscope.curvature import directional_terms, dot, sharpness_values
from spectralscope.layers import MatrixView, layer_coords
from spectralscope.store import GroupSpec
from spectralscope.worker import portable_dumps, portable_loads

from .modules import Context, check_every

#: The probe's run-level values (every sharpness variable but nds_within).
SCALARS = tuple(v for v in schema.SHARPNESS.names() if v != "nds_within")


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the attention module
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def _held(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Dropout off while inside; on leaving, ``params`` (their values, yielded as copies, and gradients), the
    model's buffers and modules' modes and the random state are exactly as on entering."""
    with torch.no_grad():
        after = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        yield after
    finally:
        with torch.no_grad():
            for p, a in zip(params, after, strict=True):
                p.copy_(a)
            for b, saved in buffers:
                b.copy_(saved)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        for m, flag in modes:
            m.training = flag
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def probe(model: nn.Module, params: Sequence[torch.Tensor], before: Sequence[torch.Tensor],
          loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
          layer_index: Sequence[tuple[int, MatrixView]] | None) -> dict[str, Any]:
    """The probe of the step that took ``params`` from ``before`` to their present values, on ``model`` whose
    other parameters and buffers are as after the step: θ put back, L0 = loss_fn(model, batch), the
    directional terms (`curvature.directional_terms`: gᵀu, uᵀHu and, with ``layer_index`` — for each watched
    layer the position in ``params`` of its parameter and the `MatrixView` of the part it is — u_lᵀHu_l),
    then L(θ_after); the values as `curvature.sharpness_values` states them. Dropout is off during the probe;
    parameters, gradients, buffers, modes and the random state are restored exactly (`_held`)."""
    with _held(model, params) as after:
        u = [a - b for a, b in zip(after, before, strict=True)]
        moved = [i for i, d in enumerate(u) if bool(d.any())]
        live, us = [params[i] for i in moved], [u[i] for i in moved]
        pos = {i: j for j, i in enumerate(moved)}
        parts = None if layer_index is None else [(pos[i], view.select) if i in pos else None
                                                  for i, view in layer_index]
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        with torch.enable_grad(), _math_attention():
            loss0 = loss_fn(model, batch)
            gu, curv, within = directional_terms(loss0, live, us, parts)
        with torch.no_grad():
            for p, a in zip(params, after, strict=True):
                p.copy_(a)
            loss1 = loss_fn(model, batch)
        return sharpness_values(float(loss0.detach()), float(loss1), gu, curv, float(dot(us, us)) if us else 0.0,
                                within)


def _ours(hook: Any) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith("spectralscope.")


@contextmanager
def _without_our_hooks(model: nn.Module) -> Iterator[None]:
    """Hide spectralscope's own module hooks (closures of the recorder's instruments, which neither can nor
    should go to the worker process) while ``model`` is pickled; the user's hooks stay."""
    hidden = []
    for m in model.modules():
        for name, hooks in list(vars(m).items()):
            if name.endswith("hooks") and isinstance(hooks, dict) and any(_ours(h) for h in hooks.values()):
                hidden.append((m, name, hooks))
                m.__dict__[name] = OrderedDict((k, h) for k, h in hooks.items() if not _ours(h))
    try:
        yield
    finally:
        for m, name, hooks in hidden:  # the very dicts back: the instruments' handles refer to them
            m.__dict__[name] = hooks


class SharpnessProbe:
    """The probe's finisher. On the training thread it probes the live model, with the watched instruments
    paused (``pause``) and ``params`` the optimizer's parameters; unpickled in the worker process it probes its
    own copy of the model, loaded first with the state the training process had after the probed step.
    ``positions`` are the optimizer's parameters' places in ``model.parameters()`` (None where one is not the
    model's: then it cannot go to the worker process). Not for a worker thread: training goes on in the live
    model meanwhile (``threadable``)."""

    threadable = False

    @property
    def portable(self) -> bool:
        """Whether the worker process can take it: every parameter it probes is the model's."""
        return self.positions is not None

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                 layer_index: Sequence[tuple[int, MatrixView]] | None, n_layers: int,
                 positions: Sequence[int] | None, params: Sequence[torch.Tensor] = (),
                 pause: Callable[[bool], None] | None = None) -> None:
        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.layer_index = None if layer_index is None else list(layer_index)
        self.n_layers = n_layers
        self.positions = None if positions is None else list(positions)
        self._params, self._pause = list(params), pause
        self._copy = False  # True in the worker process: the model is this process's own

    def finish(self, taken: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        """The sharpness row of the step `Sharpness.take` describes, and (metric, layer, why) where the probe
        failed or is not finite."""
        if not self._copy:  # the live model: the probe's own passes must not be recorded
            self._pause(True)
            try:
                return self._measure(self._params, taken["before"])
            finally:
                self._pause(False)
        model = self.model
        with torch.no_grad():
            for t, s in zip(chain(model.parameters(), model.buffers()), taken["state"], strict=True):
                t.copy_(s)
        for m, flag in zip(model.modules(), taken["modes"], strict=True):
            m.training = flag
        torch.set_rng_state(taken["rng"].clone())  # a view into the job's memory: set_state reads from its storage's start
        every = list(model.parameters())
        return self._measure([every[i] for i in self.positions], taken["before"])

    def _measure(self, params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]
                 ) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        out = {v: np.full((), np.nan) for v in SCALARS} | {"nds_within": np.full(self.n_layers, np.nan)}
        try:
            values = probe(self.model, params, before, self.loss_fn, self.batch, self.layer_index)
        except Exception as exc:  # never into the training loop
            return out, [("nds", "*", f"failed ({type(exc).__name__}: {exc})")]
        for k, v in values.items():
            out[k] = np.asarray(v, dtype=np.float64)
        return out, [] if np.isfinite(out["nds"]) else [("nds", "*", "is not finite")]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_params"], state["_pause"] = [], None  # the live model's: they stay in the training process
        with _without_our_hooks(self.model):
            state["model"] = portable_dumps(self.model)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["model"] = portable_loads(state["model"])
        state["_copy"] = True
        self.__dict__.update(state)


class Sharpness:
    """Probe the curvature along each ``every``-th step on the fixed ``batch``:
    ``loss_before``, ``loss_after``, ``grad_dot_update`` = gᵀu, ``curvature`` = uᵀHu, ``update_norm_sq`` = ‖u‖²,
    ``nds`` = uᵀHu/‖u‖², ``predicted_delta`` = gᵀu + ½uᵀHu, ``actual_delta`` = L(θ_after) − L0, and with
    ``per_layer=True`` ``nds_within[l]`` = u_lᵀHu_l/‖u‖² for each watched layer and ``nds_cross`` = nds − Σ_l
    nds_within[l] (`probe`). ``loss_fn(model, batch)`` returns the scalar loss."""

    group = "sharpness"

    def __init__(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, every: int = 100,
                 per_layer: bool = False):
        if not callable(loss_fn):
            raise ValueError(f"Sharpness: loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
        check_every("Sharpness", every)
        self.loss_fn, self.batch, self.every, self.per_layer = loss_fn, batch, every, bool(per_layer)
        self._before: list[torch.Tensor] | None = None
        self.paused = False
        self.live = False  # the payload: θ_before (copies), and the state the worker process copies at once
        self.defer = False  # set by watch: the probe runs in the worker process (`take` carries the state there)

    def bind(self, ctx: Context) -> None:
        if ctx.model is None:
            raise ValueError("Sharpness needs the model: watch(optimizer, model, ...)")
        self._ctx = ctx
        seen: set[int] = set()
        self._params = [p for g in ctx.optimizer.param_groups for p in g["params"]
                        if not (id(p) in seen or seen.add(id(p)))]
        index = {id(p): i for i, p in enumerate(self._params)}
        layer_index = [(index[id(lay.param)], lay.view) for lay in ctx.layers]
        place = {id(p): i for i, p in enumerate(ctx.model.parameters())}
        positions = [place[id(p)] for p in self._params] if all(id(p) in place for p in self._params) else None
        self.finisher = SharpnessProbe(ctx.model, self.loss_fn, self.batch, layer_index if self.per_layer else None,
                                       len(layer_index), positions, self._params, ctx.pause)
        self.defer = False

    def remove(self) -> None:
        self._before = None

    def spec(self) -> GroupSpec:
        coords = {k: v for k, v in layer_coords(self._ctx.layers).items() if k in ("layer", "kind", "depth")}
        variables = schema.SHARPNESS.dims()
        return GroupSpec(self.group, coords, variables)

    def before_step(self, step: int) -> None:
        self._before = None
        if step % self.every == 0:
            with torch.no_grad():
                self._before = [p.detach().clone() for p in self._params]

    def take(self, step: int) -> dict[str, Any] | None:
        """After a probed step: θ_before, and with ``defer`` the model's parameters and buffers (the tensors
        themselves: the worker process's job copies them at once), the modules' modes and the random state;
        None when ``step`` is not probed. The finisher (`SharpnessProbe`) makes the row, here or there."""
        if step % self.every != 0 or self._before is None:
            return None
        taken: dict[str, Any] = {"before": self._before}
        self._before = None
        if self.defer:
            model = self._ctx.model
            taken["state"] = [t.detach() for t in chain(model.parameters(), model.buffers())]
            taken["modes"] = [m.training for m in model.modules()]
            taken["rng"] = torch.get_rng_state()
        return taken
