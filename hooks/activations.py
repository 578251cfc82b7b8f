"""`ActivationSpectra`: covariance spectra of the inputs of linear layers, from forward pre-hooks.

At a recorded step (step % every == 0) every forward pass before ``optimizer.step()`` adds its inputs,
flattened to (tokens, d), to float64 sufficient statistics, up to ``max_tokens`` tokens per module
(a uniform subsample from a private generator once the budget would be exceeded); after the step the
spectrum is taken and the statistics reset. The formulas live in `spectralscope.covariance`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from spectralscope import distributed, schema
from spectralscope.covariance import CovarianceStats, activation_metrics, covariance_eigenvalues, token_matrix
from spectralscope.layers import in_features
from spectralscope.store import GroupSpec

from .modules import Context, check_every, check_modules, find_modules, module_coords, module_kinds

#: The per-module summaries of a spectrum (every activations variable but act_eig).
SCALARS = tuple(v for v in schema.ACTIVATIONS.names() if v != "act_eig")


class _Deferred:
    """A record's rows for one statistics slot, kept as copies to be summed later (``defer``): the forward
    hook only copies, and `ActivationSpectra.finish` adds them up, off the training thread."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.rows.append(x.clone())


class ActivationFinisher:
    """Turns a record's statistics into its row (the covariance spectra and their summaries), for modules
    ``names`` of input widths ``dims``. Holds each module's float64 buffers from one record to the next
    (fresh d×d buffers every record would land on new pages: page faults cost as much as the small
    products). No hooks: it runs where the record is finished — the training thread, a worker thread or
    a worker process (`spectralscope.worker`)."""

    def __init__(self, names: Sequence[str], dims: Sequence[int]) -> None:
        self.names, self.dims = list(names), list(dims)
        self._spare: dict[int, CovarianceStats] = {}

    def __getstate__(self) -> dict:
        return {"names": self.names, "dims": self.dims, "_spare": {}}  # buffers stay with their process

    def reused(self, i: int, d: int, device: torch.device) -> CovarianceStats:
        """Zeroed statistics for module i: its buffers from the last record when they fit."""
        st = self._spare.get(i)
        if st is None or st.s.shape[0] != d or st.s.device != device:
            st = self._spare[i] = CovarianceStats.zeros(d, device)
        else:
            st.reset()
        return st

    def summed(self, taken: list) -> list[CovarianceStats | None]:
        """Deferred copies summed into statistics (one per shared slot, in module i's reused buffers)."""
        out: list[CovarianceStats | None] = []
        done: dict[int, CovarianceStats] = {}
        for i, st in enumerate(taken):
            if isinstance(st, _Deferred):
                if id(st) not in done:
                    summed = done[id(st)] = self.reused(i, self.dims[i], st.rows[0].device)
                    for x in st.rows:
                        summed.add(x)
                st = done[id(st)]
            out.append(st)
        return out

    def finish(self, taken: list) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        """The row from the statistics `ActivationSpectra.take` returned, and (metric, module, why) of every value
        that is not finite or failed."""
        problems: list[tuple[str, str, str]] = []
        report = lambda *p: problems.append(p)  # noqa: E731
        stats = self.summed(taken)
        nm, nr = len(self.names), max(self.dims)
        out = {"act_eig": np.full((nm, nr), np.nan), **{v: np.full(nm, np.nan) for v in SCALARS}}
        done: dict[int, dict[str, torch.Tensor]] = {}  # shared statistics are decomposed once
        for i, st in enumerate(stats):
            if st is None:
                continue
            try:
                if id(st) not in done:
                    done[id(st)] = activation_metrics(covariance_eigenvalues(st))
                metrics = dict(done[id(st)])
            except Exception as exc:
                report("act_eig", self.names[i], f"failed ({type(exc).__name__}: {exc})")
                continue
            lam = metrics.pop("act_eig").cpu().numpy()
            out["act_eig"][i, : len(lam)] = lam
            for k, v in metrics.items():
                out[k][i] = float(v)
            out["act_tokens"][i] = float(st.n)
            for k in ("act_eig", "act_soft_rank", "act_hard_rank", "act_top10_share"):
                val = out[k][i]
                if not np.isfinite(val[: len(lam)] if k == "act_eig" else val).all():
                    report(k, self.names[i], "is not finite")
        return out, problems


class ActivationSpectra:
    """Record ``act_eig``, ``act_soft_rank``, ``act_hard_rank``, ``act_tail_alpha``, ``act_top10_share`` and
    ``act_tokens`` every ``every`` optimizer steps, for the inputs of the watched linear layers (``nn.Linear``,
    transformers' ``Conv1D``) or of the modules named in ``modules``."""

    group = "activations"

    @property
    def may_defer(self) -> bool:
        """Whether hooks may keep copies for the record to be finished elsewhere: not under torch.distributed,
        where the statistics are summed over the ranks on the training thread."""
        return not distributed.active()

    def __init__(self, every: int = 50, max_tokens: int = 4096, modules: Sequence[str] | None = None, seed: int = 0):
        check_every("ActivationSpectra", every)
        if not (isinstance(max_tokens, int) and max_tokens >= 2):
            raise ValueError(f"ActivationSpectra: max_tokens must be an int >= 2, got {max_tokens!r}")
        self.every = every
        self.max_tokens = max_tokens
        self.modules = check_modules("ActivationSpectra", modules)
        self.seed = seed
        self._names: list[str] = []
        self._dims: list[int] = []
        self._stats: list[CovarianceStats | None] = []
        self.finisher = ActivationFinisher([], [])
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._gen: torch.Generator | None = None
        # inputs already accumulated this step, by tensor identity: q, k and v read the same tensor, and
        # its statistics are computed once and shared
        self._seen: dict[int, tuple[weakref.ref, int]] = {}
        self._writes = True
        self.paused = False
        self.live = False  # the payload: statistics, or copies of the inputs (``defer``)
        # set by watch when records are finished off the training thread (outside torch.distributed): hooks keep
        # copies, the finisher sums them
        self.defer = False
        # tokens in each statistics slot of this record, counted on the host (reading st.n would wait for
        # the device at every forward of a record step)
        self._tokens: dict[int, int] = {}

    # ---- wiring -------------------------------------------------------------------------------------
    def bind(self, ctx: Context) -> None:
        """Find the modules and register a forward pre-hook on each."""
        chosen = find_modules(ctx.model, ctx.layers, self.modules, "ActivationSpectra")
        self.remove()  # an instance handed to a second watch() starts afresh
        self._names, self._dims, self._stats, self._seen, self._tokens = [], [], [], {}, {}
        self._kinds = module_kinds(chosen, ctx.layers)
        self.defer = False
        self._step, self._ledger, self._writes, self._spend = ctx.step, ctx.ledger, ctx.writes, ctx.spend
        for i, (name, module) in enumerate(chosen):
            self._names.append(name)
            self._dims.append(in_features(module))
            self._stats.append(None)
            self._handles.append(module.register_forward_pre_hook(self._hook(i)))
        self.finisher = ActivationFinisher(self._names, self._dims)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def spec(self) -> GroupSpec:
        coords = {
            **module_coords(self._names, kinds=self._kinds),
            "width": ("module", np.array(self._dims, dtype=np.int64)),
            "rank": ("rank", np.arange(1, max(self._dims) + 1, dtype=np.int64)),
        }
        variables = schema.ACTIVATIONS.dims()
        return GroupSpec(self.group, coords, variables)

    # ---- hooks --------------------------------------------------------------------------------------
    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.paused or not args or self._step() % self.every != 0:
                return
            t = time.perf_counter()
            try:
                self._add(i, args[0])
            except Exception as exc:  # never into the forward pass
                self._ledger.failed("act_eig", self._names[i], exc)
            finally:
                self._spend(time.perf_counter() - t)

        return hook

    def _add(self, i: int, x: torch.Tensor) -> None:
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x:
            owner = seen[1]
            if self._stats[i] is None or self._stats[i] is self._stats[owner]:
                self._stats[i] = self._stats[owner]
                return
        self._seen[id(x)] = (weakref.ref(x), i)
        with torch.no_grad():
            x = token_matrix(x.detach())
            st = self._stats[i]
            if st is None:
                st = self._stats[i] = self._fresh(i, x.shape[-1], x.device)
            room = self.max_tokens - self._tokens.get(id(st), 0)
            if room <= 0:
                return
            if x.shape[0] > room:
                if self._gen is None or self._gen.device != x.device:
                    self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
                keep = torch.randperm(x.shape[0], generator=self._gen, device=x.device)[:room]
                x = x[keep]
            st.add(x)
            self._tokens[id(st)] = self._tokens.get(id(st), 0) + x.shape[0]

    def _fresh(self, i: int, d: int, device: torch.device) -> CovarianceStats | _Deferred:
        """Empty statistics for module i: copies to sum later (``defer``) or reused zeroed ones."""
        return _Deferred() if self.defer else self.finisher.reused(i, d, device)

    def _all_reduce(self) -> None:
        """Under torch.distributed, sum every module's (n, Σx, Σxxᵀ) over the ranks in one collective, so each
        rank decomposes the statistics of the whole batch. Every rank takes part for every module (zeros
        where it saw nothing), so the collective never waits on a rank that skipped a module."""
        if not distributed.active():
            return
        device = distributed.collective_device(next((st.s.device for st in self._stats if st is not None), None))
        parts = []
        for st, d in zip(self._stats, self._dims, strict=True):
            st = st or CovarianceStats.zeros(d, device)
            parts.append(torch.cat([st.n.reshape(1), st.s, st.ss.reshape(-1)]).to(device))
        flat = torch.cat(parts)
        distributed.all_reduce(flat)
        offset = 0
        for i, d in enumerate(self._dims):
            n, s, ss = flat[offset], flat[offset + 1 : offset + 1 + d], flat[offset + 1 + d : offset + 1 + d + d * d]
            offset += 1 + d + d * d
            self._stats[i] = CovarianceStats(n.clone(), s.clone(), ss.reshape(d, d).clone()) if float(n) > 0 else None

    def take(self, step: int) -> list | None:
        """On the training thread, after the step: this record's statistics (summed over the ranks under
        torch.distributed), leaving the instrument ready for the next one; None when ``step`` is not
        recorded or this rank does not write. The finisher turns them into the row."""
        if step % self.every != 0:
            return None
        self._seen.clear()
        self._tokens.clear()
        self._all_reduce()
        taken, self._stats = self._stats, [None] * len(self._stats)
        return taken if self._writes else None  # other ranks took part in the sum; rank 0 writes it
