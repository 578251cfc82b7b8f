"""`SpectralscopeCallback` for the Hugging Face ``Trainer``: records a run without touching the training loop.

    from spectralscope.integrations.transformers import SpectralscopeCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpectralscopeCallback("runs/hf.zarr", every=10)])
    trainer.train()

On ``on_train_begin`` it calls `spectralscope.watch` with the Trainer's optimizer (accelerate's
``AcceleratedOptimizer`` is unwrapped) and model; every ``on_log`` writes the Trainer's logged numbers (``loss``,
``learning_rate``, ``grad_norm``, …) into the run's ``scalars`` at the current optimizer step; ``on_train_end``
closes the run. Under torch.distributed every process calls ``watch`` (the collectives must line up) and only
rank 0 writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class SpectralscopeCallback(TrainerCallback):
    """Record the Trainer's run into ``path``; ``options`` go to `spectralscope.watch` (``every``, ``meta``,
    ``activations``, …)."""

    def __init__(self, path: str | Path, **options: Any) -> None:
        self.path, self.options = path, options
        self.recorder: Any = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import spectralscope as ss

        if optimizer is None:
            raise ValueError("SpectralscopeCallback: the Trainer passed no optimizer to on_train_begin")
        self.recorder = ss.watch(optimizer, model, self.path, **self.options)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.recorder is None or not logs:
            return
        numbers = {k: float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if numbers:
            self.recorder.log(**numbers)

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
