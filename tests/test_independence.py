"""`check_sample_independence`: per-sample gradients that depend on other samples of the batch."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparta.privacy import SampleCouplingError, check_sample_independence, input_gradients
from test_strategy import TinyModule


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class _Centred(TinyModule):
    """A layer that centres over the batch dimension (a hand-written batch normalisation)."""

    def forward(self, x):
        h = self.net[0](x)
        return self.net[2](self.net[1](h - h.mean(0)))


class _AnchoredToFirst(TinyModule):
    """Features relative to the batch's first sample, taken as a constant (an anchor or reference image
    under ``detach``): replacing the last sample leaves every other sample's gradient as it was, since no
    gradient flows back to the anchor; replacing the first moves them all."""

    def forward(self, x):
        h = self.net[0](x)
        return self.net[2](self.net[1](h - h[:1].detach()))


class _NormalisedLoss(TinyModule):
    """Each sample's loss divided by the batch's total loss (weights from the other samples)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return (losses / losses.detach().sum()).sum()


class _InBatchNegatives(TinyModule):
    """A contrastive loss: every other sample of the batch is a negative."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        z = F.normalize(self(x), dim=1)
        logits = z @ z.T / 0.1
        return F.cross_entropy(logits, torch.arange(len(x)))


class _HandMixup(TinyModule):
    """MixUp written by hand: each sample mixed with the batch reversed."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        lam = float(torch.rand(()))
        mixed = lam * x + (1 - lam) * x.flip(0)
        logits = self(mixed)
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y.flip(0))


class _MixedAfterTransfer(TinyModule):
    """Mixing in `on_after_batch_transfer`, where GPU augmentation libraries run."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return 0.7 * x + 0.3 * x.roll(1, 0), y


class _Adversarial(TinyModule):
    """FGSM inside `input_gradients`; ``universal`` moves every input along the batch's mean input gradient
    (a universal perturbation: each sample's input then depends on the others; its sign alone may not
    change when one sample does, and the check only finds couplings that move a gradient)."""

    def __init__(self, universal: bool = False):
        super().__init__()
        self.universal = universal

    def training_step(self, batch, batch_idx):
        x, y = batch
        with input_gradients(self):
            xr = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(self(xr), y, reduction="sum"), xr)
        step = g.mean(0, keepdim=True) if self.universal else g.sign()
        return F.cross_entropy(self((x + 0.3 * step).detach()), y)


class _AdversarialMeanInner(TinyModule):
    """An L2 adversarial step from a mean-reduced inner loss: each input gradient carries 1 / batch size,
    so a sample's perturbed input depends on how many other samples the Poisson draw took. Replacing a
    sample keeps the batch size and cannot show this; removing one does."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        with input_gradients(self):
            xr = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(self(xr), y), xr)
        return F.cross_entropy(self((x + 5.0 * g).detach()), y)


class _Stochastic(TinyModule):
    """Dropout, random augmentation in training_step and a BatchNorm: independent once BN is frozen."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 0.1 * torch.randn_like(x)
        return super().training_step((x, y), batch_idx)


@pytest.mark.parametrize(
    "make",
    [
        _Centred,
        _AnchoredToFirst,
        _NormalisedLoss,
        _InBatchNegatives,
        _HandMixup,
        _MixedAfterTransfer,
        lambda: _Adversarial(universal=True),
        _AdversarialMeanInner,
    ],
    ids=[
        "centred",
        "anchored_to_first",
        "normalised_loss",
        "in_batch_negatives",
        "hand_mixup",
        "mixed_after_transfer",
        "universal_perturbation",
        "adversarial_mean_inner_loss",
    ],
)
def test_samples_mixed_by_hand_are_found(make):
    """The couplings the strategy cannot see while training (README: "what you must not do")."""
    L.seed_everything(0)
    with pytest.raises(SampleCouplingError, match=r"Sample \d+'s gradient changed by .* samples are coupled"):
        check_sample_independence(make(), _batch())


def test_a_dependence_on_the_batch_size_is_found_by_leaving_a_sample_out():
    """A mean-reduced inner loss scales each adversarial step by 1 / batch size. Replacing a sample keeps the
    size and finds nothing; the run without the last sample (in eval mode) does, and says so."""
    L.seed_everything(0)
    with pytest.raises(SampleCouplingError, match=r"when sample 7 was left out of the batch"):
        check_sample_independence(_AdversarialMeanInner(), _batch())


def test_adversarial_examples_from_each_samples_own_input_gradient_pass():
    """FGSM inside `input_gradients` with a summed loss: each perturbed input depends on its sample alone."""
    L.seed_everything(0)
    assert check_sample_independence(_Adversarial(), _batch()) < 1e-5


@pytest.mark.parametrize("module_cls", [TinyModule, _Stochastic])
def test_independent_samples_pass_with_randomness_and_nothing_changes(module_cls):
    """Dropout and random noise in training_step draw the same values in both runs; BatchNorm is in eval
    mode as DPStrategy freezes it. Parameters, gradients, modes and BN statistics are left as they were."""
    L.seed_everything(0)
    module = module_cls()
    module.train()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    if module_cls is _Stochastic:  # its training_step adds noise: a smaller batch cannot draw the same
        with pytest.warns(UserWarning, match="draws random numbers of its own .* batch size .* not looked for"):
            change = check_sample_independence(module, _batch())
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            change = check_sample_independence(module, _batch())
    assert change < 1e-5
    assert module.training
    assert all(m.training for m in module.modules())
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in module.parameters())
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_dropout_model_without_restored_randomness_would_look_coupled():
    """The check's restoring of the generators is what makes random models pass (guards the test above)."""
    from lightning_sparta.privacy import independence

    L.seed_everything(0)
    original = independence._same_randomness
    try:
        independence._same_randomness = _no_restore
        with pytest.raises(SampleCouplingError):
            check_sample_independence(_Stochastic(), _batch())
    finally:
        independence._same_randomness = original


def _no_restore():
    from contextlib import nullcontext

    return nullcontext()


@pytest.mark.parametrize(("batch", "tolerance", "match"), [(_batch(1), 1e-4, "at least 2"), (_batch(), 0, "tolerance")])
def test_bad_arguments_are_named(batch, tolerance, match):
    with pytest.raises(ValueError, match=match):
        check_sample_independence(TinyModule(), batch, tolerance=tolerance)


class _Timm(L.LightningModule):
    def __init__(self, name: str, **kwargs):
        super().__init__()
        import timm

        torch.manual_seed(0)
        self.model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)  # outside a Trainer: Lightning warns and logs nothing
        return loss


@pytest.mark.filterwarnings("ignore:.*self.log")
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "drop_path_rate": 0.2}),
    ],
)
def test_timm_models_with_batchnorm_and_stochastic_depth_pass(name, kwargs):
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
    assert check_sample_independence(_Timm(name, **kwargs), batch) < 1e-4


def test_a_model_that_folds_the_batch_is_refused_by_name():
    """Rows that are not samples (windows folded into the batch) cannot be compared sample by sample."""

    class Folding(TinyModule):
        def forward(self, x):
            return self.net(x.reshape(-1, 3).repeat(1, 2)).reshape(x.shape[0], -1, 3).mean(1)

    with pytest.raises(ValueError, match=r"`net.0.weight` have 16 rows for a batch of 8"):
        check_sample_independence(Folding(), _batch())


def test_a_module_with_nothing_trainable_is_refused():
    module = TinyModule()
    module.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        check_sample_independence(module, _batch())
