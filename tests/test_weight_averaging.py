"""Lightning's weight averaging (EMA, SWA) next to SPARTA's layer swap.

An averaged copy of the module (``EMAWeightAveraging``/``WeightAveraging``: an ``AveragedModel``;
``StochasticWeightAveraging``: a deep copy) pairs its tensors with the module's by position. SPARTA
replaces the scored layers mid-run, so the copy must be swapped with the same rows, and the rows must
not be averaged as if they were weights.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils.data import DataLoader

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.sparse import MaskedLinear, RowSparseConv2d, RowSparseLinear
from test_sparta import SparseModule

DECAY = 0.6


class ValidatedModule(SparseModule):
    """SparseModule with a validation loop (WeightAveraging swaps the averaged weights in for it)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=16)


class Recorder(Callback):
    """The module's (dense) state after every optimizer step, as the averaging callbacks see it."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self._last_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._last_step:  # scoring steps do not step the optimizer
            self._last_step = trainer.global_step
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _ema(states: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The exponential moving average by hand: the first state, then decay·avg + (1 - decay)·state."""
    average = {k: v.double() for k, v in states[0].items()}
    for state in states[1:]:
        average = {k: decay * average[k] + (1 - decay) * state[k].double() for k in average}
    return average


def _fit(tmp_path, callbacks, max_epochs=3, ckpt_path=None, module=None, strategy=None, **kwargs):
    L.seed_everything(0)
    module = module if module is not None else ValidatedModule()
    trainer = L.Trainer(
        strategy=strategy if strategy is not None else DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3),
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **{"enable_checkpointing": False, "limit_val_batches": 1, **kwargs},
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def test_ema_weight_averaging_follows_the_sparse_swap(tmp_path):
    """EMA over a SPARTA run (validation every epoch swaps the averages in and out): the weights the
    module ends with are the moving average of its weights after each step, computed by hand, and the
    selected rows are the mask's. Before, the fit failed with a shape error at the swap."""
    sparta = SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.3)
    recorder = Recorder()
    module, _ = _fit(tmp_path, [sparta, recorder, EMAWeightAveraging(decay=DECAY)])
    assert isinstance(module.net.fc, RowSparseLinear)
    assert isinstance(module.net.conv, RowSparseConv2d)
    for name in ("net.fc", "net.conv"):
        rows = module.get_submodule(name).rows
        assert torch.equal(rows, sparta.mask[name])  # the mask holds the selected rows
    assert len(recorder.states) >= 6  # two training epochs of Poisson steps (the scoring epoch takes none)
    expected = _ema(recorder.states, DECAY)
    final = module.state_dict()
    assert set(final) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    # the average differs from the last weights: the test would notice an average that was never copied
    assert not torch.allclose(final["net.fc.weight"], recorder.states[-1]["net.fc.weight"])


@pytest.mark.parametrize("averaging", ["swa", "weight_averaging"])
def test_other_averaging_callbacks_follow_the_swap(tmp_path, averaging):
    """Lightning's SWA callback (a deep copy, parameters only) and plain ``WeightAveraging`` (the equal
    average) end with the averaged weights in the sparse layout."""
    sparta = SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.3)
    recorder = Recorder()
    if averaging == "swa":  # copies the module at the start of epoch 1, before the swap at its end
        average = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)
    else:
        average = WeightAveraging()
    module, _ = _fit(tmp_path, [sparta, recorder, average])
    assert isinstance(module.net.fc, RowSparseLinear)
    final = module.state_dict()
    if averaging == "weight_averaging":  # every step, equal weights
        expected = {k: torch.stack([s[k].double() for s in recorder.states]).mean(0) for k in final}
        for key, value in expected.items():
            torch.testing.assert_close(final[key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.allclose(final["net.fc.weight"], recorder.states[-1]["net.fc.weight"])


def test_averaging_keeps_the_indices_of_sparse_layers():
    """An ``AveragedModel`` with buffers averages integer buffers in floating point and truncates: row
    indices kept as a buffer came back one lower (a quarter of them with decay 0.9)."""
    rows = torch.arange(0, 5000, 2)
    layers = [RowSparseLinear(nn.Linear(3, 5000), rows), MaskedLinear(nn.Linear(3, 5000), torch.rand(5000, 3) > 0.5)]
    for layer, name in zip(layers, ("rows", "indices"), strict=True):
        index = getattr(layer, name).clone()
        average = AveragedModel(layer, avg_fn=get_ema_avg_fn(0.9), use_buffers=True)
        for _ in range(3):
            average.update_parameters(layer)
        assert torch.equal(getattr(average.module, name), index)
        assert torch.equal(getattr(layer, name), index)
        assert layer.index is getattr(layer, name)
        assert layer.to(torch.float64).index.dtype == torch.int64  # moves with the module, keeps its dtype


def test_ema_resumes_after_the_swap(tmp_path):
    """A run checkpointed after the swap and resumed ends with the same averaged weights as the run that
    was not interrupted (the averaged copy is swapped again on resume, with the checkpoint's mask)."""
    straight, _ = _fit(
        tmp_path / "a", [SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.3), EMAWeightAveraging(decay=DECAY)], 4
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(
        tmp_path / "b",
        [SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.3), EMAWeightAveraging(decay=DECAY), checkpoint],
        3,
        enable_checkpointing=True,
    )
    resumed, _ = _fit(
        tmp_path / "b",
        [SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.3), EMAWeightAveraging(decay=DECAY)],
        4,
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert isinstance(resumed.net.fc, RowSparseLinear)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
