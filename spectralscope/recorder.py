"""`watch`: the thin shell that hooks an optimizer and streams its metrics into a run store.

The recorder only reads. It attaches ``register_step_pre_hook`` (snapshot W before a recorded step)
and ``register_step_post_hook`` (measure after it); it never touches the optimizer's state, the
parameters, their gradients or the global random state, so training proceeds bit for bit as without it.
After construction nothing it does raises into the training loop: a metric that cannot be computed is
stored as NaN, counted in the run's ``errors`` attribute and logged once per (metric family, reason), with a
one-line summary at close; what is NaN by construction (no adapter, no momentum, no NS) is said in ``notes``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import queue
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spectralscope.hooks.activations import ActivationSpectra
from spectralscope.hooks.gradients import GradientSpectra
from spectralscope.hooks.modules import Context
from spectralscope.hooks.sharpness import Sharpness

from . import arguments, distributed, schema
from .adapters import adapter_for, qualified_name
from .estimate import EXACT_MAX, choose_method
from .layers import Layer, check_kinds, layer_coords, select_layers
from .measure import LayerInputs, Measurer, fill, to_host
from .schema import DEFAULT_QUANTILES, family_of
from .store import DiscardWriter, GroupSpec, RunWriter
from .worker import RecorderJobs, WorkerProcess, can_pickle, portable

log = logging.getLogger("spectralscope")

#: Instruments whose hooks can only copy, their records finished off the training thread (``defer``).
DEFERRABLE = (ActivationSpectra, GradientSpectra)
#: ... and those whose records can be finished in the worker process only (the probe needs a model of its own:
#: on a worker thread it would run on the live one while training goes on).
PROCESS_ONLY = (Sharpness,)
#: Under which metric a lost record of a group is counted in ``errors`` (layer ``*``).
LOST_AS = {name: g.lost_as for name, g in schema.GROUPS.items()}

def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


class Recorder:
    """Records one optimizer's watched layers into a run store. Made by `watch`; see there."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        path: str | Path,
        *,
        every: int = 10,
        meta: Mapping[str, Any] | None = None,
        layers: str | Callable[[str, Tensor], bool] | None = None,
        kinds: Mapping[str, str] | None = None,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        name: str | None = None,
        model_size: int | None = None,
        ns_floor: float = 0.5,
        flush_seconds: float = 5.0,
        resume: bool = False,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        exact_max: int | None = EXACT_MAX,
        sv_method: str = "auto",
        activations: ActivationSpectra | bool | None = True,
        gradients: GradientSpectra | bool | None = None,
        sharpness: Sharpness | None = None,
        tensorboard: str | Path | None = None,
        background: bool | str = "auto",
    ):
        arguments.check_optimizer_and_model(optimizer, model)
        arguments.check(isinstance(path, (str, Path)) and str(path) != "", "path", "a non-empty str or Path", path)
        arguments.check_options(every=every, meta=meta, name=name, model_size=model_size, ns_floor=ns_floor,
                                flush_seconds=flush_seconds, resume=resume, overwrite=overwrite,
                                storage_options=storage_options, exact_max=exact_max, sv_method=sv_method,
                                tensorboard=tensorboard, background=background)
        arguments.check_layers(layers)
        qs = arguments.check_quantiles(quantiles)
        kind_rules = check_kinds(kinds)
        arguments.check_model_holds(optimizer, model)
        arguments.check(activations is None or isinstance(activations, (bool, ActivationSpectra)), "activations",
                        "an ss.ActivationSpectra, True (defaults) or None/False (off)", activations)
        arguments.check(gradients is None or isinstance(gradients, (bool, GradientSpectra)), "gradients",
                        "an ss.GradientSpectra, True (defaults) or None/False (off)", gradients)
        arguments.check(sharpness is None or isinstance(sharpness, Sharpness), "sharpness",
                        "an ss.Sharpness(loss_fn, batch, every=..., per_layer=...) or None", sharpness)

        self.optimizer = optimizer
        self.every = every
        self.quantiles = qs
        self.ns_floor = float(ns_floor)
        self.adapter = adapter_for(optimizer)
        self.layers: list[Layer] = select_layers(optimizer, model, layers, kind_rules)
        if not self.layers:
            raise ValueError(
                "watch(): no parameter to watch — the optimizer updates no parameter with ndim >= 2"
                + (f" whose name matches layers={layers!r}" if layers is not None else "")
            )
        on_cpu = all(lay.param.device.type == "cpu" for lay in self.layers)
        # "auto": a worker process where that is measured to pay (the CPU, one training process), else inline;
        # where the process cannot be had, or dies, its records are measured inline, not on a thread
        self._auto = background == "auto"
        if self._auto:
            background = "process" if on_cpu and not distributed.active() else False
        if background == "process" and not on_cpu:
            raise ValueError("watch(): background='process' measures parameters on the CPU only; these live on "
                             f"{sorted({str(lay.param.device) for lay in self.layers})} (use True or 'thread')")
        # how each layer's spectra are measured: fixed by its shape, so recorded once as a coordinate
        self.methods = {lay.name: choose_method(lay.rows, lay.cols, exact_max, sv_method) for lay in self.layers}
        self.measurer = Measurer([lay.name for lay in self.layers], self.methods, qs, self.ns_floor,
                                 self.adapter.ns, self.adapter.applied, {lay.name: lay.view for lay in self.layers})
        self.estimated = self.measurer.estimated
        self.variables = self.measurer.variables  # the optimizer group's variables: name → has a quantile axis
        default_activations = activations is True
        if default_activations:
            activations = ActivationSpectra()
        if gradients is True:
            gradients = GradientSpectra()
        self.instruments: list[ActivationSpectra | GradientSpectra | Sharpness] = [
            i for i in (activations, gradients, sharpness) if i
        ]
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        if model_size is None:
            params = model.parameters() if model is not None else (p for g in optimizer.param_groups for p in g["params"])
            model_size = sum(p.numel() for p in {id(p): p for p in params}.values())
        group0 = optimizer.param_groups[0]
        self.optimizer_name = qualified_name(type(optimizer))
        self._notes = self._coverage_notes()
        ns0 = self._ns_of(group0)
        opt_attrs = {"class": self.optimizer_name}
        opt_attrs.update({k: _jsonable(group0[k]) for k in self.adapter.describe if k in group0})
        opt_attrs.setdefault("ns_steps", ns0.steps if ns0 else None)
        opt_attrs.setdefault("ns_coefficients", _jsonable(ns0.coefficients) if ns0 else None)
        opt_attrs.setdefault("nesterov", group0.get("nesterov"))
        opt_attrs.setdefault("momentum", _jsonable(group0.get("momentum", group0.get("betas"))))
        attrs = {
            "name": name or Path(str(path).rstrip("/")).name.removesuffix(".zarr"),
            "model_size": int(model_size),
            "optimizer": opt_attrs,
            "meta": dict(meta or {}),
            "every": every,
            "ns_floor": self.ns_floor,  # the f_k floor behind ns_fail_frac, so readers can draw its threshold
            "notes": dict(self._notes),  # what is not recorded, and why (readers show it beside the NaNs)
        }
        self._step = 0
        self._errors: dict[str, dict[str, int]] = {}
        self._errors_before: dict[str, dict[str, int]] = {}
        self._said: set[tuple[str, str]] = set()  # (metric family, reason) already logged
        # Under torch.distributed only rank 0 measures the optimizer and writes; every rank keeps the same
        # step count and runs the instruments' hooks, whose collectives must line up.
        self.writes = distributed.rank() == 0
        # FSDP2 (DTensor parameters): every rank measures the layers it owns from gathered full matrices
        self.sharded = distributed.active() and any(distributed.is_sharded(lay.param) for lay in self.layers)
        try:
            for inst in list(self.instruments):
                try:
                    inst.bind(Context(model, self.layers, optimizer, lambda: self._step, self._count, self._pause,
                                      self.writes))
                except ValueError:
                    if not (default_activations and isinstance(inst, ActivationSpectra)):
                        raise
                    # on by default only where there is something to hook: a model with watched nn.Linear
                    inst.remove()
                    self.instruments.remove(inst)
            specs = self._group_specs() + [inst.spec() for inst in self.instruments]
            # what TensorBoard tags are named after: each group's layers or modules, and its quantile levels
            self._tb_axes = {sp.name: sp.axes() for sp in specs}
            self._specs = {sp.name: sp for sp in specs}
            if self.writes:
                try:
                    arguments.check_writable(path)
                    self.writer: RunWriter | DiscardWriter = RunWriter(
                        path, specs, attrs, resume=resume, overwrite=overwrite, must_match=("every",),
                        flush_seconds=flush_seconds, storage_options=storage_options,
                    )
                except BaseException:
                    distributed.broadcast_ints([0, 0])  # the other ranks fail too instead of waiting
                    raise
            else:
                self.writer = DiscardWriter(path)
            ok, start = distributed.broadcast_ints([1, self._resume_step() if resume and self.writes else 0])
            if not ok:
                raise RuntimeError(f"watch(): rank 0 could not open the run store {path} (its error says why)")
        except BaseException:
            for inst in self.instruments:
                inst.remove()
            raise
        self.path = self.writer.path
        self._tb = None
        if tensorboard is not None and self.writes:
            from .tensorboard import TensorBoardSink

            self._tb = TensorBoardSink(tensorboard)
        if resume:
            self._errors = {k: dict(v) for k, v in dict(self.writer._attrs.get("errors", {})).items()}
        self._errors_before = {k: dict(v) for k, v in self._errors.items()}  # the close-time summary is this run's
        self._step = start
        self._before: dict[int, Tensor] | None = None
        self._scalars: dict[str, float] = {}
        self._scalar_step: int | None = None
        self._closed = False
        # the error counts and the TensorBoard sink are shared with the measuring thread
        self._lock = threading.Lock()
        # background: optimizer records are measured off the training thread from copies taken after the step
        # (under FSDP2 the gathers are collectives of the training thread, so records stay there)
        self.background = bool(background) and not self.sharded and self.writes
        # on the CPU in a worker process (a thread would contend with training for the interpreter lock: see
        # `spectralscope.worker`); on an accelerator, or where the process cannot be had, on a worker thread
        self._process: WorkerProcess | None = None
        self._pack_failed = False
        self._storage_options = dict(storage_options) if storage_options else None
        # groups whose rows the worker process appends to the store itself (from its first record on), with
        # their committed rows when handed over and the rows it has confirmed since (to count what a dying
        # process takes with it)
        self._handed: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._child_closed = False
        self._store_lock = threading.RLock()
        for inst in self.instruments:  # activation statistics (where no all-reduce needs their sums) and per-
            if isinstance(inst, DEFERRABLE):  # sample Gram matrices too: the hooks only copy
                inst.defer = self.background and not distributed.active()
        wants_process = self.background and on_cpu and background in (True, "process")
        for inst in self.instruments:  # and the sharpness probe, where its model can go there
            if isinstance(inst, PROCESS_ONLY):
                inst.defer = wants_process and inst.finisher.positions is not None
        if wants_process:
            self._process = self._start_process(background == "process" and not self._auto)
            if self._process is None and self._auto:
                self.background = False
            if self._process is None:  # inline ("auto"), or a thread: the probe cannot go there
                for inst in self.instruments:
                    if isinstance(inst, PROCESS_ONLY) or (self._auto and isinstance(inst, DEFERRABLE)):
                        inst.defer = False
        self._jobs: queue.Queue[tuple[Callable[[], None], dict[torch.device, Any]] | None] = queue.Queue(maxsize=1)
        self._worker: threading.Thread | None = None
        self._streams: dict[torch.device, Any] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        self._atexit = _close_at_exit(self)
        _register_exit(self._atexit)

    # ---- what is not recorded, said ----------------------------------------------------------------
    def _ns_of(self, group: Mapping[str, Any]) -> Any:
        try:
            return self.adapter.ns(group)
        except Exception:  # measured per record, where the failure is counted with its reason
            return None

    def _coverage_notes(self) -> dict[str, str]:
        """The metric families this optimizer leaves NaN by construction, each with why; the unknown optimizer
        is warned about once here, at watch time."""
        name, notes = self.optimizer_name, {}
        if not self.adapter.known:
            why = f"no adapter for {name}"
            notes["momentum"] = notes["newton_schulz"] = f"not recorded ({why})"
            log.warning(
                "spectralscope: %s: momentum_sv, momentum_norm, ns_out_sv, ns_polar_err, ns_orth_err and ns_fail_frac "
                "will be NaN, because spectralscope does not know where this optimizer keeps its momentum or whether "
                "it orthogonalises it (update_*, neuron_* and weight_spectral_norm are recorded). Teach it with "
                "ss.register_adapter(%s, momentum=lambda param, group, state: <the matrix it orthogonalises>, "
                "ns=lambda group: ss.NSConfig(...) or None)", why, type(self.optimizer).__qualname__)
        elif all(self._ns_of(g) is None for g in self.optimizer.param_groups):
            notes["newton_schulz"] = f"not applicable ({name} applies no Newton–Schulz)"
        return notes

    def _no_momentum(self, layer: str) -> None:
        """A known optimizer stepped ``layer`` but keeps no momentum for it (SGD with momentum=0): said once, in
        the notes and the log."""
        if "momentum" in self._notes:
            return
        self._notes["momentum"] = f"not recorded for {layer} and any layer like it ({self.optimizer_name} keeps no " \
                                  "momentum for it, e.g. SGD with momentum=0)"
        log.warning("spectralscope: momentum_sv and momentum_norm of %s are NaN: %s keeps no momentum for it "
                    "(warned once)", layer, self.optimizer_name)
        self.writer.update_attrs(notes=dict(self._notes))

    # ---- layout ----------------------------------------------------------------------------------
    def _group_specs(self) -> list[GroupSpec]:
        coords = {**layer_coords(self.layers), "quantile": ("quantile", np.array(self.quantiles, dtype=np.float64)),
                  "sv_method": ("layer", np.array([self.methods[lay.name] for lay in self.layers]))}
        variables = {v: ("step", "layer", "quantile") if q else ("step", "layer") for v, q in self.variables.items()}
        return [GroupSpec("optimizer", coords, variables), GroupSpec("scalars", dynamic=True)]

    def _resume_step(self) -> int:
        seen = [int(self.writer._attrs.get("steps", 0))]
        for g in ("optimizer", "scalars"):
            last = self.writer.last_step(g)
            if last is not None:
                seen.append(last + 1)
        return max(seen)

    # ---- public ------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Index of the last completed optimizer step (−1 before the first)."""
        return self._step - 1

    @property
    def errors(self) -> dict[str, dict[str, int]]:
        """Counts of metrics that came out NaN/Inf or failed, as {metric: {layer: count}}."""
        with self._lock:
            return {k: dict(v) for k, v in self._errors.items()}

    def log(self, **scalars: float | Tensor) -> None:
        """Record scalars (``loss=loss``) at the current step into group ``scalars``; tensors are read
        when the row is written, one host copy per step."""
        if self._closed:
            return
        step = max(self.step, 0)
        if self._scalar_step is not None and step != self._scalar_step:
            self._push_scalars()
        self._scalar_step = step
        for k, v in scalars.items():
            self._scalars[str(k)] = v.detach() if isinstance(v, Tensor) else v

    def flush(self) -> None:
        """Commit everything recorded so far (blocks until measured and written)."""
        if self._worker is not None:
            self._jobs.join()  # first: its rows may go through the worker process
        if self._process is not None:
            self._child_job("flush")
        self._push_scalars()
        self.writer.flush()

    def close(self) -> None:
        """Remove every hook, commit what is pending and mark the run finished. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        for inst in self.instruments:
            inst.remove()
        atexit.unregister(self._atexit)
        if self._worker is not None:
            self._jobs.join()  # first: its rows may go through the worker process
        if self._process is not None:
            self._child_job("close")
            self._process.close()
        if self._handed and not self._child_closed:
            self._take_back()  # the process died: its groups are trimmed and counted here
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
        self._push_scalars()
        self.writer.update_attrs(steps=self._step, errors=self.errors)
        self.writer.close()
        summary = self._summary()
        if summary is not None:
            log.warning(summary)
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- hooks -------------------------------------------------------------------------------------
    def _pause(self, flag: bool) -> None:
        for inst in self.instruments:
            inst.paused = flag

    def _recording(self) -> bool:
        return self._step % self.every == 0

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before = None
        for inst in self.instruments:
            if hasattr(inst, "before_step"):
                try:
                    inst.before_step(self._step)
                except Exception as exc:  # out of memory for a snapshot: that record is skipped
                    self._warn(inst.group, "*", exc)
        if not (self._recording() and (self.writes or self.sharded)):
            return
        try:
            with torch.no_grad():
                self._before = {id(lay.param): lay.param.detach().clone() for lay in self.layers}
        except Exception as exc:  # out of memory for the snapshot: skip update metrics this step
            self._warn("update", "*", exc)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            if self._recording() and self.background:
                self._hand_over()
            elif self._recording() and (self.writes or self.sharded):
                self._record_here()
            for inst in self.instruments:
                if inst.defer:  # every instrument has the flag: set above for those that can defer
                    taken = inst.take(self._step)
                    if taken is None:
                        continue
                    ready = self._process is not None and self._process.ready
                    if not (ready and self._to_process(inst.group, taken)):
                        finish = self._finisher(inst, taken, self._step)
                        if self._inline() or isinstance(inst, PROCESS_ONLY):
                            finish()
                        else:
                            self._submit(finish)
                    continue
                inst_row = inst.row(self._step)
                if inst_row is not None:
                    self._emit(inst.group, inst_row)
            if self._recording() or any(self._step % inst.every == 0 for inst in self.instruments):
                self.writer.update_attrs(steps=self._step + 1, errors=self.errors)
        except Exception as exc:  # never into the training loop
            self._warn("optimizer", "*", exc)
        finally:
            self._before = None
            self._step += 1

    def _record_here(self) -> None:
        """Measure this step's optimizer record on the training thread and emit it (inline)."""
        with torch.no_grad():
            row = self._measure([self._local_inputs(lay) for lay in self.layers])
        if row is not None:
            self._emit("optimizer", row)

    # ---- measuring in a worker process (background on the CPU) ------------------------------------
    def _start_process(self, required: bool) -> WorkerProcess | None:
        measure: dict[str, Callable[[Any], Any]] = {"optimizer": self.measurer.measure}
        for inst in self.instruments:
            if isinstance(inst, PROCESS_ONLY) and inst.defer:
                why = can_pickle(inst.finisher)
                if why is not None:  # a lambda or a class of __main__: the probe stays on the training thread
                    log.info("spectralscope: the sharpness probe runs on the training thread (%s)", why)
                    inst.defer = False
            if inst.defer:
                measure[inst.group] = inst.finisher.run
        writer = self.writer
        store = None
        if isinstance(writer, RunWriter):  # the process appends these groups' rows itself: no Zarr here for them
            store = {"path": writer.path, "groups": [self._specs[g] for g in measure],
                     "flush_seconds": writer.flush_seconds, "chunk_steps": writer.chunk,
                     "storage_options": self._storage_options}
        self._process_measures = list(measure)  # the groups the process will write
        setup = RecorderJobs(measure, store)
        why = can_pickle(setup)
        if why is None:
            try:
                return WorkerProcess(setup, self._answered, self._lost)
            except OSError as exc:
                why = f"{type(exc).__name__}: {exc}"
        (log.warning if required else log.info)(
            "spectralscope: records are measured %s, not in a worker process (%s)",
            "inline" if self._auto else "on a worker thread", why)
        return None

    def _to_process(self, kind: str, payload: Any) -> bool:
        """Send a job to the worker process; False when there is none (any more): measure it on the thread."""
        proc = self._process
        if proc is None:
            return False
        if self._worker is not None:
            self._jobs.join()  # records stay in step order: the thread's earlier ones are written first
        try:
            self._hand_groups()
            if proc.submit(kind, self._step, payload):
                return True
        except Exception as exc:  # no room for the copies, a tensor moved off the CPU: this record on the thread
            if not self._pack_failed:
                log.warning("spectralscope: could not hand the record of step %d to the worker process (%s: %s); "
                            "measured %s (warned once)", self._step, type(exc).__name__, exc,
                            "inline" if self._auto else "on a worker thread")
            self._pack_failed = True
            proc.join()  # after the process's earlier records
            return False
        log.warning("spectralscope: %s; records are measured %s from now on", proc.why_dead,
                    "inline" if self._auto else "on a worker thread")
        self._process = None
        proc.close()  # lets the process stop once no recorder uses it
        self._take_back()
        return False

    # ---- the groups the worker process writes -------------------------------------------------------
    def _hand_groups(self) -> None:
        """Before the first record goes to the worker process: commit the groups it measures and let it append
        to them from now on."""
        if self._handed or self._process is None or not isinstance(self.writer, RunWriter):
            return
        names = list(self._process_measures)
        with self._store_lock:
            self._handed = self.writer.release(names)
            self._confirmed = dict.fromkeys(names, 0)

    def _take_back(self) -> None:
        """The worker process is gone: write its groups here again, from their committed rows, and count the
        rows it had confirmed but not committed as lost."""
        with self._store_lock:
            handed, self._handed = self._handed, {}
            if not handed:
                return
            try:
                committed = self.writer.adopt([self._specs[g] for g in handed])
            except Exception as exc:  # the store is unreachable: those groups get no more rows
                self._warn("optimizer", "*", exc)
                return
            for group, n0 in handed.items():
                for _ in range(max(0, n0 + self._confirmed.get(group, 0) - committed[group])):
                    self._count(LOST_AS.get(group, group), "*",
                                "lost: measured, not yet committed when the measuring process died")

    def _child_job(self, kind: str) -> None:
        """Wait for the worker process's records; with ``kind`` "flush" or "close", have it commit (and trim)
        the groups it writes, and wait for that too."""
        proc = self._process
        if self._handed and proc.alive:
            try:
                proc.submit(kind, self._step, None)
            except Exception as exc:
                self._warn("optimizer", "*", exc)
        proc.join()

    def _inline(self) -> bool:
        """Whether a record the worker process does not take is measured on the training thread: while the
        process is starting (so a run killed in its first seconds loses no more than inline), and for ever
        with background="auto" once the process is gone or cannot take a record."""
        return self._auto or (self._process is not None and not self._process.ready)

    def _answered(self, kind: str, step: int, row: dict[str, np.ndarray] | None, problems: list) -> None:
        if kind == "close":
            self._child_closed = True
        if kind in ("flush", "close"):
            return
        appended = isinstance(kind, tuple)  # ("append", group): a row measured here, appended there
        group = kind[1] if appended else kind
        with self._store_lock:
            if group in self._confirmed:
                self._confirmed[group] += 1
        if not appended:
            self._emit(kind, row, step, stored=group in self._handed)
        for var, layer, reason in problems:
            self._count(var, layer, reason, step)

    def _lost(self, kind: str, step: int, why: str) -> None:
        if kind in ("flush", "close"):
            return
        group = kind[1] if isinstance(kind, tuple) else kind
        self._count(LOST_AS.get(group, group), "*", why, step)

    # ---- measuring on a worker thread (background=True) --------------------------------------------
    def _hand_over(self) -> None:
        """Copy this step's inputs (on their devices, in the training stream) and queue their record for the
        worker process or thread."""
        if self._process is not None and self._process.ready:
            with torch.no_grad():
                inputs = [self._local_inputs(lay) for lay in self.layers]
                inputs = [x._replace(why=portable(x.why)) for x in inputs]
            if self._to_process("optimizer", inputs):
                return
        if self._inline():
            self._record_here()
            return
        with torch.no_grad():
            inputs = [self._local_inputs(lay, copy=True) for lay in self.layers]
        step = self._step

        def record() -> None:
            row = self._measure(inputs, step)
            if row is not None:
                self._emit("optimizer", row, step)

        self._submit(record)

    def _finisher(self, inst: ActivationSpectra | GradientSpectra | Sharpness, taken: Any,
                  step: int) -> Callable[[], None]:
        def finish() -> None:
            try:
                self._emit(inst.group, inst.finish(taken), step)
            except Exception as exc:  # that record is lost, the optimizer's are not
                self._warn(LOST_AS[inst.group], "*", exc)

        return finish

    def _submit(self, job: Callable[[], None]) -> None:
        """Queue a job for the worker, behind the ones already queued (so records stay in step order). The
        queue holds one job besides the one being run: a worker that falls behind makes the training thread
        wait here rather than hold ever more copies."""
        ready = {}
        for dev in {lay.param.device for lay in self.layers}:  # on a GPU the worker's stream waits for the
            if dev.type == "cuda":  # copies made so far on the training stream; the training thread does not
                ready[dev] = torch.cuda.Event()
                ready[dev].record(torch.cuda.current_stream(dev))
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name=f"spectralscope-measure:{self.path}", daemon=True)
            self._worker.start()
        self._jobs.put((job, ready))

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                job, ready = item
                with contextlib.ExitStack() as stack:
                    for dev, event in ready.items():
                        stream = self._streams.get(dev) or self._streams.setdefault(dev, torch.cuda.Stream(dev))
                        stream.wait_event(event)
                        stack.enter_context(torch.cuda.stream(stream))
                        # the copies were allocated on the training stream: nothing of ours may still read them
                        # when they are freed (after this job), even if the record failed half-way
                        stack.callback(stream.synchronize)
                    with torch.no_grad():
                        job()
            except Exception as exc:  # the record is lost, training goes on
                self._warn("optimizer", "*", exc)
            finally:
                item = job = None  # the copies go now, not when the next job arrives
                self._jobs.task_done()

    # ---- measuring ---------------------------------------------------------------------------------
    def _measure(self, inputs: Sequence[LayerInputs], step: int | None = None) -> dict[str, np.ndarray] | None:
        """The optimizer row of a step from each layer's inputs (None on the ranks that do not write)."""
        if self.sharded:
            return self._measure_sharded(self.measurer.empty_row(), inputs)
        row, problems = self.measurer.measure(inputs)
        for var, layer, reason in problems:
            self._count(var, layer, reason, step)
        return row

    def _local_inputs(self, lay: Layer, copy: bool = False) -> LayerInputs:
        """A layer's inputs as this process holds them after the step; with ``copy``, M and W_after are
        copies (the next step changes both in place)."""
        p = lay.param
        group = self._group_of.get(id(p), self.optimizer.param_groups[0])
        m, why = None, None
        try:
            m = self.adapter.momentum(p, group, self.optimizer.state.get(p, {}))
        except Exception as exc:
            why = exc
        if m is None and why is None and self.adapter.known and p.grad is not None:
            self._no_momentum(lay.name)
        w0 = self._before.get(id(p)) if self._before is not None else None
        m = None if m is None else m.detach()
        w1 = p.detach()
        if copy:
            m, w1 = (None if m is None else m.clone()), w1.clone()
        hyper = {k: v for k, v in group.items() if k != "params"}
        return LayerInputs(m, w1, w0, why, hyper, p.grad is not None)

    def _measure_sharded(self, row: dict[str, np.ndarray], inputs: Sequence[LayerInputs]) -> dict[str, np.ndarray] | None:
        """FSDP2: spectra of full matrices. Layer i belongs to rank i mod world, which gathers its full M, W_after
        and W_before from the shards and measures it; rank 0 gathers the results. Every rank takes part in
        every collective in the same order whatever it meets (NaN, a failed metric), so none can hang."""
        world, me = distributed.world_size(), distributed.rank()
        sizes = {v: (len(self.quantiles) if q else 1) for v, q in self.variables.items()}
        width = sum(sizes.values())
        mine = np.full((len(self.layers), width), np.nan)
        reasons: dict[tuple[int, str], str] = {}
        for i, (lay, x) in enumerate(zip(self.layers, inputs, strict=True)):
            owner = i % world
            full = distributed.gather_full([x.m, x.w1, x.w0], dst=owner, like=x.w1)
            if me != owner:
                continue
            m_full, w1_full, w0_full = full
            try:
                host = to_host([self.measurer.measure_layer(lay.name, x._replace(m=m_full, w1=w1_full, w0=w0_full))])[0]
            except Exception as exc:  # never skip the collectives below
                self._warn("optimizer", lay.name, exc)
                continue
            offset = 0
            for var, n in sizes.items():
                if var in host:
                    mine[i, offset:offset + n] = np.asarray(host[var][0], dtype=np.float64).reshape(-1)
                    reasons[(i, var)] = host[var][1]
                offset += n
        gathered = distributed.gather_rows(mine, dst=0)
        if not self.writes:
            return None
        for i, lay in enumerate(self.layers):
            values, offset = gathered[i % world][i], 0
            host = {}
            for var, n in sizes.items():
                value = values[offset:offset + n] if self.variables[var] else values[offset]
                host[var] = (value, reasons.get((i, var), "is not finite"))
                offset += n
            for var, layer, reason in fill(row, i, lay.name, host):
                self._count(var, layer, reason)
        return row

    def _emit(self, group: str, row: dict[str, np.ndarray], step: int | None = None, stored: bool = False) -> None:
        """Append ``row`` to the store (unless the worker process already has: ``stored``) and TensorBoard."""
        step = self._step if step is None else step
        if not stored:
            self._store(group, step, row)
        self._to_tensorboard(group, step, row)

    def _to_tensorboard(self, group: str, step: int, row: Mapping[str, Any]) -> None:
        if self._tb is not None:
            try:
                with self._lock:
                    self._tb.write(group, step, row, *self._tb_axes[group])
            except Exception as exc:  # a full disk must not stop training
                self._warn("tensorboard", "*", exc)

    def _store(self, group: str, step: int, row: dict[str, np.ndarray]) -> None:
        """Append a row: to the writer here, or, for a group the worker process writes, through it (a record
        it could not take, measured here)."""
        with self._store_lock:
            handed = group in self._handed
        proc = self._process
        if handed and proc is not None:
            try:
                if proc.submit(("append", group), step, row):
                    return
            except Exception as exc:  # while it lives, the group is its alone to write: this row is lost
                self._warn("optimizer", "*", exc)
                return
        if handed:
            self._take_back()  # it died
        self.writer.append(group, step, row)

    def _count(self, metric: str, layer: str, reason: str, step: int | None = None) -> None:
        """Count a value recorded as NaN (or a record lost) in ``errors``; the first of each (metric family,
        reason) in this run is logged, the rest are summed up at `close`."""
        family = family_of(metric)
        key = (family, re.sub(r"^failed \((\w+): .*\)$", r"failed (\1)", reason, flags=re.S))
        with self._lock:
            per = self._errors.setdefault(metric, {})
            per[layer] = per.get(layer, 0) + 1
            first = key not in self._said
            self._said.add(key)
        if first:
            log.warning("spectralscope: %s of %s %s at step %d; recorded as NaN. Later %s values for the same reason "
                        "are only counted (the run's errors; a summary at close)", metric, layer, reason,
                        self._step if step is None else step, family)

    def _summary(self) -> str | None:
        """One line: what this run recorded as NaN or lost since it was opened, by metric family."""
        fams: dict[str, tuple[int, set[str]]] = {}
        for metric, per in self.errors.items():
            for layer, n in per.items():
                n -= self._errors_before.get(metric, {}).get(layer, 0)
                if n > 0:
                    total, layers = fams.get(family_of(metric), (0, set()))
                    fams[family_of(metric)] = (total + n, layers | {layer})
        if not fams:
            return None
        parts = ", ".join(f"{fam} {n} ({len(layers)} {'layer' if len(layers) == 1 else 'layers'})"
                          for fam, (n, layers) in sorted(fams.items(), key=lambda kv: -kv[1][0]))
        return (f"spectralscope: {self.path}: {sum(n for n, _ in fams.values())} values recorded as NaN or lost: "
                f"{parts} (by metric and layer in the run's errors attribute, rec.errors)")

    def _warn(self, metric: str, layer: str, exc: BaseException) -> None:
        self._count(metric, layer, f"failed ({type(exc).__name__}: {exc})")

    def _push_scalars(self) -> None:
        if not self._scalars or self._scalar_step is None:
            return
        values = {}
        for k, v in self._scalars.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError, RuntimeError):
                values[k] = float("nan")
        self.writer.append("scalars", self._scalar_step, values)
        self._to_tensorboard("scalars", self._scalar_step, values)
        self._scalars = {}
        self._scalar_step = None


def _register_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the interpreter exits, before the thread pools that Zarr writes through are shut down.

    Plain ``atexit`` handlers run after ``concurrent.futures`` has stopped its executors, so a run left open
    would lose its tail ("cannot schedule new futures after shutdown"). ``threading._register_atexit``
    callbacks run first, in reverse order of registration: ours, registered after those executors, runs
    before them. Falls back to ``atexit`` where that hook is missing or closed."""
    try:
        threading._register_atexit(fn)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        atexit.register(fn)


def _close_at_exit(rec: Recorder) -> Callable[[], None]:
    ref = weakref.ref(rec)

    def close() -> None:
        r = ref()
        if r is not None:
            r.close()

    return close


def watch(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    path: str | Path = "runs/run.zarr",
    **options: Any,
) -> Recorder:
    """Hook ``optimizer`` (and name its parameters after ``model``) and stream metrics into ``path``.

    Options: ``every`` (record the optimizer group every N steps, default 10), ``meta`` (JSON dict),
    ``layers`` (regex or callable narrowing the watched parameters), ``kinds`` ({regex: kind}: the kind of
    the layers whose name a pattern matches, the first that does, instead of the name rules), ``quantiles``,
    ``name``,
    ``model_size`` (default: the model's parameter count), ``ns_floor`` (the f_k floor behind
    ``ns_fail_frac``, default 0.5), ``flush_seconds`` (default 5), ``resume`` / ``overwrite``,
    ``storage_options`` (fsspec), ``exact_max`` (default 2048) and ``sv_method`` ("auto", the default:
    spectra of matrices whose smaller side exceeds ``exact_max`` are estimated by stochastic Lanczos
    quadrature when a cost model says that is cheaper, with a bound on every estimated quantile stored as
    ``*_sv_err``; "slq": always above ``exact_max``; "exact": never; the coordinate ``sv_method`` says which
    each layer got), ``activations`` (an `ss.ActivationSpectra`; True, the default, records
    the inputs of the watched linear layers every 50 steps; None turns it off), ``gradients`` (an
    `ss.GradientSpectra`, or True for every=100, max_samples=64; off by default), ``sharpness`` (an
    `ss.Sharpness(loss_fn, batch, every=100, per_layer=False)`; off by default), ``tensorboard`` (a log
    directory: per-layer scalars of the main metrics with a custom-scalars layout), ``background``
    ("auto", the default: on the CPU, outside torch.distributed, the records are measured off the training
    thread in a worker process shared by the recorders of this process, from copies of M, W_before and
    W_after taken right after the step, and the activation hooks only copy their inputs, summed and
    decomposed there too; the process appends those rows to the store itself. While it starts, and if it
    dies or cannot be had, records are measured inline. Elsewhere "auto" is inline. False: inline, on the
    training thread, right after the step. True: the worker process on the CPU, else a worker thread with
    its own CUDA stream, so the training thread never waits for them; "thread" or "process" chooses. At
    most two records are in flight, beyond that the training thread waits; ``flush`` and ``close`` wait for
    them; a killed training process loses at most the last flush interval, and the worker process commits
    what it measured when its parent is gone; not under FSDP2; the rows are bit for bit the inline ones).
    Under torch.distributed call it on every rank with the same arguments: only rank 0 writes (the path is
    not touched elsewhere); with FSDP2 (DTensor parameters) every rank measures its round-robin share of
    the layers on gathered full matrices.
    Returns the `Recorder`; use it as a context manager or call ``close()``.
    """
    return Recorder(optimizer, model, path, **options)
