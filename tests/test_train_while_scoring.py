"""SPARTA's scoring epochs that also train (``train_while_scoring``) and span several epochs (``scoring_epochs``).

The privacy argument: each sample's gradient is clipped over the whole scoring-time trainable set, and
the per-batch release is one vector, |clipped g| on the scored weights and the signed clipped sum on
the rest, plus one Gaussian noise vector. Its sensitivity is C, so it is the mechanism a DP-SGD step
is accounted as; the optimizer step on the rest is post-processing. These tests check the update
against an independent torch.func reference and ε against the accountant computed by hand.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy, SpartaMaskCallback
from test_sparta import Net
from test_strategy import _trainer

SCORED = ("conv", "fc")


class PlainSGD(L.LightningModule):
    def __init__(self, n: int = 8, batch_size: int = 8, lr: float = 1.0) -> None:
        super().__init__()
        self.net = Net()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
        self.batch_size, self.lr = batch_size, lr

    def forward(self, x):
        return self.net(x)

    def get_classifier(self):
        return self.net.head

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


def test_scoring_step_trains_the_rest_with_the_clipped_sum_and_scores_with_abs():
    """σ = 0, q = 1, SGD lr = 1: one scoring step moves every non-scored parameter by -Σ_i c_i g_i / n and
    scores the scored weights with Σ_i c_i |g_i|, c_i from the joint norm over *all* trainable parameters."""
    L.seed_everything(0)
    module = PlainSGD()
    clip = 0.05
    start = {k: v.detach().clone() for k, v in module.net.named_parameters()}
    x, y = module.data.tensors

    def loss_one(params, xi, yi):
        return F.cross_entropy(functional_call(module.net, params, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(start, x, y)
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)

    callback = SpartaMaskCallback(mask_epoch=0, trainable_fraction=0.5, train_while_scoring=True, save_mask=False)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=clip)
    _trainer(strategy, callbacks=[callback], max_epochs=2, max_steps=1).fit(module)

    assert strategy.steps == 1
    after = dict(module.net.state_dict())
    for name, g in per_sample.items():
        layer = name.rpartition(".")[0]
        if name.endswith("weight") and layer in SCORED:
            torch.testing.assert_close(after[name], start[name], rtol=0, atol=0)  # scores never move weights
            expected = torch.einsum("i,i...->...", factors, g.abs())
            torch.testing.assert_close(callback.scores[f"net.{layer}"], expected, rtol=1e-4, atol=1e-7)
        else:
            expected = start[name] - torch.einsum("i,i...->...", factors, g) / len(x)
            torch.testing.assert_close(after[name], expected, rtol=1e-4, atol=1e-7)


def test_scoring_without_training_leaves_the_rest_unchanged():
    """The paper's schedule (default): a scoring step moves nothing."""
    L.seed_everything(0)
    module = PlainSGD()
    start = {k: v.detach().clone() for k, v in module.net.named_parameters()}
    callback = SpartaMaskCallback(mask_epoch=0, trainable_fraction=0.5, save_mask=False)
    _trainer(DPStrategy(noise_multiplier=1.0), callbacks=[callback], max_epochs=2, max_steps=1).fit(module)
    for name, value in module.net.state_dict().items():
        if name in start:
            assert torch.equal(value, start[name]), name


@pytest.mark.parametrize("train", [False, True])
def test_several_scoring_epochs_cost_what_the_same_dp_sgd_epochs_cost(train):
    """Scores accumulate over `scoring_epochs`; ε equals T epochs of DP-SGD at (σ, q), by hand (RDP)."""
    L.seed_everything(0)
    module = PlainSGD(n=16, batch_size=4, lr=0.1)  # q = 1/4: four steps an epoch
    callback = SpartaMaskCallback(
        mask_epoch=2, scoring_epochs=2, trainable_fraction=0.5, train_while_scoring=train, save_mask=False
    )
    strategy = DPStrategy(noise_multiplier=1.3, accountant="rdp", target_delta=1e-3)
    phases = []

    class Phases(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            phases.append(callback.phase)

    _trainer(strategy, callbacks=[Phases(), callback], max_epochs=4).fit(module)
    # epoch 0 warm-up, epochs 1-2 scoring, epoch 3 sparse (the phase seen before the callback's own epoch end)
    assert phases == ["warmup", "scoring", "scoring", "masked"]
    assert strategy.steps == 16
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.25, noise_multiplier=1.3, steps=16, orders=orders)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)
    assert strategy.epsilon() == pytest.approx(by_hand, rel=1e-6)
    assert set(callback.scores) == {f"net.{layer}" for layer in SCORED}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_while_scoring": True, "selector": "magnitude"}, "train_while_scoring"),
        ({"train_while_scoring": "yes"}, "train_while_scoring"),
        ({"scoring_epochs": 0}, "scoring_epochs"),
        ({"scoring_epochs": 2, "mask_epoch": 0}, r"scoring_epochs=2.*mask_epoch"),
        ({"scoring_epochs": 2, "selector": "all"}, "scoring_epochs"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpartaMaskCallback(**kwargs)
