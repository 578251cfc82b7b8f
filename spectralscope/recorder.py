"""`watch`: the thin shell that hooks an optimizer and streams its metrics into a run store.

The recorder only reads. It attaches ``register_step_pre_hook`` (before a recorded step) and
``register_step_post_hook`` (after it); it never touches the optimizer's state, the parameters, their gradients
or the global random state, so training proceeds bit for bit as without it. After each step every instrument
(the optimizer record first, `spectralscope.optimizer_record`) takes what its record is made from, and the
runner (`spectralscope.runners`) finishes it — inline, on a thread or in the worker process — and hands the row
back to be stored. After construction nothing it does raises into the training loop: a metric that cannot be
computed is stored as NaN and counted in the run's error ledger (`spectralscope.ledger`); what is NaN by
construction (no adapter, no momentum, no NS) is said in the run's ``notes``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spectralscope.hooks.activations import ActivationSpectra
from spectralscope.hooks.attention import AttentionLogits
from spectralscope.hooks.gradients import GradientSpectra
from spectralscope.hooks.modules import Context
from spectralscope.hooks.weights import WeightSpectra

from . import arguments, distributed, health, schema, threads
from . import budget as budget_policy
from .adapters import adapter_for, qualified_name
from .budget import Budget
from .estimate import choose_method
from .layers import Layer, select_layers
from .ledger import Ledger
from .measure import Measurer
from .optimizer_record import OptimizerRecord, all_coverage_notes, ns_of
from .runners import InlineRunner, make_runner
from .store import DiscardWriter, GroupSpec, RunWriter

log = logging.getLogger("spectralscope")


def _names(classes: Sequence[str]) -> list[str]:
    """The watched optimizers' names: their qualified classes, ``#2``, ``#3`` … added where two share one."""
    return [c if classes.count(c) == 1 else f"{c}#{classes[:i].count(c) + 1}" for i, c in enumerate(classes)]


def _describe(optimizer: torch.optim.Optimizer, adapter: Any, name: str) -> dict[str, Any]:
    """One entry of the root attribute ``optimizer``: the class and the hyper-parameters the adapter describes, of
    the first param group with Newton–Schulz (an aux-Adam group may come first)."""
    groups = optimizer.param_groups
    group0 = next((g for g in groups if ns_of(adapter, g) is not None), groups[0])
    ns0 = ns_of(adapter, group0)
    entry = {"class": name, **{k: _jsonable(group0[k]) for k in adapter.describe if k in group0}}
    entry.setdefault("ns_steps", ns0.steps if ns0 else None)
    entry.setdefault("ns_coefficients", _jsonable(ns0.coefficients) if ns0 else None)
    entry.setdefault("nesterov", group0.get("nesterov"))
    entry.setdefault("momentum", _jsonable(group0.get("momentum", group0.get("betas"))))
    return entry


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
    """Records one optimizer's watched layers into a run store. Made by `watch`; see there for the options."""

    def __init__(self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], model: nn.Module | None,
                 path: str | Path, **given: Any):
        given_list = isinstance(optimizer, (list, tuple))
        arguments.check(not given_list or len(optimizer) > 0, "optimizer", "an optimizer or a non-empty list of them",
                        optimizer)
        # AcceleratedOptimizer, LightningOptimizer: the one that steps
        self.optimizers = [arguments.unwrap(o) for o in (optimizer if given_list else [optimizer])]
        for opt in self.optimizers:
            arguments.check_optimizer_and_model(opt, model)
        arguments.check(isinstance(path, (str, Path)) and str(path) != "", "path", "a non-empty str or Path", path)
        opts = arguments.options(given)
        arguments.check_model_holds(self.optimizers, model)
        self.optimizer = self.optimizers[0]  # the clock: its steps are the run's training steps
        self.every, self.quantiles, self.ns_floor = opts.every, opts.quantiles, opts.ns_floor
        self.adapters = [adapter_for(o) for o in self.optimizers]
        self.adapter = self.adapters[0]
        self.layers: list[Layer] = select_layers(self.optimizers, model, opts.layers, opts.kind_rules)
        if not self.layers:
            raise ValueError("watch(): no parameter to watch — the optimizer updates no parameter with ndim >= 2"
                             + (f" whose name matches layers={opts.layers!r}" if opts.layers is not None else ""))
        on_cpu = all(lay.param.device.type == "cpu" for lay in self.layers)
        if opts.background == "process" and not on_cpu:
            raise ValueError("watch(): background='process' measures parameters on the CPU only; these live on "
                             f"{sorted({str(lay.param.device) for lay in self.layers})} (use True or 'thread')")
        self._step = 0
        self.ledger = Ledger(step=lambda: self._step)
        self.optimizer_names = _names([qualified_name(type(o)) for o in self.optimizers])
        self.optimizer_name = self.optimizer_names[0]
        self._notes = all_coverage_notes(self.adapters, self.optimizers, self.optimizer_names)
        # Under torch.distributed only rank 0 measures the optimizer and writes; every rank keeps the same step
        # count and runs the instruments' hooks, whose collectives must line up. FSDP2 (DTensor parameters):
        # every rank measures the layers it owns from gathered full matrices.
        self.writes = distributed.rank() == 0
        self.sharded = distributed.active() and any(distributed.is_sharded(lay.param) for lay in self.layers)
        self.budget = Budget(float(opts.overhead)) if opts.overhead is not None else None
        self.record = self._optimizer_record(opts)
        self.instruments = self._instruments(opts, model)
        self._base_every = [obj.every for obj in self._all()]  # the user's cadence, which the budget stretches
        self._window_from: float | None = None
        self._child_from = 0.0  # the worker process's CPU seconds at the window's start
        self.path, self.writer = str(path), DiscardWriter(path)
        self._tb = None
        self._closed = False
        self._lock = threading.Lock()  # the TensorBoard sink is shared with the measuring threads
        self._scalars: dict[str, float] = {}
        self._scalar_step: int | None = None
        self.monitor = self._monitor(opts)
        start = self._open(path, opts, model)
        if opts.tensorboard is not None and self.writes:
            from .tensorboard import TensorBoardSink

            self._tb = TensorBoardSink(opts.tensorboard)
        self._step = start
        self.record.start(start)
        finishers = {inst.group: inst.finisher for inst in self._all()}
        self.runner = make_runner(
            opts.background, on_cpu=on_cpu, distributed=distributed.active(),
            inline_only=self.sharded or not self.writes, sink=self._emit, ledger=self.ledger,
            devices={lay.param.device for lay in self.layers}, writer=self.writer, specs=self._specs,
            finishers={g: f for g, f in finishers.items() if getattr(f, "portable", True)},
            storage_options=opts.storage_options, name=self.path, lend_core=opts.lend_core)
        self.background = not isinstance(self.runner, InlineRunner)
        for inst in self.instruments:  # hooks copy what is finished elsewhere (not what must be reduced here)
            inst.defer = self.runner.finishes_elsewhere(inst.group, inst.finisher) and getattr(inst, "may_defer", True)
        # optimizers without torch's step hooks are stepped by hand: `stepping`
        self._by_hand = {j for j, opt in enumerate(self.optimizers) if arguments.steps_by_hand(opt)}
        self._stepped_by_hand: set[int] = set()
        self._handles = [h for j, opt in enumerate(self.optimizers) if j not in self._by_hand
                         for h in (opt.register_step_pre_hook(functools.partial(self._before_step, j)),
                                   opt.register_step_post_hook(functools.partial(self._after_step, j)))]
        self._atexit = _close_at_exit(self)
        _register_exit(self._atexit)

    # ---- layout -------------------------------------------------------------------------------------
    def _optimizer_record(self, opts: arguments.Options) -> OptimizerRecord:
        methods = {lay.name: choose_method(lay.rows, lay.cols, opts.exact_max, opts.sv_method) for lay in self.layers}
        measurer = Measurer([lay.name for lay in self.layers], methods, self.quantiles, self.ns_floor,
                            {lay.name: self.adapters[lay.optimizer] for lay in self.layers},
                            {lay.name: lay.view for lay in self.layers})
        record = OptimizerRecord(self.optimizers, self.layers, self.adapters, self.every, measurer,
                                 self.optimizer_names, self._note, takes=self.writes or self.sharded)
        if self.sharded:  # the gathers are collectives of the training thread
            record.finisher = distributed.ShardedMeasurer(measurer, self.writes)
        return record

    def _instruments(self, opts: arguments.Options, model: nn.Module | None) -> list[Any]:
        """The module-hook instruments asked for, bound; default activations only where there is something to
        hook (a model with watched linear layers)."""
        activations = ActivationSpectra() if opts.activations is True else opts.activations
        gradients = GradientSpectra() if opts.gradients is True else opts.gradients
        weights = WeightSpectra() if opts.weights is True else opts.weights
        attention = AttentionLogits() if opts.attention is True else opts.attention
        instruments = [i for i in (activations, gradients, opts.sharpness, weights, attention) if i]
        ctx = Context(model, self.layers, self.optimizer, lambda: self._step, self.ledger, self._pause, self.writes,
                      self._spend)
        try:
            for inst in list(instruments):
                try:
                    inst.bind(ctx)
                except ValueError:
                    if not (opts.activations is True and inst is activations):
                        raise
                    inst.remove()
                    instruments.remove(inst)
        except BaseException:
            for inst in instruments:
                inst.remove()
            raise
        return instruments

    def _monitor(self, opts: arguments.Options) -> health.Monitor | None:
        """The health rules' monitor (None with ``health=None``), told each layer's shape and NS configuration."""
        if not opts.health or not self.writes:
            return None
        extra = [health.as_rule(r) for r in opts.health] if isinstance(opts.health, (list, tuple)) else []
        layers = {}
        for lay in self.layers:
            opt, adapter = self.optimizers[lay.optimizer], self.adapters[lay.optimizer]
            group = next((g for g in opt.param_groups if any(p is lay.param for p in g["params"])), None)
            ns = ns_of(adapter, group) if group is not None else None
            layers[lay.name] = health.LayerInfo(lay.rows, lay.cols, getattr(ns, "steps", None),
                                                getattr(ns, "coefficients", None))
        self._health_lock = threading.Lock()
        return health.Monitor([*health.RULES, *extra], layers, self.ns_floor)

    def _attributes(self, opts: arguments.Options, model: nn.Module | None) -> dict[str, Any]:
        size = opts.model_size
        if size is None:
            params = model.parameters() if model is not None else (p for o in self.optimizers for g in o.param_groups
                                                                   for p in g["params"])
            size = sum(p.numel() for p in {id(p): p for p in params}.values())
        return {
            "name": opts.name or Path(self.path.rstrip("/")).name.removesuffix(".zarr"),
            "model_size": int(size),
            "optimizer": [_describe(o, a, n) for o, a, n in zip(self.optimizers, self.adapters, self.optimizer_names,
                                                                 strict=True)],
            "meta": dict(opts.meta or {}),
            "every": self.every,
            "ns_floor": self.ns_floor,  # the f_k floor behind ns_fail_frac, so readers can draw its threshold
            "notes": dict(self._notes),  # what is not recorded, and why (readers show it beside the NaNs)
            **({"overhead": self.overhead_report()} if self.budget is not None else {}),
        }

    def _open(self, path: str | Path, opts: arguments.Options, model: nn.Module | None) -> int:
        """Lay the store out (rank 0), agree on the first step with the other ranks; returns it."""
        specs = [self.record.spec(), GroupSpec("scalars", dynamic=True), *(inst.spec() for inst in self.instruments)]
        if self.monitor is not None:
            specs.append(GroupSpec("health", {}, schema.HEALTH.dims(), strings=schema.HEALTH.strings()))
        self._specs = {sp.name: sp for sp in specs}
        self._tb_axes = {sp.name: sp.axes() for sp in specs}  # what TensorBoard tags are named after
        try:
            if self.writes:
                try:
                    arguments.check_writable(path)
                    self.writer = RunWriter(path, specs, self._attributes(opts, model), resume=opts.resume,
                                            overwrite=opts.overwrite, must_match=("every",),
                                            flush_seconds=opts.flush_seconds, storage_options=opts.storage_options)
                except BaseException:
                    distributed.broadcast_ints([0, 0])  # the other ranks fail too instead of waiting
                    raise
            ok, start = distributed.broadcast_ints([1, self._resume_step() if opts.resume and self.writes else 0])
            if not ok:
                raise RuntimeError(f"watch(): rank 0 could not open the run store {path} (its error says why)")
        except BaseException:
            for inst in self.instruments:
                inst.remove()
            raise
        self.path = self.writer.path
        if opts.resume:
            self.ledger.restore(self.writer._attrs.get("errors", {}))
            if self.monitor is not None:
                self._resume_health()
        return start

    def _resume_health(self) -> None:
        """The health monitor of a resumed run takes up its open alerts, and each group's first and last records."""
        def rows(group: str, start: int, stop: int | None = None) -> list[dict[str, Any]]:
            cols = self.writer.committed(group, start, stop)
            cols.pop("step", None)
            n = len(next(iter(cols.values()))) if cols else 0
            return [{v: a[i] for v, a in cols.items()} for i in range(n)]

        groups = [g for g in self._specs if g != "health"]
        first = {g: r[0] for g in groups if (r := rows(g, 0, 1))}
        history = {g: r for g in groups if (r := rows(g, -health.HISTORY))}
        self.monitor.resume(health.events(self.writer.committed("health")), first, history)

    def _resume_step(self) -> int:
        seen = [int(self.writer._attrs.get("steps", 0))]
        for g in ("optimizer", "scalars"):
            last = self.writer.last_step(g)
            if last is not None:
                seen.append(last + 1)
        return max(seen)

    def _all(self) -> list[Any]:
        return [self.record, *self.instruments]

    def _note(self, family: str, text: str) -> None:
        self._notes[family] = text
        self.writer.update_attrs(notes=dict(self._notes))

    # ---- public -------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Index of the last completed optimizer step (−1 before the first)."""
        return self._step - 1

    @property
    def errors(self) -> dict[str, dict[str, int]]:
        """Counts of metrics that came out NaN/Inf or failed, as {metric: {layer: count}}."""
        return self.ledger.counts

    def log(self, **scalars: float | Tensor) -> None:
        """Record scalars (``loss=loss``) at the current step into group ``scalars``; tensors are read when the
        row is written, one host copy per step."""
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
        self.runner.flush()
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
        for gone in self.record.unfinished():
            self.ledger.lost(self.record.group, "lost: not every watched optimizer stepped in it", gone)
        for j in sorted(self._by_hand - self._stepped_by_hand):
            log.warning("spectralscope: %s has no step hooks and none of its steps went through rec.stepping(): "
                        "nothing of it was recorded (write `with rec.stepping(): opt.step()`)", self.optimizer_names[j])
        for inst in self._all():
            inst.remove()
        atexit.unregister(self._atexit)
        self.runner.close()
        self._push_scalars()
        if self.budget is not None:
            self.writer.update_attrs(overhead=self.overhead_report())
        self.writer.update_attrs(steps=self._step, errors=self.errors)
        self.writer.close()
        summary = self.ledger.summary(self.path)
        if summary is not None:
            log.warning(summary)
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Recorder:
        return self

    @contextlib.contextmanager
    def stepping(self, optimizer: Any = None) -> Iterator[None]:
        """For an optimizer without torch's step hooks (not a ``torch.optim.Optimizer`` subclass, e.g.
        modded-nanogpt's): ``with rec.stepping(): opt.step()`` records that step as the hooks record a torch
        optimizer's (what is read before the step, then after it). ``optimizer``: which of the watched ones (default
        the first). A step that raises is not recorded, as torch's post-step hook would not run."""
        j = 0 if optimizer is None else next((i for i, o in enumerate(self.optimizers)
                                              if o is optimizer or o is arguments.unwrap(optimizer)), None)
        if j is None:
            raise ValueError("stepping(): that optimizer is not one this recorder watches")
        if j not in self._by_hand:
            raise ValueError(f"stepping(): {self.optimizer_names[j]} has torch's step hooks, which record its steps; "
                             "call its step() as usual")
        self._stepped_by_hand.add(j)
        self._before_step(j, self.optimizers[j], (), {})
        yield
        self._after_step(j, self.optimizers[j], (), {})

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the two optimizer hooks ----------------------------------------------------------------------
    def _pause(self, flag: bool) -> None:
        for inst in self.instruments:
            inst.paused = flag

    def _spend(self, seconds: float) -> None:
        if self.budget is not None:
            self.budget.spend(seconds)

    def _before_step(self, j: int, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before optimizer ``j`` steps (0: the clock, which also drives the module instruments)."""
        self.runner.tick()
        if self.budget is None:
            return self._before(j)
        t = time.perf_counter()
        try:
            return self._before(j)
        finally:
            self.budget.spend(time.perf_counter() - t)

    def _before(self, j: int) -> None:
        try:
            self.record.before(j)
        except Exception as exc:  # out of memory for a snapshot: that record's update part is skipped
            self.ledger.failed("update", "*", exc)
        if j != 0:
            return
        for inst in self.instruments:
            if hasattr(inst, "before_step"):
                try:
                    inst.before_step(self._step)
                except Exception as exc:
                    self.ledger.failed(inst.group, "*", exc)

    def _after_step(self, j: int, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After optimizer ``j`` stepped: its part of the optimizer record (submitted once every optimizer has
        stepped), and for the clock the module instruments' records and the next training step."""
        self.runner.tick()
        if self.budget is None:
            return self._after(j)
        t = time.perf_counter()
        try:
            self._after(j)
        finally:
            self.budget.spend(time.perf_counter() - t)
            if j == 0:
                self._budget_decision(self._step - 1)

    def _budget_decision(self, step: int) -> None:
        """At a step that may end a budget window (a multiple of twice the stretched optimizer cadence, where both a
        doubling and a halving keep every optimizer's part of a record on the same steps): a window at least
        `budget.MIN_WINDOW_SECONDS` long ends, and its share sets the next stretch, applied to every group from the
        next step on. Under torch.distributed rank 0 decides for every rank (small broadcasts at these steps only):
        all ranks must record the same steps, the instruments' collectives depend on it."""
        budget = self.budget
        span = 2 * self._base_every[0] * budget.stretch
        if step % span != 0:
            return
        now = time.perf_counter()
        child = self._child_cpu()
        process = getattr(self.runner, "process", None)
        # the first window starts at the first decision step, once a worker process is ready: the first records
        # carry one-off costs, and those measured inline while the worker starts are not what recording will cost
        starting = self._window_from is None or (process is not None and not process.ready)
        closes = not starting and now - self._window_from >= budget_policy.MIN_WINDOW_SECONDS
        if distributed.active():  # every rank takes part, whatever its own state
            closes = bool(distributed.broadcast_ints([int(closes)])[0])
        if not closes:
            if starting:
                self._window_from, self._child_from = now, child
                budget.window_cost = 0.0
            return
        if starting:  # a rank whose own window had not begun: rank 0's decision is all that counts here
            self._window_from, self._child_from = now, child
        budget.spend(child - self._child_from)
        old = budget.stretch
        agree = (lambda s: distributed.broadcast_ints([s])[0]) if distributed.active() else None
        budget.decide(step, now - self._window_from, agree)
        self._window_from, self._child_from = now, child
        if budget.stretch != old:
            for obj, base in zip(self._all(), self._base_every, strict=True):
                obj.every = base * budget.stretch
        self.writer.update_attrs(overhead=self.overhead_report())

    def _child_cpu(self) -> float:
        """The worker process's CPU seconds, when it competes with training for the cores: torch's threads, as the
        user set them, take every usable core (its nice level makes it yield, and ``lend_core`` lends it a core when
        it falls behind, yet what it runs is then not training's). Counted whole, so the budget errs on the side of
        training. 0 with a core to spare, or without a worker process."""
        process = getattr(self.runner, "process", None)
        if process is None or threads.training_threads() < threads.usable_cores():
            return 0.0
        return process.cpu_seconds()

    def overhead_report(self) -> dict[str, Any] | None:
        """The budget's account (root attribute ``overhead``): the budget, the share of training time recording
        took (over the run, and since the stretch last changed), the stretch, each group's cadence, and the steps the
        stretch changed at; None without a budget."""
        budget = self.budget
        if budget is None:
            return None
        return {"budget": budget.budget, "achieved": _jsonable(budget.share),
                "settled_share": _jsonable(budget.settled_share), "stretch": budget.stretch,
                "cadence": {obj.group: obj.every for obj in self._all()},
                "changes": [list(c) for c in budget.changes[-100:]]}

    def _after(self, j: int) -> None:
        step = self._step
        try:
            try:
                done, given_up = self.record.after(j)
                for gone in given_up:
                    self.ledger.lost(self.record.group, "lost: not every watched optimizer stepped in it", gone)
                if done is not None:
                    self.runner.submit(self.record.group, done[0], done[1], self.record.finisher, self.record.live)
            except Exception as exc:  # never into the training loop: that record is lost
                self.ledger.lost(self.record.group, f"failed ({type(exc).__name__}: {exc})", step)
            if j != 0:
                return
            for inst in self.instruments:
                try:
                    payload = inst.take(step)
                    if payload is not None:
                        self.runner.submit(inst.group, step, payload, inst.finisher, inst.live)
                except Exception as exc:
                    self.ledger.lost(inst.group, f"failed ({type(exc).__name__}: {exc})", step)
            if any(step % inst.every == 0 for inst in self._all()):
                self.writer.update_attrs(steps=step + 1, errors=self.errors)
        finally:
            if j == 0:
                self._step += 1

    # ---- rows back from the runner ---------------------------------------------------------------------
    def _emit(self, group: str, step: int, row: Mapping[str, Any] | None, problems: list, stored: bool) -> None:
        """A finished record: count its problems, append its row (unless the worker process has: ``stored``) and
        give it to TensorBoard."""
        for var, layer, reason in problems:
            self.ledger.count(var, layer, reason, step)
        if row is None:
            return
        if not stored:
            self.writer.append(group, step, row)
        if group == self.record.group:
            self.record.inspect(step, row)
        self._to_tensorboard(group, step, row)
        self._check_health(group, step, row)

    def _check_health(self, group: str, step: int, row: Mapping[str, Any]) -> None:
        """Run the health rules on a committed record: each alert that starts or ends is one log line and one row
        of the ``health`` group (`spectralscope.health`)."""
        if self.monitor is None:
            return
        units, levels = self._tb_axes.get(group, ([], []))
        with self._health_lock:
            failed = set(self.monitor.failed)
            events = self.monitor.observe(group, step, row, units, levels)
            new = {k: v for k, v in self.monitor.failed.items() if k not in failed}
        for name, why in new.items():
            log.warning("spectralscope: health rule %s failed at step %d (%s); it is skipped from now on", name,
                        step, why)
            self._note("health", f"rule {name} failed ({why})")
        for e in events:
            self.writer.append("health", e.step, e.row())
            level = {"critical": logging.ERROR, "warning": logging.WARNING}.get(e.severity, logging.INFO)
            where = "" if e.layer == "*" else f" {e.layer}"
            log.log(level, "spectralscope health: %s %s %s%s at step %d: %s", e.severity, e.rule,
                    "started" if e.state == "start" else "ended", where, e.step,
                    e.message if e.state == "start" else f"value {e.value:.4g}")

    def _to_tensorboard(self, group: str, step: int, row: Mapping[str, Any]) -> None:
        if self._tb is not None:
            try:
                with self._lock:
                    self._tb.write(group, step, row, *self._tb_axes[group])
            except Exception as exc:  # a full disk must not stop training
                self.ledger.failed("tensorboard", "*", exc)

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
        self._check_health("scalars", self._scalar_step, values)
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
    `ss.Sharpness(loss_fn, batch, every=100, per_layer=False)`; off by default), ``weights`` (an
    `ss.WeightSpectra`, or True for every=100: σ(W) quantiles, the ESD power-law exponent and the stable rank of
    every watched layer; off by default), ``attention`` (an `ss.AttentionLogits`, or True for every=50: per attention
module and head the max, mean and 99th percentile of the logits scale·q·k of the ``scaled_dot_product_attention``
calls of a recorded step's forward; off by default), ``tensorboard`` (a log
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
    what it measured when its parent is gone; not under FSDP2; the rows are bit for bit the inline ones; the
    worker process runs at nice 19 on one thread, and a record on the training thread holds the BLAS pools to
    one thread, `spectralscope.threads`), ``lend_core`` (False by default; True: when a record is handed to the
    worker process while it still measures an earlier one, and torch's threads take every usable core, training
    runs on one torch thread fewer until the first optimizer hook after the child has nothing in flight. Much
    faster at torch's default thread count when the records are large against the steps, but the steps trained
    meanwhile order their float32 sums for fewer threads, so the parameters are no longer bit for bit those of
    an unwatched run, nor of another watched one: which steps are lent depends on the child's timing.
    `spectralscope.threads`), ``overhead`` (a budget: the share of training time recording may take, 0.02 by
    default; None: no budget, the cadence given whatever it costs. The training thread's wall time in the
    recorder's hooks, waits for a record in flight included, and the worker process's CPU time when torch's
    threads take every core, is measured against the time between decisions (windows of at least a second, the
    first once a worker process is ready; under torch.distributed rank 0 decides for all ranks), and every group's
    cadence is stretched ×2 while over budget and relaxed ×½ under a quarter of it, never below the user's:
    `spectralscope.budget`; the root attribute ``overhead`` and ``spectralscope info`` give the share and the
    cadence used).
    Under torch.distributed call it on every rank with the same arguments: only rank 0 writes (the path is
    not touched elsewhere); with FSDP2 (DTensor parameters) every rank measures its round-robin share of
    the layers on gathered full matrices.
    Returns the `Recorder`; use it as a context manager or call ``close()``.
    """
    return Recorder(optimizer, model, path, **options)
