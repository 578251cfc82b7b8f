"""TensorBoard output: per-layer scalars of the main metrics, with a custom-scalars layout.

The same rows go to TensorBoard live (``watch(..., tensorboard=DIR)``) and from a finished store
(``spectralscope export-tb RUN --logdir DIR``). Tags are ``{metric}/{layer}`` (``momentum_sv_q0.5/…``
for quantile metrics) and ``scalars/{name}`` for what ``rec.log`` recorded; the layout puts each metric's
layers on one multi-line chart. An export writes only the (tag, step) pairs the log directory does not
hold yet, so exporting twice, or after a live run, duplicates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import schema

#: (group, variable, quantile or None) written to TensorBoard (`schema.Variable.tensorboard`).
TB_METRICS: tuple[tuple[str, str, float | None], ...] = tuple(schema.tensorboard_metrics())


def tag_of(var: str, quantile: float | None) -> str:
    return var if quantile is None else f"{var}_q{quantile:g}"


def scalars(group: str, row: Mapping[str, np.ndarray], names: Sequence[str],
            quantiles: Sequence[float] = ()) -> list[tuple[str, float]]:
    """The (tag, value) pairs of one recorded row: ``names`` are the row's layers (or modules), ``quantiles``
    the levels along its quantile axis; a ``scalars`` row gives ``scalars/{name}`` for each of its values.
    NaN values are skipped."""
    if group == "scalars":
        return [(f"scalars/{k}", float(v)) for k, v in row.items() if np.ndim(v) == 0 and np.isfinite(v)]
    out = []
    for g, var, q in TB_METRICS:
        if g != group or var not in row:
            continue
        values = np.asarray(row[var], dtype=np.float64)
        if q is not None:
            idx = [i for i, level in enumerate(quantiles) if np.isclose(level, q)]
            if not idx:
                continue
            values = values[..., idx[0]]
        if group == "activations" and values.ndim == 2:  # (module, bucket): the bucket of every token, stored first
            values = values[:, 0]
        tag = tag_of(var, q)
        if values.ndim == 0:
            if np.isfinite(values):
                out.append((tag, float(values)))
            continue
        out += [(f"{tag}/{name}", float(v)) for name, v in zip(names, values, strict=True) if np.isfinite(v)]
    return out


def layout() -> dict:
    """The custom-scalars layout: one multi-line chart per metric, all of its layers on it."""
    charts = {}
    for _, var, q in TB_METRICS:
        tag = tag_of(var, q)
        charts[tag] = ["Multiline", [rf"^{tag}(/.*)?$"]]
    charts["scalars"] = ["Multiline", [r"^scalars/.*$"]]
    return {"spectralscope": charts}


class TensorBoardSink:
    """Writes recorded rows to a TensorBoard log directory."""

    def __init__(self, logdir: str | Path, with_layout: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))
        if with_layout:
            self.writer.add_custom_scalars(layout())

    def write(self, group: str, step: int, row: Mapping[str, np.ndarray], names: Sequence[str],
              quantiles: Sequence[float] = ()) -> None:
        for tag, value in scalars(group, row, names, quantiles):
            self.writer.add_scalar(tag, value, global_step=int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def written(logdir: str | Path) -> tuple[dict[str, set[int]], bool]:
    """What a log directory already holds: the steps of each scalar tag, and whether it has the layout."""
    if not Path(logdir).is_dir():
        return {}, False
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = {tag: {e.step for e in acc.Scalars(tag)} for tag in tags.get("scalars", [])}
    return steps, "custom_scalars__config__" in tags.get("tensors", [])


def export_tb(run: str, logdir: str | Path, storage_options=None) -> tuple[int, int]:
    """Write a run's stored rows to TensorBoard, the `TB_METRICS` and the logged scalars, skipping every (tag,
    step) the log directory already holds; returns (scalars written, scalars already there)."""
    from .store import open_run, unit_dim

    tree = open_run(run, storage_options)
    have, has_layout = written(logdir)
    sink = None
    count = skipped = 0
    try:
        for group in sorted({g for g, _, _ in TB_METRICS} | {"scalars"}):
            if group not in tree.children:
                continue
            ds = tree[group].dataset
            unit = unit_dim(ds.dims)
            names = [str(n) for n in ds[unit].values.tolist()] if unit else []
            qs = [float(q) for q in ds["quantile"].values] if "quantile" in ds.dims else []
            wanted = list(ds.data_vars) if group == "scalars" else [v for g, v, _ in TB_METRICS if g == group and v in ds]
            data = {v: ds[v].values for v in wanted}
            for i, step in enumerate(ds["step"].values.tolist()):
                for tag, value in scalars(group, {v: data[v][i] for v in wanted}, names, qs):
                    if int(step) in have.get(tag, ()):
                        skipped += 1
                        continue
                    if sink is None:
                        sink = TensorBoardSink(logdir, with_layout=not has_layout)
                    sink.writer.add_scalar(tag, value, global_step=int(step))
                    count += 1
    finally:
        if sink is not None:
            sink.close()
    return count, skipped
