"""Regression tests for the privacy holes at the edges of DPStrategy (issue 8).

Each test reproduces one way a guarantee silently disappeared: noise or batches replayed by a second
``fit``, raw gradients reaching the optimizer, per-token clipping, several training loaders, DDP
ranks that start from different weights, noise recomputable from a checkpoint, clipping in bf16,
samplers replaced without a word, MixUp/CutMix mixing the samples of a batch, and Lightning callbacks
that train outside the accountant.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    Callback,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    RandomSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from lightning_sparta import DPStrategy
from lightning_sparta.privacy import epsilon_for, input_gradients
from lightning_sparta.privacy.noise import _SECURE_CHUNK, step_noise
from test_strategy import TinyModule, _clipped_sum_reference, _data, _trainer

# the clipping engines of issue 10: every hole must stay closed on each of them
CLIPPING = pytest.mark.parametrize("clipping", ["per_sample", "ghost", "auto"])


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# ---------------------------------------------------------------------------------------------- 1
@CLIPPING
def test_second_fit_continues_the_noise_stream_and_the_batches(clipping):
    """Raising max_epochs and fitting again (the usual way to continue) must replay neither the first
    fit's noise nor its batches.

    A replayed noise vector lets anyone who sees both updates subtract it; replayed batches break the
    independence of Poisson sampling that the accountant assumes.
    """
    L.seed_everything(0)
    module = TinyModule(zero_loss=True, batch_size=12, width=200)
    strategy = DPStrategy(noise_multiplier=1.0, seed=5, clipping=clipping)
    trainer = _trainer(strategy, max_epochs=1)
    updates, seen = [], []
    for epochs in (1, 2):
        trainer.fit_loop.max_epochs = epochs
        module.seen.clear()
        before = _flat(module)
        trainer.fit(module)
        updates.append(_flat(module) - before)
        seen.append(torch.cat(module.seen))
    assert strategy.steps == 4
    first, second = updates
    correlation = torch.dot(first, second) / (first.norm() * second.norm())
    assert abs(correlation.item()) < 0.2, correlation  # ~1800 coordinates: independent noise gives |ρ| ≈ 0.02
    assert not (seen[0].shape == seen[1].shape and torch.equal(seen[0], seen[1]))


# ---------------------------------------------------------------------------------------------- 2
class _Unregistered(TinyModule):
    """A scale parameter the optimizer holds but the module does not register (kept in a plain list)."""

    def __init__(self):
        super().__init__()
        self.extras = [nn.Parameter(torch.ones(3))]

    def forward(self, x):
        return self.net(x) * self.extras[0]

    def configure_optimizers(self):
        return torch.optim.SGD([*self.parameters(), *self.extras], lr=1.0)


class _UnfrozenInStep(TinyModule):
    """Unfreezes a parameter inside training_step, after the strategy attached its hooks."""

    def __init__(self):
        super().__init__()
        self.net[0].weight.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        self.net[0].weight.requires_grad_(True)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("module_cls", "match"),
    [(_Unregistered, r"param_groups\[0\].*shape \[3\]"), (_UnfrozenInStep, r"net\.0\.weight")],
    ids=["not-registered", "unfrozen-in-training-step"],
)
@CLIPPING
def test_no_raw_gradient_reaches_the_optimizer(module_cls, match, clipping):
    L.seed_everything(0)
    module = module_cls()
    before = {id(p): p.detach().clone() for g in module.configure_optimizers().param_groups for p in g["params"]}
    with pytest.raises(RuntimeError, match=match):
        _trainer(DPStrategy(noise_multiplier=1.0, clipping=clipping), max_steps=1).fit(module)
    # refused before the optimizer stepped: nothing moved
    for group in module.trainer.optimizers[0].param_groups:
        for p in group["params"]:
            assert torch.equal(p.detach(), before[id(p)])


# ---------------------------------------------------------------------------------------------- 3
class _Flattening(L.LightningModule):
    """Reshapes [B, T, D] to [B·T, D] before its Linear: per-sample gradients would be per token."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(16, 8, 4, generator=g), torch.randint(0, 3, (16,), generator=g))

    def training_step(self, batch, batch_idx):
        x, y = batch
        b, t, d = x.shape
        logits = self.proj(x.reshape(b * t, d)).reshape(b, t, -1).mean(1)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)


@CLIPPING
def test_per_token_gradients_are_refused(clipping):
    module = _Flattening()
    before = _flat(module)
    with pytest.raises(ValueError, match=r"proj.*128.*16"):
        _trainer(DPStrategy(noise_multiplier=0.5, clipping=clipping), max_steps=1).fit(module)
    assert torch.equal(_flat(module), before)


# ---------------------------------------------------------------------------------------------- 5
class _TwoLoaders(TinyModule):
    def train_dataloader(self):
        return [DataLoader(self.dataset, batch_size=6), DataLoader(_data(n=12), batch_size=6)]

    def training_step(self, batch, batch_idx):
        return super().training_step(batch[0], batch_idx)


def test_several_training_loaders_are_refused():
    with pytest.raises(ValueError, match="one training DataLoader"):
        _trainer(DPStrategy(noise_multiplier=1.0), max_steps=1).fit(_TwoLoaders())


# ---------------------------------------------------------------------------------------------- 8
def _noise_only_update(strategy: DPStrategy, **trainer_kwargs) -> torch.Tensor:
    module = TinyModule(zero_loss=True, batch_size=12, width=200)
    before = _flat(module)
    _trainer(strategy, max_steps=1, **trainer_kwargs).fit(module)
    return _flat(module) - before


def test_each_steps_noise_is_its_own_draw_from_the_reused_buffer():
    """The reproducible noise is written into one buffer kept across steps: 3 steps of a zero loss (σ C = 1,
    SGD lr 1, no momentum) move the weights by exactly -(z_0 + z_1 + z_2)/B with z_t = `step_noise(seed, t)`
    drawn afresh, so no step reuses or keeps another step's vector."""
    module = TinyModule(zero_loss=True, batch_size=12, width=20)  # 24 samples: q = 1/2
    before = _flat(module)
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=5)
    _trainer(strategy, max_epochs=2, max_steps=3).fit(module)
    assert strategy.steps == 3
    numel = before.numel()
    expected = sum(step_noise(numel, 5, t) for t in range(3))
    torch.testing.assert_close(_flat(module) - before, -expected / 12, atol=1e-6, rtol=1e-5)
    out = torch.full((numel,), float("nan"))
    assert step_noise(numel, 5, 1, out=out) is out
    assert torch.equal(out, step_noise(numel, 5, 1))


def test_secure_mode_noise_cannot_be_regenerated_from_the_seed():
    """Same seeds, same data: reproducible mode repeats its noise (documented); secure mode never does."""
    updates = {}
    for secure in (False, True):
        runs = []
        for _ in range(2):
            L.seed_everything(3)
            seed = None if secure else 9  # secure mode refuses a seed
            runs.append(_noise_only_update(DPStrategy(noise_multiplier=1.0, seed=seed, secure_mode=secure)))
        updates[secure] = runs
    torch.testing.assert_close(updates[False][0], updates[False][1])
    a, b = updates[True]
    assert abs((torch.dot(a, b) / (a.norm() * b.norm())).item()) < 0.2


@pytest.mark.parametrize("secure", [False, True])
def test_two_runs_of_a_seeded_sigma_sweep_cancel_their_noise_unless_secure(secure):
    """The README's warning about seeded sweeps, checked: two runs under one `seed_everything`, differing in σ
    only (q = 1), release `(G + σ_k C z)/n` with the same `z`, so `(σ₂ R₁ − σ₁ R₂)/(σ₂ − σ₁)` is the clipped
    sum `G` from `torch.func` without noise. In secure mode each run draws its own noise and it stays."""
    releases = {}
    for sigma in (1.0, 2.0):
        L.seed_everything(0)
        module = TinyModule(batch_size=24)  # batch_size == n: q = 1
        x, y = module.dataset.tensors
        expected = _clipped_sum_reference(module, x, y, clip=1.0)
        before = {k: v.detach().clone() for k, v in module.named_parameters()}
        strategy = DPStrategy(noise_multiplier=sigma, max_grad_norm=1.0, secure_mode=secure)
        _trainer(strategy, max_steps=1).fit(module)  # SGD, lr 1: the update is the release
        releases[sigma] = {k: before[k] - p.detach() for k, p in module.named_parameters()}
    for name, g in expected.items():
        recovered = (2.0 * releases[1.0][name] - 1.0 * releases[2.0][name]) * 24
        error = (recovered - g).norm() / g.norm()
        assert (error > 0.5) if secure else (error < 1e-5), (name, float(error))


@pytest.mark.parametrize("numel", [200_000, 1_100_001])  # one chunk of draws; three, the last odd
def test_secure_mode_noise_has_the_stated_distribution(numel):
    """OS-entropy Gaussian noise: mean 0, std σ·C, Gaussian tails (Kolmogorov-Smirnov against N(0, 1)), and
    chunks of the draws (made 2^19 at a time) are not repeated or correlated."""
    strategy = DPStrategy(noise_multiplier=2.0, max_grad_norm=0.5, secure_mode=True)
    strategy.parallel_devices = [torch.device("cpu")]  # as the Trainer sets it
    (noise,) = strategy._released([torch.zeros(numel)])  # what a step adds to a zero clipped sum
    noise = noise.double()
    chunk = min(numel // 2, 2 * _SECURE_CHUNK)  # the draws of one chunk against the next one's (or half against half)
    pair = torch.stack([noise[:chunk], noise[chunk : 2 * chunk]])
    assert abs(torch.corrcoef(pair)[0, 1].item()) < 5 / math.sqrt(chunk)
    std = 2.0 * 0.5
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(noise.numel())
    assert abs(noise.std().item() / std - 1) < 0.01  # relative standard error ≈ 0.16%
    z = torch.sort(noise / std).values
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    empirical = torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()
    ks = (cdf - empirical).abs().max().item()
    assert ks < 1.63 / math.sqrt(z.numel())  # the 1% critical value of the KS statistic


def _seeds(tree, path="") -> list[str]:
    """Paths of every non-None value stored under a key containing 'seed' in a nested checkpoint."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{path}/{key}"
            if "seed" in str(key).lower() and value is not None:
                found.append(where)
            found += _seeds(value, where)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found += _seeds(value, f"{path}/{i}")
    return found


def test_secure_mode_checkpoint_holds_nothing_to_recompute_the_noise(tmp_path):
    L.seed_everything(0)
    module = TinyModule(batch_size=6)
    strategy = DPStrategy(target_epsilon=3.0, target_delta=1e-3, secure_mode=True)
    trainer = _trainer(
        strategy,
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(module)
    ckpt = sorted(tmp_path.glob("*step=4.ckpt"))[0]
    saved = torch.load(ckpt, weights_only=False)
    state = saved["lightning_sparta.dp_strategy"]
    assert state.get("generator") is None
    assert _seeds(saved) == [], _seeds(saved)  # neither the strategy nor the loader state holds a seed
    # resume keeps the accounting and the position: the resumed run ends after the same number of steps
    resumed = DPStrategy(target_epsilon=3.0, target_delta=1e-3, secure_mode=True)
    _trainer(resumed, max_epochs=2).fit(TinyModule(batch_size=6), ckpt_path=ckpt)
    assert resumed.steps == strategy.steps == 8
    assert resumed.noise_multiplier == strategy.noise_multiplier
    assert resumed.epsilon() == pytest.approx(strategy.epsilon(), rel=1e-9)


# ---------------------------------------------------------------------------------------------- 9
@CLIPPING
def test_bf16_true_clips_in_float32(clipping):
    """One sample with a huge gradient: its clipped contribution is at most C·(1 + 1e-3) under bf16-true."""
    L.seed_everything(0)
    data = TensorDataset(torch.randn(1, 6) * 300, torch.tensor([1]))
    module = TinyModule(dataset=data, batch_size=1, width=64)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=1.0, clipping=clipping)
    norms, dtypes = [], []
    released = strategy._released

    def spy(tensors, noise=True):
        dtypes.extend(t.dtype for t in tensors)
        norms.append(torch.cat([t.double().flatten() for t in tensors]).norm().item())
        return released(tensors, noise)

    strategy._released = spy
    _trainer(strategy, max_steps=3, precision="bf16-true").fit(module)
    assert norms
    assert all(d == torch.float32 for d in dtypes), dtypes
    assert max(norms) <= 1.0 * (1 + 1e-3), norms
    assert min(norms) > 0.99  # the gradient was large: clipped to C, not to zero


# --------------------------------------------------------------------------------------------- 10
class _UserBatchSampler(TinyModule):
    def train_dataloader(self):
        return DataLoader(self.dataset, batch_sampler=BatchSampler(RandomSampler(self.dataset), 30, drop_last=False))


class _UserSampler(TinyModule):
    def train_dataloader(self):
        weights = torch.linspace(0.1, 1.0, len(self.dataset))
        return DataLoader(self.dataset, batch_size=30, sampler=WeightedRandomSampler(weights, len(self.dataset)))


@pytest.mark.parametrize(
    ("module_cls", "name"), [(_UserBatchSampler, "BatchSampler"), (_UserSampler, "WeightedRandomSampler")]
)
def test_user_samplers_set_the_rate_and_are_named_when_replaced(module_cls, name):
    module = module_cls(dataset=_data(n=300))
    strategy = DPStrategy(noise_multiplier=1.0)
    with pytest.warns(UserWarning, match=rf"{name}.*replaced"):
        _trainer(strategy, max_steps=1).fit(module)
    assert strategy.sample_rate == pytest.approx(30 / 300)


def test_default_loader_is_replaced_quietly():
    strategy = DPStrategy(noise_multiplier=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(strategy, max_steps=1).fit(TinyModule(batch_size=6))
    assert not [w for w in caught if "replaced" in str(w.message)]


def test_overfit_batches_says_the_batches_are_fresh_poisson_draws():
    """`Trainer(overfit_batches=2)` means "the same 2 batches every epoch" to a Lightning user; under DP the
    strategy samples from the whole set (q = batch / n), limited to 2 steps per epoch, all accounted."""
    strategy = DPStrategy(noise_multiplier=1.0)
    with pytest.warns(UserWarning, match=r"overfit_batches=2.*fresh Poisson draws.*Subset"):
        _trainer(strategy, max_epochs=3, overfit_batches=2).fit(TinyModule(dataset=_data(48), batch_size=6))
    assert strategy.sample_rate == pytest.approx(6 / 48)
    assert strategy.steps == 3 * 2


class _LoaderBuiltInConfigureOptimizers(_UserBatchSampler):
    """`estimated_stepping_batches` in configure_optimizers builds the training loader during `setup`."""

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (steps + 1))
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def test_loader_built_while_configuring_optimizers_gets_the_rate_and_the_secret_seed():
    """The loader must see the user's batch_sampler and the strategy's (secure) sampling seed, not seed 0."""
    strategy = DPStrategy(noise_multiplier=1.0, secure_mode=True)
    trainer = _trainer(strategy, max_steps=1)
    with pytest.warns(UserWarning, match=r"BatchSampler.*replaced"):
        trainer.fit(_LoaderBuiltInConfigureOptimizers(dataset=_data(n=300)))
    assert strategy.sample_rate == pytest.approx(30 / 300)
    assert trainer.train_dataloader.batch_sampler.seed == strategy._seed
    assert strategy._seed not in (None, 0)


# --------------------------------------------------------------------------------------------- 11
def _images(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


class _Mixing(TinyModule):
    """A fine-tuning recipe that mixes the samples of a batch (MixUp/CutMix) in ``training_step``.

    A mixed input is ``λ x_i + (1 - λ) x_j``: the gradient clipped as "sample i's" also carries sample
    j's image and label, so one sample's influence on the update is no longer bounded by C.
    """

    def __init__(self, mixer):
        super().__init__(dataset=_images())
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        self.mixup_fn = mixer

    def training_step(self, batch, batch_idx):
        x, y = self.mixup_fn(*batch)
        return torch.sum(-y * F.log_softmax(self(x), dim=-1), dim=-1).mean()  # soft targets


def _timm_mixup():
    from timm.data import Mixup

    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3)


def _torchvision_mixup():
    from torchvision.transforms import v2

    return v2.RandomChoice([v2.CutMix(num_classes=3), v2.MixUp(num_classes=3)])


def _mix_globally(batch):
    return _GLOBAL_MIXUP(*torch.utils.data.default_collate(batch))


_GLOBAL_MIXUP = _torchvision_mixup()


class _MixingCollate(_Mixing):
    """MixUp/CutMix in the training loader's ``collate_fn`` (the pattern torchvision documents)."""

    def __init__(self, collate):
        super().__init__(lambda x, y: (x, y))  # the loader's batches are mixed already
        self._collate = collate  # private: only the loader holds it

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=6, collate_fn=self._collate)


def _closure_collate():
    from torchvision.transforms import v2

    mix = v2.MixUp(num_classes=3)
    return lambda batch: mix(*torch.utils.data.default_collate(batch))


@pytest.mark.parametrize(
    ("make_module", "named"),
    [
        (lambda: _Mixing(_timm_mixup()), r"`mixup_fn` \(timm.*Mixup\)"),
        (lambda: _Mixing(_torchvision_mixup()), r"`mixup_fn.transforms\[0\]` \(.*CutMix\)"),
        (lambda: _MixingCollate(_closure_collate()), r"`collate_fn` \(.*MixUp\)"),
        (lambda: _MixingCollate(_mix_globally), r"`collate_fn.transforms\[0\]` \(.*CutMix\)"),
    ],
    ids=["module-timm", "module-torchvision", "collate-closure", "collate-global"],
)
def test_batch_mixing_is_refused(make_module, named):
    module = make_module()
    before = _flat(module)
    with pytest.raises(ValueError, match=rf"mixes the samples of a batch, found {named}"):
        _trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(module)
    assert torch.equal(_flat(module), before)


class _MixingCollateObject:
    """A callable collate class that keeps its mixer in an attribute."""

    def __init__(self):
        from torchvision.transforms import v2

        self.mix = v2.MixUp(num_classes=3)

    def __call__(self, batch):
        return self.mix(*torch.utils.data.default_collate(batch))


def test_batch_mixers_are_found_in_partials_callable_objects_and_nested_attributes():
    import functools

    from torchvision.transforms import v2

    from lightning_sparta.privacy.guards import check_no_batch_mixing

    def mix_with(mixer, batch):
        return mixer(*torch.utils.data.default_collate(batch))

    partial = functools.partial(mix_with, v2.CutMix(num_classes=3))
    with pytest.raises(ValueError, match=r"found `collate_fn` \(.*CutMix\)"):
        check_no_batch_mixing(collate_fn=partial)
    with pytest.raises(ValueError, match=r"found `collate_fn.mix` \(.*MixUp\)"):
        check_no_batch_mixing(collate_fn=_MixingCollateObject())
    module = TinyModule()
    module.net[0].recipe = {"augment": [_timm_mixup()]}  # an attribute of a submodule, in a dict, in a list
    with pytest.raises(ValueError, match=r"found `net.0.recipe\['augment'\]\[0\]` \(timm"):
        check_no_batch_mixing(module)


def test_recipes_without_batch_mixing_pass_the_check():
    from torchvision.transforms import v2

    from lightning_sparta.privacy.guards import check_no_batch_mixing

    module = TinyModule()
    module.augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomResizedCrop(4)])  # per-sample transforms
    check_no_batch_mixing(module, collate_fn=torch.utils.data.default_collate)
    check_no_batch_mixing(module, collate_fn=lambda batch: torch.utils.data.default_collate(batch))


# --------------------------------------------------------------------------------------------- 12
class _Crashes(TinyModule):
    """A first fit that dies in the middle of a step (a bug, an out-of-memory error, an interrupt)."""

    def __init__(self, where: str):
        super().__init__(batch_size=24)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        self.crash, self.where, self.calls = True, where, 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.crash and self.where == "second micro-batch" and self.calls == 2:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)

    def on_after_backward(self):
        if self.crash and self.where == "after backward":
            raise RuntimeError("simulated crash")


@CLIPPING
@pytest.mark.parametrize(
    ("where", "physical_batch_size"),
    [("after backward", None), ("after backward", 10), ("second micro-batch", 10)],
    ids=["after-backward", "after-backward-micro-batches", "second-micro-batch"],
)
def test_a_crashed_step_leaves_nothing_for_the_next_fit(clipping, where, physical_batch_size):
    """The per-sample gradients and clipped sums of a step that never finished must not reach a later step.

    Stale per-sample gradients would be added to the next batch's, and stale clipped sums (the micro-batches
    clipped before the crash) released with it: contributions of samples the accountant never saw in that
    step. σ = 0, q = 1, SGD lr = 1: the second fit's update must be exactly Σ_i clip(g_i) / n of its batch.
    """
    from torch.func import functional_call, grad, vmap

    module = _Crashes(where)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(
            noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping, physical_batch_size=physical_batch_size
        )
    trainer = _trainer(strategy, max_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module)
    module.crash = False

    x, y = module.dataset.tensors
    params = {k: v.detach().clone() for k, v in module.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(module, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
    factors = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    trainer.fit(module)  # the same Trainer and strategy, as in a notebook after fixing the bug
    assert strategy.steps == 1  # the crashed step was never accounted
    for name, p in module.named_parameters():
        expected = params[name] - torch.einsum("i,i...->...", factors, per_sample[name]) / len(x)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------- 13
class _WithBatchNorm(TinyModule):
    def __init__(self):
        super().__init__(batch_size=12)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


class _AccumulateFromEpoch1(L.Callback):
    """What a hand-written callback (or Lightning's SWA in its BatchNorm epoch) does: accumulate mid-run."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.accumulate_grad_batches = 2


def test_learning_rate_finder_is_refused_before_it_trains(tmp_path):
    """Lightning's learning-rate finder picks the rate from the loss curve of private batches, which is not
    noised, then restores the checkpoint taken before its steps: the strategy's accountant with it, so the
    steps it took were no longer counted (on main it crashed on the restored state instead)."""
    from lightning.pytorch.tuner import Tuner

    module = TinyModule(batch_size=12)
    before = _flat(module)
    trainer = _trainer(DPStrategy(noise_multiplier=1.0), max_epochs=2, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"LearningRateFinder.*not noised"):
        Tuner(trainer).lr_find(module, num_training=5)
    assert torch.equal(_flat(module), before)
    trainer = _trainer(DPStrategy(noise_multiplier=1.0), callbacks=[LearningRateFinder()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="LearningRateFinder"):
        trainer.fit(TinyModule())


def test_batch_size_finder_is_refused_with_what_to_use_instead():
    trainer = _trainer(DPStrategy(noise_multiplier=1.0), callbacks=[BatchSizeFinder()])
    with pytest.raises(ValueError, match=r"BatchSizeFinder.*physical_batch_size"):
        trainer.fit(TinyModule())


def test_gradient_accumulation_cannot_start_mid_run():
    """Accumulation set after fit start (a GradientAccumulationScheduler, or any callback) silently dropped
    the clipped sums of every batch but the last of each accumulation window; it is refused like
    `Trainer(accumulate_grad_batches=...)`."""
    scheduler = _trainer(DPStrategy(noise_multiplier=1.0), callbacks=[GradientAccumulationScheduler({1: 2})])
    with pytest.raises(ValueError, match=r"GradientAccumulationScheduler.*physical_batch_size"):
        scheduler.fit(TinyModule(batch_size=12))
    strategy = DPStrategy(noise_multiplier=1.0)
    trainer = _trainer(strategy, max_epochs=2, callbacks=[_AccumulateFromEpoch1()])
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2.*physical_batch_size"):
        trainer.fit(TinyModule(batch_size=12))
    assert strategy.steps == 2  # the first epoch's two steps; none in the second


def test_stochastic_weight_averaging_is_refused_with_batchnorm_and_trains_without():
    """With BatchNorm, Lightning's SWA resets the running statistics and recomputes them in an extra epoch
    over the training data: statistics of private data without noise, or, with DPStrategy's frozen
    BatchNorm, statistics left at 0 and 1 (a silently broken model), and an extra epoch of unplanned steps.
    Without BatchNorm the average of private iterates is post-processing and trains as usual."""
    swa = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=1)
    with pytest.raises(ValueError, match=r"StochasticWeightAveraging.*BatchNorm.*net\.1"):
        _trainer(DPStrategy(noise_multiplier=1.0), max_epochs=3, callbacks=[swa]).fit(_WithBatchNorm())
    strategy = DPStrategy(noise_multiplier=1.0)
    module = TinyModule(batch_size=12)
    swa = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=1)
    _trainer(strategy, max_epochs=3, callbacks=[swa]).fit(module)
    assert strategy.steps == 3 * strategy.steps_per_epoch


def test_weight_averaging_trains_a_model_with_batchnorm():
    """The refusal's suggestion: Lightning's EMA averages the (frozen) statistics with the weights and takes
    no extra epoch; the statistics stay those of the pretrained model."""
    module = _WithBatchNorm()
    stats = module.net[1].running_mean.clone()
    strategy = DPStrategy(noise_multiplier=1.0)
    _trainer(strategy, max_epochs=2, callbacks=[EMAWeightAveraging(decay=0.5)]).fit(module)
    assert strategy.steps == 2 * strategy.steps_per_epoch
    assert torch.equal(module.net[1].running_mean, stats)


def test_model_pruning_is_refused_before_it_breaks_a_step():
    """Lightning's ModelPruning reparametrises the pruned weights mid-run (`weight_orig * weight_mask`);
    the next step failed with a bare `KeyError: 'weight'` inside the hooks. Refused at fit start, and a
    module pruned by hand before fit is refused by name."""
    from lightning.pytorch.callbacks import ModelPruning
    from torch.nn.utils import prune

    trainer = _trainer(DPStrategy(noise_multiplier=1.0), max_epochs=2, callbacks=[ModelPruning("l1_unstructured")])
    with pytest.raises(ValueError, match=r"ModelPruning is not supported.*Prune after training"):
        trainer.fit(TinyModule(batch_size=12))
    module = TinyModule(batch_size=12)
    prune.l1_unstructured(module.net[0], "weight", amount=0.3)
    with pytest.raises(ValueError, match=r"`net\.0` \(Linear\) is pruned.*prune\.remove"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)
    prune.remove(module.net[0], "weight")  # permanent: an ordinary (sparse-valued) weight trains
    _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "parametrize_weight_norm", "orthogonal"])
def test_reparametrised_weights_are_refused_by_name(kind):
    """Weight/spectral normalisation and `torch.nn.utils.parametrize` recompute the weight from other
    tensors before each forward. Refused before (by the batch-dimension or sum checks, with messages about
    reshaped batches or parameters used outside their module); now named for what they are."""
    from torch.nn.utils import parametrizations, spectral_norm, weight_norm

    module = TinyModule(batch_size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        {
            "weight_norm": weight_norm,
            "spectral_norm": spectral_norm,
            "parametrize_weight_norm": parametrizations.weight_norm,
            "orthogonal": parametrizations.orthogonal,
        }[kind](module.net[0])
    with pytest.raises(ValueError, match=r"`net\.0` \(\w*Linear\) recomputes its weights.*remove"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)


# --------------------------------------------------------------------------------------------- 14
class _Updates(L.Callback):
    """Each step's parameter update and the inputs of its batch."""

    def __init__(self):
        self.updates, self.batches, self._before = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = _flat(pl_module)
        self.batches.append(batch[0].detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.updates.append(_flat(pl_module) - self._before)


@pytest.mark.parametrize("secure_mode", [False, True], ids=["reproducible", "secure"])
def test_resuming_an_earlier_checkpoint_of_the_same_run_draws_fresh_noise_and_counts_every_step(tmp_path, secure_mode):
    """`trainer.fit(model, ckpt_path=<an earlier checkpoint>)` on the strategy that wrote it rewound the
    accountant to the checkpoint's history, and with it the step counter that keys the noise and the epoch
    that keys the batches: the steps after the checkpoint were replayed with the noise vectors and batches
    they had already used, while their first versions stayed released (later checkpoints on disk). With
    any randomness in the gradients (dropout, augmentation) the difference of the two releases of one step
    is noise-free. The loss is zero here, so each update is its noise alone."""
    from lightning_sparta.privacy.accountant import epsilon_for

    module = TinyModule(zero_loss=True, batch_size=12, width=50)
    strategy = DPStrategy(noise_multiplier=1.0, seed=None if secure_mode else 5, secure_mode=secure_mode)
    record = _Updates()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer = _trainer(strategy, max_epochs=3, callbacks=[record, checkpoints], enable_checkpointing=True)
    trainer.fit(module)
    first = len(record.updates)
    assert strategy.steps == first == 3 * strategy.steps_per_epoch
    with pytest.warns(UserWarning, match=r"earlier checkpoint.*steps after it"):
        trainer.fit(module, ckpt_path=tmp_path / "epoch=0.ckpt")
    replayed = len(record.updates) - first
    assert replayed == 2 * strategy.steps_per_epoch
    assert strategy.steps == first + replayed  # the discarded steps were released: still counted
    assert strategy.epsilon() == pytest.approx(epsilon_for([(1.0, strategy.sample_rate, first + replayed)], 1e-5))
    for again in record.updates[first:]:
        assert not any(torch.allclose(again, earlier) for earlier in record.updates[:first])
    for again in record.batches[first:]:
        assert not any(
            again.shape == b.shape and torch.equal(again, b) for b in record.batches[strategy.steps_per_epoch : first]
        )


def test_a_strategy_that_has_taken_steps_refuses_another_runs_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="other")
    _trainer(DPStrategy(noise_multiplier=2.0, seed=1), callbacks=[checkpoint], enable_checkpointing=True).fit(
        TinyModule(batch_size=12)
    )
    strategy = DPStrategy(noise_multiplier=1.0, seed=2)
    trainer = _trainer(strategy, max_epochs=1)
    trainer.fit(TinyModule(batch_size=12))
    trainer.fit_loop.max_epochs = 3
    with pytest.raises(ValueError, match=r"another run.*privacy_state"):
        trainer.fit(TinyModule(batch_size=12), ckpt_path=tmp_path / "other.ckpt")


# --------------------------------------------------------------------------------------------- 15
class _GradientWatcher(Callback):
    """What a gradient-norm logger in ``on_after_backward`` (module or callback) would read."""

    def __init__(self) -> None:
        self.after_backward: list[dict[str, torch.Tensor | None]] = []
        self.before_step: list[dict[str, torch.Tensor | None]] = []

    @staticmethod
    def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()}

    def on_after_backward(self, trainer, pl_module):
        self.after_backward.append(self._grads(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step.append(self._grads(pl_module))


class _NormedModule(TinyModule):
    """A LayerNorm: its per-sample gradient comes from a grad sampler, so autograd's batch gradient is on it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


@CLIPPING
@pytest.mark.parametrize("physical_batch_size", [None, 5])
def test_hooks_after_the_backward_pass_see_only_the_private_gradient(clipping, physical_batch_size):
    """`on_after_backward` (where Lightning users log gradient norms) read autograd's raw batch gradient,
    not private, on the norm layers and, in the first step, on every parameter: logged each step, the
    norms of the raw gradients would be published beside a model claimed (ε, δ)-private. The release is
    now formed before those hooks run. σ = 0 and q = 1: what they see is Σ_i clip(g_i)/n from `torch.func`
    at every step, the same as `on_before_optimizer_step` sees."""
    L.seed_everything(0)
    module = _NormedModule(batch_size=24)  # batch_size == n: q = 1, every sample in every step
    x, y = module.dataset.tensors
    watcher = _GradientWatcher()
    references = []

    class Reference(Callback):  # the clipped sum at the weights each step starts from
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            references.append(_clipped_sum_reference(pl_module, x, y, clip=0.05))

    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(
            noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping, physical_batch_size=physical_batch_size
        )
    _trainer(strategy, max_epochs=3, callbacks=[Reference(), watcher]).fit(module)
    assert len(watcher.after_backward) == len(references) == 3
    for seen, before, expected in zip(watcher.after_backward, watcher.before_step, references, strict=True):
        for name, grad in seen.items():
            assert grad is not None, name
            torch.testing.assert_close(grad, expected[name] / 24, atol=1e-6, rtol=1e-4, msg=name)
            torch.testing.assert_close(grad, before[name], msg=name)


# --------------------------------------------------------------------------------------------- 16
def _epochs_fit(strategy: DPStrategy, epochs: int, trainer: L.Trainer | None = None) -> L.Trainer:
    trainer = trainer if trainer is not None else _trainer(strategy, max_epochs=epochs)
    trainer.fit_loop.max_epochs = epochs
    trainer.fit(TinyModule(dataset=_data(48), batch_size=8))
    return trainer


def test_a_second_fit_stays_within_target_epsilon():
    """`target_epsilon` is a budget for the whole history. A second fit with the same Trainer and a raised
    max_epochs recalibrated σ as if nothing had been spent, and for all 4 epochs although only 2 were left:
    ε ended at 2.39 for a target of 2, with one INFO line. Now the new steps are calibrated together with the
    history, with a warning, and the total is checked with the accountant by hand."""
    from lightning_sparta.privacy.accountant import epsilon_for

    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-5, seed=3)
    trainer = _epochs_fit(strategy, 2)
    first_sigma, first_steps = strategy.noise_multiplier, strategy.steps
    with pytest.warns(UserWarning, match=r"bounds the whole history.*12 steps already accounted"):
        _epochs_fit(strategy, 4, trainer)
    assert strategy.steps == 2 * first_steps == 24
    second = [(s, q, n) for s, q, n in strategy.accountant.history if s != first_sigma]
    assert sum(n for _, _, n in second) == first_steps  # calibrated for the 2 epochs left, not for 4
    total = epsilon_for([(first_sigma, strategy.sample_rate, 12), *second], 1e-5, "prv")
    assert total == pytest.approx(strategy.epsilon())
    assert total <= 2.0


def test_target_epsilon_composes_with_a_privacy_state():
    """A strategy continuing another run's `privacy_state` calibrates σ so that the total meets
    `target_epsilon`, and refuses before any step when the history alone has spent it."""
    from lightning_sparta.privacy.accountant import BudgetSpentError, epsilon_for

    earlier = DPStrategy(noise_multiplier=4.0, seed=1)
    _epochs_fit(earlier, 1)
    state = earlier.privacy_state()
    spent = earlier.epsilon()
    assert 0 < spent < 1.0
    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-5, seed=2, privacy_state=state)
    with pytest.warns(UserWarning, match="bounds the whole history"):
        _epochs_fit(strategy, 2)
    total = epsilon_for(strategy.accountant.history, 1e-5, "prv")
    assert 2.0 - strategy.epsilon_tolerance - 1e-9 <= total <= 2.0
    assert strategy.steps == earlier.steps + 12

    loose = DPStrategy(noise_multiplier=0.7, seed=1)
    _epochs_fit(loose, 2)
    assert loose.epsilon() > 2.0
    refused = DPStrategy(target_epsilon=2.0, target_delta=1e-5, seed=2, privacy_state=loose.privacy_state())
    with pytest.raises(BudgetSpentError, match=r"target_epsilon=2 is spent.*12 steps already accounted"):
        _epochs_fit(refused, 2)
    assert refused.steps == loose.steps


# --------------------------------------------------------------------------------------------- 17
class _Tokens(L.LightningModule):
    """Token ids averaged through an embedding: what a ViT patch-token lookup or a text head does."""

    def __init__(self, max_norm: float | None):
        super().__init__()
        self.emb = nn.Embedding(50, 8, max_norm=max_norm)
        with torch.no_grad():
            self.emb.weight.mul_(10)  # every row longer than max_norm
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.emb(x).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 25, (40, 5), generator=g), torch.randint(0, 3, (40,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("frozen", [False, True])
def test_embeddings_that_renormalise_in_place_are_refused(frozen):
    """`nn.Embedding(max_norm=...)` rescales the rows it looks up in place during the forward pass: trained
    on token ids 0-24, rows 0-24 (those drawn) came out changed and rows 25-49 not, frozen or not, so the
    released weights listed the private batches' indices without noise. Refused before any forward."""
    from lightning_sparta.privacy.validation import IncompatibleModelError

    module = _Tokens(max_norm=1.0)
    module.emb.weight.requires_grad_(not frozen)
    before = module.emb.weight.detach().clone()
    with pytest.raises(IncompatibleModelError, match=r"max_norm.*in place.*: emb\."):
        _trainer(DPStrategy(noise_multiplier=1.0, seed=1)).fit(module)
    assert torch.equal(module.emb.weight, before)
    _trainer(DPStrategy(noise_multiplier=1.0, seed=1)).fit(_Tokens(max_norm=None))  # without it: trains


# --------------------------------------------------------------------------------------------- 18
class _InstanceNormed(L.LightningModule):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(2, 4, 3, padding=1), norm, nn.Linear(4 * 16, 3)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(24, 2, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g))

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=24)


def test_instance_norm_trains_and_its_running_statistics_are_refused():
    """InstanceNorm normalises each sample on its own, so it is private; but the first-step sum check refused
    it, because the conv bias before it gets a gradient that cancels to rounding (1.6e-7 against 1.1e-7 of
    error). With `track_running_stats=True` it updates running statistics from every batch, released
    without noise: refused by name. σ = 0, q = 1: the step equals Σ clip(g_i)/n from `torch.func`."""
    from lightning_sparta.privacy.validation import IncompatibleModelError

    tracking = _InstanceNormed(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    before = tracking.norm.running_mean.clone()
    with pytest.raises(IncompatibleModelError, match=r"track_running_stats=True.*without noise: norm\."):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(tracking)
    assert torch.equal(tracking.norm.running_mean, before)

    L.seed_everything(0)
    module = _InstanceNormed(nn.InstanceNorm2d(4, affine=True))
    x, y = module.data.tensors
    expected = _clipped_sum_reference(module, x, y, clip=0.05)
    start = {k: v.detach().clone() for k, v in module.named_parameters()}
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05)
    _trainer(strategy, max_steps=1).fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(start[name] - p.detach(), expected[name] / 24, atol=1e-6, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------- 19
class _LogsTrainingLoss(TinyModule):
    def __init__(self, plateau: bool = False, **kwargs):
        super().__init__(batch_size=12, **kwargs)
        self.plateau = plateau

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.plateau:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss_epoch"}}


def test_decisions_from_metrics_of_private_batches_are_named(tmp_path):
    """EarlyStopping, ModelCheckpoint or ReduceLROnPlateau monitoring a loss that `training_step` logs decide
    from private data without noise (when to stop, which checkpoint to keep, the learning rate): a warning
    names them once; a monitor of something else (ε, a validation metric) is left alone."""
    from lightning.pytorch.callbacks import EarlyStopping

    def fit(module, callbacks=(), **kwargs):
        strategy = DPStrategy(noise_multiplier=1.0)
        trainer = _trainer(strategy, max_epochs=2, callbacks=list(callbacks), default_root_dir=tmp_path, **kwargs)
        trainer.fit(module)

    stop = EarlyStopping(monitor="train_loss_epoch", patience=100)
    keep = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss")
    with pytest.warns(UserWarning, match=r"EarlyStopping on 'train_loss_epoch'; ModelCheckpoint on 'train_loss'"):
        fit(_LogsTrainingLoss(), [stop, keep], enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"ReduceLROnPlateau on 'train_loss_epoch'.*learning rate"):
        fit(_LogsTrainingLoss(plateau=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DPStrategy: .*on '")
        others = [
            EarlyStopping(monitor="privacy/epsilon", patience=100, strict=False),
            ModelCheckpoint(dirpath=tmp_path, monitor="val_loss"),
        ]
        fit(_LogsTrainingLoss(), others, enable_checkpointing=True, limit_val_batches=1)


# --------------------------------------------------------------------------------------------- 20
class _RunningMean(nn.Module):
    """A hand-written normaliser that tracks the mean of what it sees (no known type to refuse)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


def test_a_layer_that_updates_statistics_in_its_forward_is_refused_and_restored():
    """Any floating-point buffer changed in place by `training_step` is a statistic of private batches
    released without noise. The known layers are handled by type; a hand-written one trained silently
    before. Refused at the first step, with the buffer restored; an integer counter is not a statistic."""
    module = TinyModule(batch_size=12)
    module.net = nn.Sequential(nn.Linear(6, 8), _RunningMean(8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(
        RuntimeError, match=r"the buffers net\.1\.mean changed during `training_step`.*on_train_batch_end"
    ):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)
    assert torch.equal(module.net[1].mean, torch.zeros(8))

    class Counted(_RunningMean):
        def forward(self, x):
            self.steps.add_(1)  # data-independent: allowed
            return x - self.mean

    module.net[1] = Counted(8)
    _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)
    assert module.net[1].steps.item() > 0


# --------------------------------------------------------------------------------------------- 21
def _poisoned(value: float, row: int = 3) -> TensorDataset:
    data = _data()
    data.tensors[0][row, 2] = value
    return data


@CLIPPING
@pytest.mark.parametrize("physical_batch_size", [None, 5])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_sample_with_a_non_finite_gradient_is_left_out_of_the_sum(clipping, physical_batch_size, value):
    """One sample whose gradient is NaN or inf (a corrupted image, a log of zero) made the clipped sum,
    and so every released update, NaN: the output then tells whether that sample was in the data, an
    unbounded privacy loss (clipping bounds finite contributions only). Its contribution is now zero,
    within the bound. σ = 0, q = 1: the update is the `torch.func` clipped sum over the other samples."""
    L.seed_everything(0)
    module = _NormedModule(dataset=_poisoned(value), batch_size=24)  # q = 1: every sample, every step
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    keep = torch.arange(24) != 3
    expected = _clipped_sum_reference(module, x[keep], y[keep], clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(
            noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping, physical_batch_size=physical_batch_size
        )
    with pytest.warns(UserWarning, match="not finite.*left out"):
        _trainer(strategy, max_steps=1).fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / 24, atol=1e-6, rtol=1e-4, msg=name)


@CLIPPING
def test_a_non_finite_sample_is_left_out_of_sparta_scores(tmp_path, clipping):
    """The scoring epoch's Σ_i c_i |g_i| leaves a NaN sample out the same way, so the mask stays private."""
    from test_sparta import SCORED, N, SparseModule, _fit, _reference_scores

    module = SparseModule(batch_size=N)  # q = 1: the scoring epoch is one batch of every sample
    module.dataset.tensors[0][3].view(-1)[0] = math.nan
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, seed=3, clipping=clipping)
    with pytest.warns(UserWarning, match="not finite.*left out"):
        _, callback, _, _, after = _fit(tmp_path, "sparta", clip=0.05, module=module, strategy=strategy, max_epochs=2)
    x, y = module.dataset.tensors
    keep = torch.arange(N) != 3
    expected = _reference_scores(after.start[1], after.trainable[1], x[keep], y[keep], 0.05, "sparta")
    for layer in SCORED:
        torch.testing.assert_close(callback.scores[layer], expected[layer], rtol=1e-4, atol=1e-7)


class _InfiniteLoss(_Tokens):
    """One sample's loss is infinite (a log of zero): the embedding's ghost form and the Linear's see it."""

    def __init__(self):
        super().__init__(max_norm=None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.head(self.emb(x).mean(1)), y, reduction="none")
        return losses * torch.where(torch.arange(len(y)) == 2, math.inf, 1.0)


@CLIPPING
def test_a_sample_with_an_infinite_loss_is_left_out_of_an_embedding_model(clipping):
    L.seed_everything(0)
    module = _InfiniteLoss()
    with pytest.warns(UserWarning, match="not finite"):
        _trainer(DPStrategy(noise_multiplier=1.0, clipping=clipping)).fit(module)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class _FirstBatchPoisoned(TinyModule):
    """A parameter used outside its module (refused by the sum check), and a NaN sample in the first batch."""

    def __init__(self):
        super().__init__(batch_size=24)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.net(x) / self.temperature

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == 0:
            x = x.clone()
            x[0, 0] = math.nan
        return super().training_step((x, y), batch_idx)


def test_the_first_step_check_waits_for_a_step_without_non_finite_samples():
    """Autograd's batch gradient is NaN when a sample is: the check that per-sample gradients add up is
    made at the next step instead of passing vacuously."""
    with (
        pytest.raises(RuntimeError, match=r"\['temperature'\] do not add up"),
        pytest.warns(UserWarning, match="not finite"),
    ):
        _trainer(DPStrategy(noise_multiplier=1.0), max_epochs=3).fit(_FirstBatchPoisoned())


# --------------------------------------------------------------------------------------------- 22
class _ReassignedMean(_RunningMean):
    """The plain-PyTorch way to keep a running mean: a new tensor assigned to the buffer each call."""

    def forward(self, x):
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return x - self.mean


class _MeanThroughData(_RunningMean):
    """A running mean updated through `.data`, which autograd's version counter does not see."""

    def forward(self, x):
        if self.training:
            self.mean.data.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.mean


@pytest.mark.parametrize("layer", [_ReassignedMean, _MeanThroughData])
def test_statistics_kept_by_reassignment_or_through_data_are_refused_and_restored(layer):
    """The buffer check compared version counters only: a buffer reassigned each forward (the usual
    `self.mean = 0.9 * self.mean + ...`) or updated through `.data` trained silently, releasing a
    statistic of private batches. It is compared by identity and value on the first step."""
    module = TinyModule(batch_size=12)
    module.net = nn.Sequential(nn.Linear(6, 8), layer(8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(RuntimeError, match=r"the buffers net\.1\.mean changed during"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)
    assert torch.equal(module.net[1].mean, torch.zeros(8))


class _WeightFromBatch(TinyModule):
    """Rescales a weight in place from the batch in its forward pass (a data-dependent projection)."""

    def __init__(self, through_data: bool = True, from_step: int = 0):
        super().__init__(batch_size=12)
        self.through_data, self.from_step = through_data, from_step

    def forward(self, x):
        if self.training and self.global_step >= self.from_step:
            weight = self.net[0].weight.data if self.through_data else self.net[0].weight
            with torch.no_grad():
                weight.mul_(1 + 1e-2 * x.mean())
        return self.net(x)


class _OptimizerInBackward(TinyModule):
    """PyTorch's "optimizer step in backward" recipe: each parameter is updated as its gradient lands."""

    def on_fit_start(self):
        inner = torch.optim.SGD(self.parameters(), lr=0.1)

        def step(_param):
            inner.step()
            inner.zero_grad()

        for p in self.parameters():
            p.register_post_accumulate_grad_hook(step)


@CLIPPING
@pytest.mark.parametrize(
    ("make", "where"),
    [
        (lambda: _WeightFromBatch(through_data=True), "training_step"),
        (lambda: _WeightFromBatch(through_data=False), "training_step"),
        (_OptimizerInBackward, "backward"),
    ],
    ids=["through_data", "in_place", "optimizer_in_backward"],
)
def test_parameters_changed_during_the_step_are_refused_and_restored(make, where, clipping):
    """Between the start of `training_step` and the release only the optimizer may move a parameter.
    A weight rescaled from the batch in the forward pass (through `.data` or not) trained silently,
    releasing a function of the private batch without noise, and an optimizer stepped in a gradient hook
    applied autograd's raw batch gradient (refused, but by the sum check's message about parameters used
    outside their module, after the raw step). Both are refused by name, the weights restored."""
    L.seed_everything(0)
    module = make()
    before = _flat(module)
    with pytest.raises(RuntimeError, match=rf"parameters net\.0\.weight.* changed during .*{where}"):
        _trainer(DPStrategy(noise_multiplier=1.0, clipping=clipping)).fit(module)
    assert torch.equal(_flat(module), before)


@pytest.mark.parametrize("through_data", [False, True], ids=["in_place", "through_data"])
def test_a_parameter_changed_in_a_later_step_is_refused_and_never_checkpointed(tmp_path, through_data):
    """After the first step no copies are kept: an in-place change made from the third step on is refused by
    its version counter, and one made through `.data` (which no version counter sees, and which trained
    silently) by a checksum of the weights' bits. With no copy to restore, the changed weight is filled
    with NaN, so the checkpoint `OnExceptionCheckpoint` writes on the refusal does not hold it."""
    L.seed_everything(0)
    module = _WeightFromBatch(through_data=through_data, from_step=2)
    saver = OnExceptionCheckpoint(dirpath=tmp_path)
    with pytest.raises(RuntimeError, match=r"parameters net\.0\.weight changed during.*filled with NaN"):
        _trainer(DPStrategy(noise_multiplier=1.0), max_epochs=3, callbacks=[saver], enable_checkpointing=True).fit(
            module
        )
    assert module.global_step == 2
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["state_dict"]
    assert saved["net.0.weight"].isnan().all()
    assert not saved["net.2.weight"].isnan().any()


# --------------------------------------------------------------------------------------------- 23
class _ClosureByHand(TinyModule):
    """An `optimizer_step` override that runs the closure itself, then steps without it."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        optimizer_closure()
        optimizer.step()


class _LineSearch(TinyModule):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


def test_a_closure_run_outside_the_optimizer_step_is_refused_by_what_it_is():
    """Run by hand, the closure's backward pass left autograd's raw batch gradient, and the refusal came
    from the sum check, speaking of parameters used outside their module. LBFGS, which evaluates the
    closure several times per step, crashed with a TypeError inside the strategy. Both are now named,
    and no parameter moved."""
    module = _ClosureByHand()
    before = _flat(module)
    with pytest.raises(RuntimeError, match=r"closure ran outside `optimizer.step\(closure=...\)`"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(module)
    assert torch.equal(_flat(module), before)
    with pytest.raises(ValueError, match=r"`LBFGS.step` needs a closure.*first-order optimizer"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(_LineSearch())


class _SkipsBatches(TinyModule):
    """Lightning's way to skip a batch, used to drop batches with a NaN loss or unwanted content."""

    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("physical_batch_size", [None, 3])
def test_skipping_a_batch_by_returning_none_is_refused_with_the_reason(physical_batch_size):
    """A skip decided on the whole batch lets one sample cancel the others' contributions; the refusal
    says so and points to what DP-SGD offers instead (it was a TypeError about the return type)."""
    strategy = DPStrategy(noise_multiplier=1.0, physical_batch_size=physical_batch_size)
    with pytest.raises(TypeError, match=r"returned None, which in Lightning skips the batch.*left out one by one"):
        _trainer(strategy, max_epochs=1).fit(_SkipsBatches(batch_size=6))


class _PenalisedLoss(TinyModule):
    """An L2 penalty on the weights added to the loss: its gradient reaches no module's output."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-2 * sum(p.pow(2).sum() for p in self.parameters())


def test_a_weight_penalty_in_the_loss_is_refused_pointing_to_weight_decay():
    """The penalty's gradient bypasses the per-sample hooks, so the parameters' per-sample gradients do not
    add up; the refusal names this common case and the optimizer's `weight_decay`, which costs no privacy."""
    with pytest.raises(RuntimeError, match=r"do not add up.*L2 regularisation.*`weight_decay`"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(_PenalisedLoss(batch_size=12))


# --------------------------------------------------------------------------------------------- 24
class _SubsetSampled(TinyModule):
    """The older PyTorch way to hold out a validation split: a SubsetRandomSampler over the training set."""

    def __init__(self, indices):
        super().__init__(batch_size=4)
        self.indices = indices

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=4, sampler=SubsetRandomSampler(self.indices))


def _rows_seen(module: TinyModule) -> set[int]:
    x = module.dataset.tensors[0]
    return {int((x == row).all(1).nonzero()[0]) for row in torch.cat(module.seen)}


def test_a_subset_random_sampler_keeps_training_on_its_indices():
    """Replaced by Poisson sampling over the whole dataset, a SubsetRandomSampler's held-out examples
    (often the validation split) were trained on. Poisson sampling now runs over its indices, with
    q = batch_size / len(indices), and the warning says so."""
    module = _SubsetSampled(list(range(12)))
    strategy = DPStrategy(noise_multiplier=1.0, seed=0)
    with pytest.warns(UserWarning, match=r"SubsetRandomSampler.*over its 12 indices"):
        _trainer(strategy, max_epochs=3).fit(module)
    assert strategy.sample_rate == pytest.approx(4 / 12)
    assert strategy.num_samples == 12
    assert _rows_seen(module) <= set(range(12))
    assert strategy.epsilon() == pytest.approx(epsilon_for([(1.0, 4 / 12, strategy.steps)], 1e-5))


@pytest.mark.parametrize(
    "make",
    [
        lambda data: DataLoader(data, batch_size=4, sampler=SubsetRandomSampler([0, 1, 2, 2, 3, 4])),
        lambda data: DataLoader(Subset(data, [0, 1, 2, 3, 3, 3]), batch_size=4),
        lambda data: DataLoader(ConcatDataset([data, data]), batch_size=4),  # "oversampling"
        lambda data: DataLoader(Subset(ConcatDataset([data, Subset(data, [5])]), range(25)), batch_size=4),
    ],
    ids=["subset_sampler", "subset", "concat", "nested"],
)
def test_training_data_that_repeats_an_example_is_refused(make):
    """An example that appears twice in the training set is drawn twice per step and contributes up to
    2C: the guarantee would hold for neither copy. Repeated indices or datasets are refused by name."""

    class Repeats(TinyModule):
        def train_dataloader(self):
            return make(self.dataset)

    with pytest.raises(ValueError, match=r"appears more than once|more than once in the training"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(Repeats())


def test_a_random_sampler_with_replacement_or_its_own_length_is_named_when_replaced():
    """`RandomSampler(replacement=True, num_samples=...)` asks for another sampling and epoch length than
    Poisson sampling gives; it was replaced silently, as the default sampler is."""

    class Drawn(TinyModule):
        def train_dataloader(self):
            sampler = RandomSampler(self.dataset, replacement=True, num_samples=48)
            return DataLoader(self.dataset, batch_size=4, sampler=sampler)

    with pytest.warns(UserWarning, match=r"sampler RandomSampler \(with `replacement` or `num_samples`\) is replaced"):
        _trainer(DPStrategy(noise_multiplier=1.0)).fit(Drawn())


# ------------------------------------------------------------------ gradients taken inside training_step
_EPS_ADV = 0.3


class _Adversarial(TinyModule):
    """FGSM adversarial training: each input moves along the sign of its own loss gradient.

    ``inner`` says what the inner gradient is taken with respect to: the inputs (``"inputs"``), the inputs
    inside :func:`input_gradients` (``"context"``), or the parameters, whose batch gradient then moves the
    weights the loss is taken at (``"parameters"``, a MAML-like inner step that mixes the samples).
    ``from_step`` delays the inner gradient, past the step on which the strategy checks its sums.
    """

    def __init__(self, inner: str, from_step: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner, self.from_step = inner, from_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx < self.from_step:
            return super().training_step(batch, batch_idx)
        if self.inner == "parameters":
            params = dict(self.named_parameters())
            grads = torch.autograd.grad(F.cross_entropy(self(x), y), list(params.values()))
            moved = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads, strict=True)}
            return F.cross_entropy(torch.func.functional_call(self, moved, (x,)), y)
        context = input_gradients(self) if self.inner == "context" else contextlib.nullcontext()
        with context:
            xr = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(F.cross_entropy(self(xr), y, reduction="sum"), xr)
        return F.cross_entropy(self((x + _EPS_ADV * gx.sign()).detach()), y)


def _adversarial_reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict:
    """Σ_i clip(g_i) of the FGSM loss, each g_i from torch.func on sample i alone (its adversarial input fixed)."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss_one(p, xi, yi):
        xi, yi = xi[None], yi[None]
        gx = torch.func.grad(lambda z: F.cross_entropy(torch.func.functional_call(module, p, (z,)), yi))(xi)
        return F.cross_entropy(torch.func.functional_call(module, p, ((xi + _EPS_ADV * gx.sign()).detach(),)), yi)

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.reshape(len(x), -1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in per_sample.items()}


@CLIPPING
@pytest.mark.parametrize(("inner", "from_step"), [("inputs", 0), ("inputs", 2), ("parameters", 2)])
def test_a_gradient_taken_inside_training_step_is_refused_at_any_step(clipping, inner, from_step):
    """The hooks recorded the backward pass of a `torch.autograd.grad` call inside `training_step` as if it
    were the step's: its gradients were added to the per-sample gradients. On the first step the sum check
    refused this, speaking of parameters used outside their module; on a later step nothing did, and a
    gradient of the batch loss with respect to the parameters, used to move the weights the loss is taken
    at, mixed every sample into every other's gradient. Any backward pass outside the step's own is now
    refused by what it is, on every step, before the optimizer moves anything."""
    module = _Adversarial(inner, from_step=from_step, batch_size=6)
    strategy = DPStrategy(noise_multiplier=1.0, clipping=clipping)
    trainer = _trainer(strategy, max_steps=4)
    with pytest.raises(RuntimeError, match=r"a backward pass ran inside `training_step`.*input_gradients"):
        trainer.fit(module)
    assert trainer.global_step == from_step


@CLIPPING
@pytest.mark.parametrize("physical_batch_size", [None, 5])
def test_adversarial_examples_from_input_gradients_train_on_each_samples_own_gradient(clipping, physical_batch_size):
    """σ = 0, q = 1: FGSM inputs computed inside `input_gradients` give the update Σ_i clip(g_i)/n, with
    g_i the gradient of sample i's loss at its own adversarial input (torch.func on that sample alone)."""
    L.seed_everything(0)
    module = _Adversarial("context", batch_size=24)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    expected = _adversarial_reference(module, x, y, clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(
            noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping, physical_batch_size=physical_batch_size
        )
    _trainer(strategy, max_steps=1).fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / 24, atol=1e-6, rtol=1e-4, msg=name)


def test_input_gradients_hide_the_parameters():
    """Inside `input_gradients` no gradient with respect to a parameter can be taken, through the module's
    attributes or through references kept from before; outside it the parameters are the module's again."""
    module = TinyModule()
    kept = list(module.parameters())
    x = torch.randn(4, 6, requires_grad=True)
    with input_gradients(module):
        assert not any(p.requires_grad for p in module.parameters())
        with pytest.raises(RuntimeError):
            torch.autograd.grad(module(x).sum(), kept)
        (gx,) = torch.autograd.grad(module(x).sum(), x)
    assert gx.shape == x.shape
    assert [id(p) for p in module.parameters()] == [id(p) for p in kept]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in module.parameters())


class _LossInsideTheContext(TinyModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        with input_gradients(self):
            return F.cross_entropy(self(x), y)


def test_a_loss_computed_inside_input_gradients_is_refused_saying_why():
    """A loss that depends on no trainable parameter (here taken inside `input_gradients`) failed in
    autograd with "element 0 of tensors does not require grad"; the refusal now names the causes."""
    with pytest.raises(RuntimeError, match=r"does not depend on any trainable parameter.*input_gradients"):
        _trainer(DPStrategy(noise_multiplier=1.0), max_steps=1).fit(_LossInsideTheContext(batch_size=6))
