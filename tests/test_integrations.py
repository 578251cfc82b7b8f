"""The framework callbacks with the real frameworks: the HF Trainer and Lightning, a few steps of a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spectralscope as ss

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import gpt2  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(3, 64, (n, 16), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.mark.slow
def test_the_hf_trainer_callback_records_the_run_and_its_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    from spectralscope.integrations.transformers import SpectralscopeCallback

    torch.manual_seed(0)
    model = gpt2()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                             logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3,
                             disable_tqdm=True)
    callback = SpectralscopeCallback(tmp_path / "hf.zarr", every=2, activations=ss.ActivationSpectra(every=2))
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback]).train()
    tree = ss.open_run(tmp_path / "hf.zarr")
    assert tree.attrs["status"] == "finished" and tree.attrs["optimizer"][0]["class"] == "torch.optim.AdamW"
    assert list(tree["optimizer"]["step"].values) == [0, 2, 4]
    assert tree["activations"].sizes["step"] == 3
    assert np.isfinite(tree["optimizer"]["momentum_sv"].values).all()
    loss = tree["scalars"]["loss"]
    assert loss.sizes["step"] == 3 and np.isfinite(loss.values).all() and (loss.values > 0).all()
    assert callback.recorder is None  # closed at the end of training


@pytest.mark.slow
def test_the_lightning_callback_records_the_run_and_its_loss(tmp_path):
    import lightning as L

    from spectralscope.integrations.lightning import SpectralscopeCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Muon([p for p in self.parameters() if p.ndim == 2], lr=0.02)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 4))
    callback = SpectralscopeCallback(tmp_path / "pl.zarr", overhead=None, every=1)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    tree = ss.open_run(tmp_path / "pl.zarr")
    assert tree.attrs["status"] == "finished" and tree.attrs["optimizer"][0]["class"] == "torch.optim.Muon"
    assert list(tree["optimizer"]["step"].values) == [0, 1, 2, 3, 4]
    assert tree["activations"].sizes["step"] == 1
    assert np.isfinite(tree["optimizer"]["ns_consistency"].values).all()
    assert tree["scalars"]["loss"].sizes["step"] == 5 and np.isfinite(tree["scalars"]["loss"].values).all()
