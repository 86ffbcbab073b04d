"""Which timm architectures DPStrategy trains, and how it refuses the others (one private step each, 64 px).

Every supported model passes the first-step check that per-sample gradients add up to the batch
gradient, whatever paths its layers take (ghost, closed-form samplers, broadcast tokens, the per-sample
replay). The refused ones fold several samples' tokens or windows into the batch dimension, or use a
parameter outside the forward of the module that owns it; the error names the layer.
"""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy
from test_strategy import _trainer

SIDE, CLASSES = 64, 5


class _Classifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(4, 3, SIDE, SIDE, generator=g), torch.randint(0, CLASSES, (4,), generator=g)
        )
        self.paths: set[str] = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def on_train_batch_end(self, *args):
        self.paths = {p.path for p in self.trainer.strategy.engine.paths()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, img_size=SIDE, **kwargs)
    except TypeError:  # CNNs take any size and have no `img_size`
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


SMALL_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}

TRAINED = {
    "resnet18": ({}, {"ghost", "grad_sampler"}),
    "efficientnet_b0": ({}, {"ghost", "grad_sampler"}),
    "mobilenetv3_small_050": ({}, {"ghost", "grad_sampler", "functorch"}),
    "regnety_002": ({}, {"ghost", "grad_sampler"}),
    # layer scales (`gamma`) from two taps, stochastic depth included
    "convnext_atto": ({"drop_path_rate": 0.1}, {"ghost", "grad_sampler"}),
    "poolformer_s12": ({}, {"ghost", "grad_sampler", "functorch"}),
    "nf_resnet26": ({}, {"ghost"}),  # ScaledStdConv2d: its own ghost form
    "mixer_s16_224": ({}, {"ghost", "grad_sampler"}),
    "resmlp_12_224": ({}, {"ghost", "functorch"}),
    "pvt_v2_b0": ({}, {"ghost", "grad_sampler"}),
    "deit3_small_patch16_224": (SMALL_VIT, {"broadcast", "ghost", "grad_sampler"}),
    "deit_tiny_distilled_patch16_224": (SMALL_VIT, {"broadcast", "ghost", "grad_sampler"}),
    "beit_base_patch16_224": (
        {**SMALL_VIT, "init_values": 0.1, "drop_path_rate": 0.1},
        {"broadcast", "ghost", "grad_sampler", "functorch"},  # functorch: the attention's q/v biases
    ),
    "eva02_tiny_patch14_224": (SMALL_VIT, {"broadcast", "ghost", "grad_sampler", "functorch"}),
    "cait_xxs24_224": ({"depth": 2, "drop_path_rate": 0.1}, {"broadcast", "ghost", "grad_sampler"}),
}

REFUSED = {
    "swin_tiny_patch4_window7_224": ({"window_size": 4, "depths": (1, 1), "num_heads": (1, 2)}, r"reshapes the batch"),
    "maxvit_nano_rw_256": ({}, r"reshapes the batch"),
    "mobilevit_xxs": ({}, r"reshapes the batch"),
    "levit_128s": ({}, r"reshapes the batch"),
    "xcit_nano_12_p16_224": ({"depth": 2}, r"reshapes the batch"),
    "coatnet_nano_rw_224": ({}, r"do not add up to their batch gradient"),
}


@pytest.mark.parametrize("name", list(TRAINED))
def test_trains(name):
    kwargs, paths = TRAINED[name]
    module = _Classifier(_create(name, **kwargs))
    strategy = DPStrategy(noise_multiplier=1.0, seed=0)
    _trainer(strategy, max_steps=1).fit(module)
    assert strategy.steps == 1
    assert module.paths == paths


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_naming_the_layer(name):
    kwargs, match = REFUSED[name]
    module = _Classifier(_create(name, **kwargs))
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises((ValueError, RuntimeError), match=rf"`?model\..*{match}|{match}.*model\."):
        _trainer(DPStrategy(noise_multiplier=1.0, seed=0), max_steps=1).fit(module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize("clipping", ["per_sample", "auto"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_gradient_checkpointing_gives_the_same_step(name, clipping):
    """timm's `set_grad_checkpointing()` recomputes each block's forward pass during the backward pass,
    which runs the layers' forward hooks a second time. The private step (σ = 0) is the same as without."""
    kwargs = SMALL_VIT if name.startswith("vit") else {}
    steps = []
    for checkpointing in (False, True):
        model = _create(name, **kwargs)
        model.set_grad_checkpointing(checkpointing)
        module = _Classifier(model)
        with pytest.warns(UserWarning, match="NOT differentially private"):
            strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.01, clipping=clipping)
        _trainer(strategy, max_steps=1).fit(module)
        steps.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(steps[1], steps[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(TRAINED))
def test_sample_independence_check_passes_every_trained_architecture(name):
    """`check_sample_independence` raises no false alarm on the architectures DPStrategy trains
    (stochastic depth, layer scales, broadcast tokens, replayed modules; BatchNorm in eval mode)."""
    from lightning_sparta.privacy import check_sample_independence

    kwargs, _ = TRAINED[name]
    module = _Classifier(_create(name, **kwargs))
    assert check_sample_independence(module, module.data.tensors) < 1e-4
