"""The error ledger of one run: every value recorded as NaN and every record lost, counted; each (metric family,
reason) said once in the log as it first happens, and a one-line summary of the counts at close.

Shared by the recorder, its runners and its instruments (on the training thread, a measuring thread, the
answering thread of the worker process); the counts are the run's ``errors`` attribute.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping

from . import schema

log = logging.getLogger("spectralscope")

_FAILED = re.compile(r"^failed \((\w+): .*\)$", re.S)


class Ledger:
    """{metric: {layer: count}} of values recorded as NaN (layer ``*``: a whole record lost). ``step`` says
    which training step is under way when a count comes without one."""

    def __init__(self, counts: Mapping[str, Mapping[str, int]] | None = None, step=lambda: 0) -> None:
        self._lock = threading.Lock()
        self._counts = {k: dict(v) for k, v in (counts or {}).items()}
        self._before = {k: dict(v) for k, v in self._counts.items()}  # a resumed run's: the summary is of this one
        self._said: set[tuple[str, str]] = set()
        self._step = step

    def restore(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Start from a resumed run's counts (the close-time summary stays about this session)."""
        with self._lock:
            self._counts = {k: dict(v) for k, v in counts.items()}
            self._before = {k: dict(v) for k, v in counts.items()}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {k: dict(v) for k, v in self._counts.items()}

    def count(self, metric: str, layer: str, reason: str, step: int | None = None) -> None:
        """One value of ``metric`` of ``layer`` recorded as NaN (or a record lost) because of ``reason``; the
        first of its (metric family, reason) in this run is logged."""
        family = schema.family_of(metric)
        key = (family, _FAILED.sub(r"failed (\1)", reason))
        with self._lock:
            per = self._counts.setdefault(metric, {})
            per[layer] = per.get(layer, 0) + 1
            first = key not in self._said
            self._said.add(key)
        if first:
            log.warning("spectralscope: %s of %s %s at step %d; recorded as NaN. Later %s values for the same reason "
                        "are only counted (the run's errors; a summary at close)", metric, layer, reason,
                        self._step() if step is None else step, family)

    def failed(self, metric: str, layer: str, exc: BaseException, step: int | None = None) -> None:
        """``metric`` of ``layer`` could not be computed: ``exc`` says why."""
        self.count(metric, layer, f"failed ({type(exc).__name__}: {exc})", step)

    def lost(self, group: str, why: str, step: int | None = None) -> None:
        """A whole record of ``group`` was lost (counted under the group's `schema.Group.lost_as`, layer ``*``)."""
        lost_as = schema.GROUPS[group].lost_as if group in schema.GROUPS else group
        self.count(lost_as, "*", why, step)

    def summary(self, where: str) -> str | None:
        """One line: what this run recorded as NaN or lost since it was opened, by metric family (None if nothing)."""
        families: dict[str, tuple[int, set[str]]] = {}
        for metric, per in self.counts.items():
            for layer, n in per.items():
                n -= self._before.get(metric, {}).get(layer, 0)
                if n > 0:
                    total, layers = families.get(schema.family_of(metric), (0, set()))
                    families[schema.family_of(metric)] = (total + n, layers | {layer})
        if not families:
            return None
        parts = ", ".join(f"{fam} {n} ({len(layers)} {'layer' if len(layers) == 1 else 'layers'})"
                          for fam, (n, layers) in sorted(families.items(), key=lambda kv: -kv[1][0]))
        return (f"spectralscope: {where}: {sum(n for n, _ in families.values())} values recorded as NaN or lost: "
                f"{parts} (by metric and layer in the run's errors attribute, rec.errors)")
