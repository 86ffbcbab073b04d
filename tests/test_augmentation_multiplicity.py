"""Augmentation multiplicity: K views of every sample, clipped together (De et al. 2022)."""

from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy
from lightning_sparta.privacy import epsilon_for
from test_strategy import _trainer

N, K, CLIP = 12, 3, 0.05


class ViewsModule(L.LightningModule):
    """Conv (a ghost form with T > 1), GroupNorm (a grad sampler) and Linear; the usual training_step."""

    def __init__(self, batch_size: int = N) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        )
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(N, K, 2, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g))
        self.batch_size = batch_size
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.detach().clone(), y.clone()))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


def _reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_i clip(g_i), g_i the gradient of sample i's mean loss over its K views (torch.func)."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, views, label):
        return F.cross_entropy(functional_call(module, p, (views,)), label.expand(views.shape[0]))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.reshape(len(x), -1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any()  # clipping is active for some samples
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in per_sample.items()}


def _step_equals(module: nn.Module, expected: dict[str, torch.Tensor], warns: str | None = None, **kwargs) -> None:
    """One step with σ = 0 and q = 1 (views K, clip CLIP) moves every parameter by ``expected / N``."""
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=CLIP, augmentation_multiplicity=K, **kwargs)
    with pytest.warns(UserWarning, match=warns) if warns else nullcontext():
        _trainer(strategy, max_steps=1).fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / N, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("clipping", ["per_sample", "ghost", "auto"])
@pytest.mark.parametrize("physical_batch_size", [None, 5])
def test_one_step_clips_each_sample_over_its_views(clipping, physical_batch_size):
    """σ = 0, q = 1: the update is Σ_i clip(g_i)/n with g_i over sample i's K views, from `torch.func`;
    training_step saw the views as B·K rows, sample by sample, with the labels repeated."""
    L.seed_everything(0)
    module = ViewsModule()
    x, y = module.data.tensors
    _step_equals(module, _reference(module, x, y), clipping=clipping, physical_batch_size=physical_batch_size)
    rows = torch.cat([seen for seen, _ in module.seen])
    labels = torch.cat([label for _, label in module.seen])
    assert torch.equal(rows, x.flatten(0, 1))
    assert torch.equal(labels, y.repeat_interleave(K))


@pytest.mark.parametrize("clipping", ["per_sample", "ghost", "auto"])
def test_a_sample_with_one_non_finite_view_is_left_out_whole(clipping):
    """A NaN in one view of sample 4 makes that sample's gradient NaN: all its views are left out (its
    rows are sample-major), and the update is the clipped sum over the other samples."""
    L.seed_everything(0)
    module = ViewsModule()
    x, y = module.data.tensors
    x[4, 1, 0, 2, 2] = float("nan")
    keep = torch.arange(N) != 4
    _step_equals(module, _reference(module, x[keep], y[keep]), warns="not finite", clipping=clipping)


def test_views_leave_the_sampling_and_the_accounting_to_the_samples():
    """Poisson batches are drawn over the N samples (q = B/N) and ε is that of their steps; a batch
    without a views dimension is refused naming the argument."""
    module = ViewsModule(batch_size=4)
    strategy = DPStrategy(noise_multiplier=1.0, seed=1, augmentation_multiplicity=K)
    _trainer(strategy, max_epochs=2).fit(module)
    assert strategy.sample_rate == pytest.approx(4 / N)
    assert all(x.shape[0] % K == 0 for x, _ in module.seen)
    assert strategy.epsilon() == pytest.approx(epsilon_for([(1.0, 4 / N, strategy.steps)], 1e-5))

    flat = ViewsModule()
    flat.data = TensorDataset(flat.data.tensors[0][:, 0], flat.data.tensors[1])  # one image per sample
    with pytest.raises(ValueError, match=r"augmentation_multiplicity=3.*\[B, 3, \.\.\.\]; found \(12, 2, 4, 4\)"):
        _trainer(DPStrategy(noise_multiplier=1.0, augmentation_multiplicity=K)).fit(flat)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_augmentation_multiplicity_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="`augmentation_multiplicity` must be a positive integer"):
        DPStrategy(noise_multiplier=1.0, augmentation_multiplicity=bad)


@pytest.mark.parametrize("clipping", ["per_sample", "auto"])
def test_sparta_scores_each_sample_over_its_views(clipping):
    """SPARTA's scoring step with views: Σ_i c_i |g_i| with g_i over sample i's views (σ = 0, q = 1)."""
    L.seed_everything(0)
    module = ViewsModule()
    x, y = module.data.tensors
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, views, label):
        return F.cross_entropy(functional_call(module, p, (views,)), label.expand(views.shape[0]))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.reshape(N, -1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    scored = ("net.0.weight", "net.4.weight")
    found = {}

    class Score(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.strategy.begin_scoring({n: dict(pl_module.named_parameters())[n] for n in scored})

        def on_train_end(self, trainer, pl_module):
            found.update({n: s.clone() for n, s in trainer.strategy.scoring_sums.items()})

    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=CLIP, clipping=clipping, augmentation_multiplicity=K)
    _trainer(strategy, max_steps=1, callbacks=[Score()]).fit(module)
    for name in scored:
        expected = torch.einsum("i,i...->...", factor, per_sample[name].abs())
        torch.testing.assert_close(found[name].view_as(expected), expected, atol=1e-7, rtol=1e-4, msg=name)


class _StandardisedViews(ViewsModule):
    """timm's weight-standardised conv (NF-Nets, BiT) in place of the plain one."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import StdConv2d

        torch.manual_seed(0)
        self.net[0] = StdConv2d(2, 4, 3, padding=1)


def test_weight_standardised_convs_train_with_views_per_sample_and_are_refused_by_name_under_ghost():
    """`clipping="per_sample"` sums the views' closed-form per-sample gradients of a weight-standardised
    conv: the step equals the `torch.func` reference. Its ghost form's normalisation correction has no
    per-view form: the ghost engines refuse it by name instead of clipping something else."""
    L.seed_everything(0)
    module = _StandardisedViews()
    x, y = module.data.tensors
    _step_equals(module, _reference(module, x, y), clipping="per_sample")
    for clipping in ("auto", "ghost"):
        ghost = DPStrategy(noise_multiplier=1.0, clipping=clipping, augmentation_multiplicity=K)
        with pytest.raises(ValueError, match=r"net\.0.*weight-standardised convs are not supported with several views"):
            _trainer(ghost, max_steps=1).fit(_StandardisedViews())
