"""`InlineRunner`: records finished on the training thread, right after the step (``background=False``)."""

from __future__ import annotations

from typing import Any

import torch

from ..threads import one_blas_thread


class InlineRunner:
    """Finishes each record at once, where it is submitted. A record that fails is lost, counted in the ledger
    (its group's ``lost_as``, layer ``*``); training goes on."""

    def __init__(self, sink: Any, ledger: Any) -> None:
        self.sink, self.ledger = sink, ledger

    def submit(self, group: str, step: int, payload: Any, finisher: Any, live: bool = False) -> None:
        try:
            with torch.no_grad(), one_blas_thread():
                row, problems = finisher.finish(payload)
        except Exception as exc:  # that record is lost, the others are not
            self.ledger.lost(group, f"failed ({type(exc).__name__}: {exc})", step)
            return
        self.sink(group, step, row, problems, False)

    def finishes_elsewhere(self, group: str, finisher: Any) -> bool:
        return False

    def tick(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
