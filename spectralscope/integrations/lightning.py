"""`SpectralscopeCallback` for Lightning: records a run without touching the ``LightningModule``.

    from spectralscope.integrations.lightning import SpectralscopeCallback
    trainer = L.Trainer(max_steps=1000, callbacks=[SpectralscopeCallback("runs/pl.zarr", every=10)])
    trainer.fit(module, datamodule)

On ``on_train_start`` it calls `spectralscope.watch` with the trainer's first optimizer (``trainer.optimizers[0]``;
Lightning's ``LightningOptimizer`` wrapper is unwrapped) and the module; after each training batch the loss the
module returned goes into the run's ``scalars``; ``on_train_end`` closes the run. Under torch.distributed
every process calls ``watch`` and only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class SpectralscopeCallback(Callback):
    """Record the fit into ``path``; ``options`` go to `spectralscope.watch` (``every``, ``meta``, …). With several
    optimizers the first is watched (``optimizer`` picks another by index)."""

    def __init__(self, path: str | Path, optimizer: int = 0, **options: Any) -> None:
        self.path, self.index, self.options = path, optimizer, options
        self.recorder: Any = None

    def on_train_start(self, trainer, pl_module) -> None:
        import spectralscope as ss

        optimizers = trainer.optimizers
        if not optimizers:
            raise ValueError("SpectralscopeCallback: the trainer has no optimizer (configure_optimizers)")
        self.recorder = ss.watch(optimizers[self.index], pl_module, self.path, **self.options)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.recorder.log(loss=loss.detach())

    def on_train_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
