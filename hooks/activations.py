"""`ActivationSpectra`: covariance spectra of the inputs of linear layers, from forward pre-hooks.

At a recorded step (step % every == 0) every forward pass before ``optimizer.step()`` adds its inputs,
flattened to (tokens, d), to float64 sufficient statistics, up to ``max_tokens`` tokens per module
(a uniform subsample from a private generator once the budget would be exceeded); after the step the
spectrum is taken and the statistics reset. The formulas live in `spectralscope.covariance`.

With ``buckets`` (token-frequency buckets, `spectralscope.buckets`), a forward pre-hook on the model reads the
batch's token ids (``tokens(args, kwargs)``), and each kept row of a module's input is also added to the
statistics of its token's bucket; every variable then has a ``bucket`` dimension, ``all`` first.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from spectralscope import distributed, schema
from spectralscope.buckets import ALL, bucket_lookup, check_buckets
from spectralscope.covariance import CovarianceStats, activation_metrics, covariance_eigenvalues, token_matrix
from spectralscope.layers import in_features
from spectralscope.store import GroupSpec
from spectralscope.threads import one_blas_thread

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

    def __init__(self, names: Sequence[str], dims: Sequence[int], buckets: Sequence[str] = ()) -> None:
        self.names, self.dims, self.buckets = list(names), list(dims), list(buckets)
        self._spare: dict[tuple[int, int], CovarianceStats] = {}

    def __getstate__(self) -> dict:
        return {"names": self.names, "dims": self.dims, "buckets": self.buckets, "_spare": {}}  # buffers stay here

    def reused(self, i: int, d: int, device: torch.device, slot: int = 0) -> CovarianceStats:
        """Zeroed statistics for module i (``slot`` 0: all tokens, j + 1: bucket j): its buffers from the last
        record when they fit."""
        st = self._spare.get((i, slot))
        if st is None or st.s.shape[0] != d or st.s.device != device:
            st = self._spare[(i, slot)] = CovarianceStats.zeros(d, device)
        else:
            st.reset()
        return st

    def summed(self, taken: list, slot: int = 0) -> list[CovarianceStats | None]:
        """Deferred copies summed into statistics (one per shared slot, in module i's reused buffers)."""
        out: list[CovarianceStats | None] = []
        done: dict[int, CovarianceStats] = {}
        for i, st in enumerate(taken):
            if isinstance(st, _Deferred):
                if id(st) not in done:
                    summed = done[id(st)] = self.reused(i, self.dims[i], st.rows[0].device, slot)
                    for x in st.rows:
                        summed.add(x)
                st = done[id(st)]
            out.append(st)
        return out

    def finish(self, taken: list | tuple) -> tuple[dict[str, np.ndarray], list[tuple[str, str, str]]]:
        """The row from the statistics `ActivationSpectra.take` returned, and (metric, module, why) of every value
        that is not finite or failed. With buckets ``taken`` is (all, per bucket) and every variable gains the
        bucket axis after the module axis, ``all`` first."""
        if not self.buckets:
            return self._finish(self.summed(taken))
        every, per_bucket = taken
        first, problems = self._finish(self.summed(every))
        rows = [first]
        for j, name in enumerate(self.buckets):
            row, probs = self._finish(self.summed(per_bucket[j], j + 1), bucket=name)
            rows.append(row)
            problems += probs
        return {v: np.stack([r[v] for r in rows], axis=1) for v in first}, problems

    def _finish(self, stats: list, bucket: str | None = None):
        """One slot's row from its statistics. In a ``bucket``, a module that saw fewer than 2 of its tokens in
        this record has NaN spectra (``act_tokens`` says how many), reported as such."""
        problems: list[tuple[str, str, str]] = []
        report = lambda *p: problems.append(p)  # noqa: E731
        nm, nr = len(self.names), max(self.dims)
        out = {"act_eig": np.full((nm, nr), np.nan), **{v: np.full(nm, np.nan) for v in SCALARS}}
        if bucket is not None:
            out["act_tokens"][:] = 0.0
        done: dict[int, dict[str, torch.Tensor]] = {}  # shared statistics are decomposed once
        for i, st in enumerate(stats):
            if bucket is not None and (st is None or float(st.n) < 2):
                out["act_tokens"][i] = 0.0 if st is None else float(st.n)
                report("act_eig", f"{self.names[i]} [{bucket}]", f"has fewer than 2 tokens of bucket {bucket!r} in "
                       "the record")
                continue
            if st is None:
                continue
            try:
                if id(st) not in done:
                    done[id(st)] = activation_metrics(covariance_eigenvalues(st))
                metrics = dict(done[id(st)])
            except Exception as exc:
                where = self.names[i] if bucket is None else f"{self.names[i]} [{bucket}]"
                report("act_eig", where, f"failed ({type(exc).__name__}: {exc})")
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


def input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The token ids of a model call: ``input_ids=`` (HF models), else its first integer tensor argument."""
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point()
                    and not a.is_complex() and a.dtype != torch.bool), None)
    return ids


class ActivationSpectra:
    """Record ``act_eig``, ``act_soft_rank``, ``act_hard_rank``, ``act_tail_alpha``, ``act_top10_share`` and
    ``act_tokens`` every ``every`` optimizer steps, for the inputs of the watched linear layers (``nn.Linear``,
    transformers' ``Conv1D``) or of the modules named in ``modules``.

    ``buckets``: {name: token ids} (e.g. `spectralscope.buckets.frequency_buckets` of the corpus) to record the
    same spectra per bucket, from the rows of each module's input whose token is in it; ``tokens(args, kwargs)``
    returns the token ids of a model call, shaped as the modules' inputs' leading dimensions (default
    `input_ids`). A module whose input rows do not line up with the batch's ids (a different sequence length)
    gets NaN per-bucket values, said once."""

    group = "activations"

    @property
    def may_defer(self) -> bool:
        """Whether hooks may keep copies for the record to be finished elsewhere: not under torch.distributed,
        where the statistics are summed over the ranks on the training thread."""
        return not distributed.active()

    def __init__(self, every: int = 50, max_tokens: int = 4096, modules: Sequence[str] | None = None, seed: int = 0,
                 buckets: Mapping[str, Iterable[int]] | None = None,
                 tokens: Callable[[tuple, dict], torch.Tensor | None] | None = None):
        check_every("ActivationSpectra", every)
        self.buckets = check_buckets(buckets) if buckets is not None else {}
        if tokens is not None and not callable(tokens):
            raise ValueError(f"ActivationSpectra: tokens must be a function (args, kwargs) -> token ids, got {tokens!r}")
        self.tokens = tokens or input_ids
        self._lookup = torch.as_tensor(bucket_lookup(self.buckets)) if self.buckets else None
        self._ids: torch.Tensor | None = None
        self._bstats: list[list] = []
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
        self._bstats, self._ids = [], None
        self._kinds = module_kinds(chosen, ctx.layers)
        self.defer = False
        self._step, self._ledger, self._writes, self._spend = ctx.step, ctx.ledger, ctx.writes, ctx.spend
        for i, (name, module) in enumerate(chosen):
            self._names.append(name)
            self._dims.append(in_features(module))
            self._stats.append(None)
            self._bstats.append([None] * len(self.buckets))
            self._handles.append(module.register_forward_pre_hook(self._hook(i)))
        if self.buckets:
            self._handles.append(ctx.model.register_forward_pre_hook(self._model_hook, with_kwargs=True))
        self.finisher = ActivationFinisher(self._names, self._dims, list(self.buckets))

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
        if self.buckets:
            coords["bucket"] = ("bucket", np.array([ALL, *self.buckets]))
            variables = {v: (*d[:2], "bucket", *d[2:]) for v, d in variables.items()}
        return GroupSpec(self.group, coords, variables)

    # ---- hooks --------------------------------------------------------------------------------------
    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.paused or not args or self._step() % self.every != 0:
                return
            t = time.perf_counter()
            try:
                # where the inputs are summed here, not deferred to a worker, SciPy's dsyrk runs inside training's
                # forward pass: OpenBLAS's pool at its own size would spin against torch's threads there
                with one_blas_thread():
                    self._add(i, args[0])
            except Exception as exc:  # never into the forward pass
                self._ledger.failed("act_eig", self._names[i], exc)
            finally:
                self._spend(time.perf_counter() - t)

        return hook

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The batch's token ids, for the buckets of this forward's module inputs."""
        if self.paused or self._step() % self.every != 0:
            return
        try:
            ids = self.tokens(args, kwargs)
            self._ids = ids.detach().reshape(-1) if isinstance(ids, torch.Tensor) else None
        except Exception as exc:  # never into the forward pass
            self._ids = None
            self._ledger.failed("act_eig", "[buckets]", exc)

    def _which(self, i: int, n: int) -> torch.Tensor | None:
        """The bucket index of each of the n input rows of module i (−1: in none), from the batch's ids."""
        ids = self._ids
        if ids is None or ids.numel() != n:
            why = ("no token ids were found in the model's call" if ids is None else
                   f"its input has {n} rows and the batch {ids.numel()} token ids")
            self._ledger.failed("act_eig", f"{self._names[i]} [buckets]", ValueError(why))
            return None
        lookup = self._lookup
        if lookup.device != ids.device:
            lookup = self._lookup = lookup.to(ids.device)
        inside = ids < lookup.numel()
        return torch.where(inside, lookup[ids.clamp(0, max(0, lookup.numel() - 1))], -1)

    def _add(self, i: int, x: torch.Tensor) -> None:
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x:
            owner = seen[1]
            if self._stats[i] is None or self._stats[i] is self._stats[owner]:
                self._stats[i] = self._stats[owner]
                if self.buckets:
                    self._bstats[i] = self._bstats[owner]
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
            which = self._which(i, x.shape[0]) if self.buckets else None
            if x.shape[0] > room:
                if self._gen is None or self._gen.device != x.device:
                    self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
                keep = torch.randperm(x.shape[0], generator=self._gen, device=x.device)[:room]
                x = x[keep]
                which = which[keep] if which is not None else None
            st.add(x)
            self._tokens[id(st)] = self._tokens.get(id(st), 0) + x.shape[0]
            if which is not None:
                slots = self._bstats[i]
                for j in range(len(self.buckets)):
                    rows = x[which == j]
                    if rows.shape[0]:
                        if slots[j] is None:
                            slots[j] = self._fresh(i, x.shape[-1], x.device, j + 1)
                        slots[j].add(rows)

    def _fresh(self, i: int, d: int, device: torch.device, slot: int = 0) -> CovarianceStats | _Deferred:
        """Empty statistics for module i (``slot`` 0: all tokens, j + 1: bucket j): copies to sum later
        (``defer``) or reused zeroed ones."""
        return _Deferred() if self.defer else self.finisher.reused(i, d, device, slot)

    def _all_reduce(self) -> None:
        """Under torch.distributed, sum every module's (n, Σx, Σxxᵀ) over the ranks in one collective (each bucket's
        too), so each rank decomposes the statistics of the whole batch. Every rank takes part for every slot
        (zeros where it saw nothing), so the collective never waits on a rank that skipped a module."""
        if not distributed.active():
            return
        slots = [(self._stats, i, d) for i, d in enumerate(self._dims)]
        slots += [(self._bstats[i], j, d) for i, d in enumerate(self._dims) for j in range(len(self.buckets))]
        present = [st.s.device for holder, k, _ in slots if (st := holder[k]) is not None]
        device = distributed.collective_device(present[0] if present else None)
        parts = []
        for holder, k, d in slots:
            st = holder[k] or CovarianceStats.zeros(d, device)
            parts.append(torch.cat([st.n.reshape(1), st.s, st.ss.reshape(-1)]).to(device))
        flat = torch.cat(parts)
        distributed.all_reduce(flat)
        offset = 0
        for holder, k, d in slots:
            n, s, ss = flat[offset], flat[offset + 1 : offset + 1 + d], flat[offset + 1 + d : offset + 1 + d + d * d]
            offset += 1 + d + d * d
            holder[k] = CovarianceStats(n.clone(), s.clone(), ss.reshape(d, d).clone()) if float(n) > 0 else None

    def take(self, step: int) -> list | None:
        """On the training thread, after the step: this record's statistics (summed over the ranks under
        torch.distributed), leaving the instrument ready for the next one; None when ``step`` is not
        recorded or this rank does not write. The finisher turns them into the row."""
        if step % self.every != 0:
            return None
        self._seen.clear()
        self._tokens.clear()
        self._ids = None
        self._all_reduce()
        taken, self._stats = self._stats, [None] * len(self._stats)
        if self.buckets:
            per_bucket = [[self._bstats[i][j] for i in range(len(self._dims))] for j in range(len(self.buckets))]
            self._bstats = [[None] * len(self.buckets) for _ in self._dims]
            taken = (taken, per_bucket)
        return taken if self._writes else None  # other ranks took part in the sum; rank 0 writes it
