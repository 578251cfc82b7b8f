"""What the recorder needs from torch.distributed: who this process is, small integer broadcasts, and
the gathers that put FSDP2's sharded matrices back together.

Only rank 0 writes a run; every rank runs the same hooks at the same steps so that the collectives (the
activation statistics' all-reduce, FSDP2's gathers) line up. Nothing is pickled: integers and values travel
as tensors on the backend's device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if active() else 0


def collective_device(preferred: torch.device | None = None) -> torch.device:
    """Where a tensor must live for the default group's backend: the current CUDA device under NCCL, else
    ``preferred`` (or the CPU)."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return preferred if preferred is not None else torch.device("cpu")


def _collective(call: Callable[..., dist.Work | None], held: Sequence[torch.Tensor]) -> None:
    """Run ``call(async_op=True)``, wait for it, then wait (at most 2 s) until the backend's worker thread has
    let go of ``held`` (the tensors the collective reads or writes).

    Why the second wait: gloo's worker thread drops its reference to a collective's tensors just after it
    signals completion. If Python has dropped a tensor by then, the worker must take the GIL to free the
    tensor's Python object, and if the interpreter is shutting down at that moment (a script that ends
    right after a record) the worker thread dies inside a C++ destructor and the process aborts with
    "terminate called without an active exception". Holding the tensors until the worker has let go makes
    its drop free of Python. Under NCCL the tensors stay with the watchdog until the GPU work is done, and
    waiting for that would be a host synchronisation, so only gloo is waited for."""
    base = [t._use_count() for t in held]
    work = call(async_op=True)
    if work is not None:
        work.wait()
        del work
    if dist.get_backend() != "gloo":
        return
    deadline = time.monotonic() + 2.0
    while any(t._use_count() > b for t, b in zip(held, base, strict=True)) and time.monotonic() < deadline:
        time.sleep(1e-4)


def all_reduce(t: torch.Tensor) -> None:
    """Sum ``t`` over the default group in place."""
    _collective(partial(dist.all_reduce, t), [t])


def broadcast_ints(values: Sequence[int], src: int = 0) -> list[int]:
    """``values`` as rank ``src`` holds them, on every rank (a no-op outside a process group)."""
    if not active():
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=collective_device())
    _collective(partial(dist.broadcast, t, src=src), [t])
    return [int(v) for v in t.tolist()]


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter or its optimizer state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _shard_rows(rows: int, world: int) -> list[int]:
    """Rows of dim 0 on each rank under Shard(0), as torch.chunk splits them (FSDP2's layout)."""
    per = -(-rows // world) if rows else 0
    return [max(0, min(per, rows - r * per)) for r in range(world)]


def gather_full(tensors: Sequence[torch.Tensor | None], dst: int, like: torch.Tensor) -> list[torch.Tensor | None]:
    """The full matrices of DTensors sharded along dim 0 (FSDP2), on rank ``dst``, in one gather: the other
    ranks get Nones. A None (no momentum yet) travels as NaN and comes back as None on ``dst``; a tensor that
    is not a DTensor is replicated and used as it is. ``like`` (the parameter) fixes shape, dtype, device."""
    me, world = rank(), world_size()
    shape, dtype = tuple(like.shape), like.dtype
    local_of = [t.to_local() if is_sharded(t) else t for t in tensors]
    if not is_sharded(like):
        return [None if t is None else t.detach() for t in local_of] if me == dst else [None] * len(tensors)
    rows = _shard_rows(shape[0], world)
    rest = shape[1:]
    device = collective_device(like.to_local().device)
    pad = max(rows)
    buf = torch.full((len(tensors), pad, *rest), float("nan"), dtype=dtype, device=device)
    present = torch.zeros(len(tensors), dtype=dtype, device=device)
    for j, t in enumerate(local_of):
        if t is not None:
            t = t.detach().to(device=device, dtype=dtype)
            if t.shape[0] == rows[me]:
                buf[j, : rows[me]] = t
                present[j] = 1
    flat = torch.cat([present, buf.reshape(-1)])
    parts = [torch.empty_like(flat) for _ in range(world)] if me == dst else None
    _collective(partial(dist.gather, flat, parts, dst=dst), [flat, *(parts or [])])
    if me != dst:
        return [None] * len(tensors)
    out: list[torch.Tensor | None] = []
    n = len(tensors)
    for j in range(n):
        if not all(float(p[j]) == 1 for r, p in enumerate(parts) if rows[r]):
            out.append(None)
            continue
        pieces = [p[n:].reshape(n, pad, *rest)[j, : rows[r]] for r, p in enumerate(parts)]
        out.append(torch.cat(pieces).to(like.to_local().device))
    return out


def gather_rows(rows: np.ndarray, dst: int = 0) -> list[np.ndarray]:
    """Every rank's float64 array of one shape, on rank ``dst`` (a list by rank; empty elsewhere)."""
    me, world = rank(), world_size()
    t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)).to(collective_device())
    parts = [torch.empty_like(t) for _ in range(world)] if me == dst else None
    _collective(partial(dist.gather, t, parts, dst=dst), [t, *(parts or [])])
    return [p.cpu().numpy() for p in parts] if me == dst else []


class ShardedMeasurer:
    """The optimizer record's finisher under FSDP2 (DTensor parameters): spectra of the full matrices. Layer i
    belongs to rank i mod world, which gathers its full M, W_after and W_before from the shards and measures it
    (``measurer``: a `spectralscope.measure.Measurer`); rank 0 gathers the results and makes the row, the other
    ranks return None. Every rank takes part in every collective in the same order whatever it meets (NaN, a
    failed metric), so none can hang. Runs on the training thread (its collectives are the training's)."""

    threadable = False

    def __init__(self, measurer, writes: bool) -> None:
        self.measurer, self.writes = measurer, writes

    def finish(self, inputs: Sequence) -> tuple[dict[str, np.ndarray] | None, list[tuple[str, str, str]]]:
        from .measure import fill, to_host

        m = self.measurer
        world, me = world_size(), rank()
        sizes = {v: (len(m.quantiles) if q else 1) for v, q in m.variables.items()}
        mine = np.full((len(m.names), sum(sizes.values())), np.nan)
        reasons: dict[tuple[int, str], str] = {}
        problems: list[tuple[str, str, str]] = []
        for i, (name, x) in enumerate(zip(m.names, inputs, strict=True)):
            owner = i % world
            full = gather_full([x.m, x.w_after, x.w_before], dst=owner, like=x.w_after)
            if me != owner:
                continue
            m_full, after_full, before_full = full
            try:
                host = to_host([m.measure_layer(name, x._replace(m=m_full, w_after=after_full, w_before=before_full))])[0]
            except Exception as exc:  # never skip the collectives below
                problems.append(("optimizer", name, f"failed ({type(exc).__name__}: {exc})"))
                continue
            offset = 0
            for var, n in sizes.items():
                if var in host:
                    mine[i, offset:offset + n] = np.asarray(host[var][0], dtype=np.float64).reshape(-1)
                    reasons[(i, var)] = host[var][1]
                offset += n
        gathered = gather_rows(mine, dst=0)
        if not self.writes:
            return None, problems
        row = m.empty_row()
        for i, name in enumerate(m.names):
            values, offset = gathered[i % world][i], 0
            host = {}
            for var, n in sizes.items():
                host[var] = (values[offset:offset + n] if m.variables[var] else values[offset],
                             reasons.get((i, var), "is not finite"))
                offset += n
            problems += fill(row, i, name, host)
        return row, problems
