"""ImageNet-style models under DPStrategy: BatchNorm with frozen statistics, in-place ops, timm norms.

timm's ``resnet18`` has BatchNorm, ``ReLU(inplace=True)`` and residual ``x += shortcut``: the three
things that stopped such models before. Models are randomly initialised and images tiny (16x16), so
the tests run on CPU in seconds. References are per-sample gradients from ``torch.func``
(``functional_call`` + ``vmap(grad)``) on the same model in ``eval()``, where BatchNorm normalises
with its running statistics, which is what frozen statistics mean.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, GroupNorm, GroupNorm1, GroupNormAct, LayerNormAct2d
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.privacy.batchnorm import FROZEN_STATS_NOTE, freeze_batchnorm, is_frozen
from lightning_sparta.privacy.per_sample import PerSampleGradients
from lightning_sparta.privacy.validation import IncompatibleModelError, incompatible_layers, prepare_model
from test_strategy import _trainer

N, SIDE, CLASSES = 6, 16, 5
TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    """Small tensors: fewer threads avoid OpenMP contention on a busy machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def _randomise_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial running statistics and affine parameters (timm zero-inits the last BN of each block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                m.num_batches_tracked.fill_(7)
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))


def _resnet18(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=CLASSES, pretrained=False, **kwargs)
    _randomise_batchnorm(model)
    return model


def _data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, SIDE, SIDE, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


class Classifier(L.LightningModule):
    """Wraps a timm model; plain SGD (lr = 1, no momentum) so one step reveals the gradient."""

    def __init__(self, model: nn.Module, dataset: TensorDataset, batch_size: int, lr: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.dataset, self.batch_size, self.lr = dataset, batch_size, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)


def _per_sample_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` of the trainable parameters: each sample's own gradient, model in eval()."""
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t))
    reference = copy.deepcopy(model).eval()  # hook-free copy; eval(): BatchNorm uses its running statistics
    params = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(reference, p, (xi[None],)), yi[None])

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def _median_clipped_mean(per_sample: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The clipping norm C at the median per-sample norm (some samples clipped, some not) and Σ_i clip(g_i)/n."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    clip = float(norms.median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return clip, {k: torch.einsum("i,i...->...", factors, g) / len(norms) for k, g in per_sample.items()}


def assert_one_step_equals_clipped_sum(
    model: nn.Module, data: TensorDataset, accelerator: str = "cpu", callbacks: tuple = ()
) -> None:
    """σ = 0, q = 1, SGD lr = 1: one step's update is Σ_i clip(g_i)/n, g_i from torch.func (on the CPU)."""
    x, y = data.tensors
    clip, expected = _median_clipped_mean(_per_sample_reference(model, x, y))
    module = Classifier(model, data, batch_size=len(x))
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=clip)
    _trainer(strategy, max_steps=1, accelerator=accelerator, callbacks=list(callbacks)).fit(module)
    for key, param in module.named_parameters():
        update = before[key] - param.detach().cpu()
        torch.testing.assert_close(update, expected[key.removeprefix("model.")], **TOL, msg=key)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ DPStrategy
def test_resnet18_one_step_equals_clipped_sum():
    """σ = 0, q = 1, SGD lr = 1: the update of a BN + in-place ReLU + `x += shortcut` model is Σ_i clip(g_i)/n."""
    model = _resnet18()
    data = _data()
    x, y = data.tensors
    per_sample = _per_sample_reference(model, x, y)
    clip, expected = _median_clipped_mean(per_sample)

    module = Classifier(model, data, batch_size=N)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=clip)
    _trainer(strategy, max_steps=1).fit(module)

    assert strategy.sample_rate == 1.0
    for name, param in module.named_parameters():
        torch.testing.assert_close(before[name] - param.detach(), expected[name.removeprefix("model.")], **TOL)
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_running_statistics_unchanged_after_training_and_freezing_undone():
    """Several noisy steps: running statistics (num_batches_tracked included) stay bit-identical."""
    model = _resnet18()
    module = Classifier(model, _data(8), batch_size=4, lr=0.1)
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    weights_before = model.bn1.weight.detach().clone()
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    _trainer(strategy, max_epochs=2).fit(module)
    assert strategy.steps == 2 * strategy.steps_per_epoch >= 4
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert not torch.equal(model.bn1.weight, weights_before)  # the affine parameters did train
    # teardown restored ordinary BatchNorm: no hooks left, batch statistics in train mode again
    assert not any(is_frozen(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.train()
    model(torch.randn(2, 3, SIDE, SIDE))
    assert int(model.bn1.num_batches_tracked) == 8


def test_state_dict_keys_unchanged_and_checkpoint_loads():
    model = _resnet18()
    keys = list(model.state_dict())
    frozen = prepare_model(model)
    assert list(model.state_dict()) == keys
    model.load_state_dict(_resnet18().state_dict())  # a "pretrained" checkpoint loads as is
    frozen.remove()


def test_batchnorm_refuse_still_refuses_naming_the_layer():
    module = Classifier(_resnet18(), _data(), batch_size=N)
    strategy = DPStrategy(noise_multiplier=1.0, batchnorm="refuse")
    with pytest.raises(IncompatibleModelError, match=r"model\.bn1 \(BatchNorm2d\).*batchnorm='freeze'"):
        _trainer(strategy, max_steps=1).fit(module)


def test_bad_batchnorm_argument():
    with pytest.raises(ValueError, match="`batchnorm` must be one of"):
        DPStrategy(noise_multiplier=1.0, batchnorm="fix")


def test_batchnorm_without_running_statistics_is_refused_even_when_freezing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    assert incompatible_layers(model, batchnorm="freeze") == {"1": "BatchNorm2d"}
    with pytest.raises(IncompatibleModelError, match=r"track_running_stats.*: 1 \(BatchNorm2d\)"):
        prepare_model(model)


# ------------------------------------------------------------------------------------------ path table
@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_resnet18_paths_closed_form_no_functorch(norm):
    model = _resnet18() if norm == "batchnorm" else _resnet18(norm_layer=GroupNorm)
    frozen = freeze_batchnorm(model)
    engine = PerSampleGradients()
    engine.attach(model)
    paths = engine.paths()
    assert {p.path for p in paths} == {"grad_sampler"}, engine.summary()
    norms = [p for p in paths if p.type in ("BatchNorm2d", "GroupNorm")]
    assert len(norms) == 20  # bn1 + 2 per block x 8 blocks + 3 downsample norms
    expected_note = FROZEN_STATS_NOTE if norm == "batchnorm" else ""
    assert all(p.note == expected_note for p in norms)
    assert all(p.note == "" for p in paths if p not in norms)
    if norm == "batchnorm":
        row = next(line for line in engine.summary().splitlines() if line.startswith("bn1 "))
        assert row.split()[2:5] == ["grad_sampler", "weight,", "bias"]
        assert row.endswith(FROZEN_STATS_NOTE)  # the note column comes last
    # and the per-sample gradients of the GroupNorm model are right despite the in-place ops
    x, y = _data().tensors
    expected = _per_sample_reference(model, x, y)
    engine.loss_scale = N
    model.train()
    with engine.capturing():
        F.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad_sample, expected[name], **TOL)
    frozen.remove()


# ------------------------------------------------------------------------------------------ samplers
class Block(nn.Module):
    """conv → norm, a residual `+= shortcut` on the norm's output, in-place ReLU, a linear head (timm's order).

    A norm with an in-place activation of its own saves that output for backward: its residual is then
    added out of place (as timm's blocks do), the in-place op being the activation inside the norm.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.norm = norm
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        if isinstance(getattr(self.norm, "act", None), nn.ReLU):
            out = out + self.shortcut(x)
        else:
            out += self.shortcut(x)
        return self.head(self.relu(out).mean((2, 3)))


NORMS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "BatchNormAct2d-relu": lambda: BatchNormAct2d(6, act_layer=nn.ReLU, inplace=True),
    "BatchNormAct2d-silu": lambda: BatchNormAct2d(6, act_layer=nn.SiLU),
    "GroupNorm": lambda: GroupNorm(6, num_groups=3),
    "GroupNorm1": lambda: GroupNorm1(6),
    "GroupNormAct": lambda: GroupNormAct(6, num_groups=2, act_layer=nn.ReLU, inplace=True),
    "LayerNormAct2d": lambda: LayerNormAct2d(6, act_layer=nn.GELU),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_layer_per_sample_gradients_match_torch_func(kind):
    torch.manual_seed(0)
    model = Block(NORMS[kind]())
    _randomise_batchnorm(model)
    with torch.no_grad():  # non-trivial affine parameters for the GroupNorm / LayerNorm layers too
        model.norm.weight.add_(0.3 * torch.randn_like(model.norm.weight))
        model.norm.bias.add_(0.2 * torch.randn_like(model.norm.bias))
    x = torch.randn(7, 4, 5, 5)
    y = torch.randint(0, 3, (7,))
    expected = _per_sample_reference(model, x, y)
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    frozen = freeze_batchnorm(model)
    engine = PerSampleGradients()
    engine.attach(model)
    assert {p.module: p.path for p in engine.paths()}["norm"] == "grad_sampler"
    model.train()
    engine.loss_scale = 7
    with engine.capturing():
        F.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad_sample, expected[name], **TOL)
        torch.testing.assert_close(param.grad_sample.sum(0), param.grad * 7, **TOL)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert model.norm.training  # frozen statistics do not touch the mode flags
    frozen.remove()


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 3)])
def test_batchnorm1d_frozen(shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(*shape))  # materialise the lazy layer
    _randomise_batchnorm(model)
    x, y = torch.randn(*shape), torch.randn(7, 2)

    def loss_fn(out, t):
        return (out - t).pow(2).sum()

    expected = _per_sample_reference(model, x, y, loss_fn)
    freeze_batchnorm(model)
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing():
        loss_fn(model.train()(x), y).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad_sample, expected[name], **TOL)


def test_unfrozen_batchnorm_in_training_mode_is_refused_by_its_sampler():
    model = Block(nn.BatchNorm2d(6)).train()
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing(), pytest.raises(RuntimeError, match=r"batch statistics.*freeze_batchnorm"):
        model(torch.randn(3, 4, 5, 5)).sum().backward()


def test_inplace_after_hooked_modules_and_repeated_calls():
    """A layer called twice whose outputs are modified in place: each call pairs with its own gradient."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU6(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.fc(x))
            out = self.fc(h)
            out += x
            return self.act(out).sum(1)

    torch.manual_seed(0)
    model = Twice()
    x, y = torch.randn(5, 4) * 3, torch.randn(5)

    def loss_fn(out, t):
        return (out - t).pow(2).sum()

    expected = _per_sample_reference(model, x, y, loss_fn)
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing():
        loss_fn(model(x), y).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad_sample, expected[name], **TOL)


# ------------------------------------------------------------------------------------------ SPARTA
def test_sparta_keeps_batchnorm_affine_trainable_in_every_phase():
    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.trainable: dict[int, set[str]] = {}

        def on_train_epoch_end(self, trainer, pl_module):
            self.trainable[trainer.current_epoch] = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    model = _resnet18()
    module = Classifier(model, _data(8), batch_size=4, lr=0.05)
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    recorder = Recorder()
    callback = SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.2, head="model.fc")
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    _trainer(strategy, max_epochs=3, callbacks=[callback, recorder]).fit(module)
    bn = {f"{n}.{p}" for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
    for epoch in (0, 2):  # warm-up and sparse phase
        assert bn <= recorder.trainable[epoch], epoch
    for name, buffer in module.named_buffers():
        if name in buffers:  # the sparse layers add their own buffers
            assert torch.equal(buffer, buffers[name]), name


# ------------------------------------------------------------------- other layers with batch statistics
def _evonorm_b_model(kind: str) -> nn.Module:
    """timm's EvoNorm B layers normalise with the batch variance in training mode (a running variance in eval)."""
    from timm.layers import EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dB2

    norm = {"B0": EvoNorm2dB0, "B1": EvoNorm2dB1, "B2": EvoNorm2dB2}[kind](4)
    torch.manual_seed(0)
    with torch.no_grad():
        norm.running_var.copy_(torch.rand(4) * 2 + 0.2)
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES))


@pytest.mark.parametrize("kind", ["B0", "B1", "B2"])
def test_evonorm_batch_variance_is_frozen_like_batchnorm(kind):
    """σ = 0, q = 1, SGD lr = 1: the update is Σ_i clip(g_i)/n of the model in eval(), running variance untouched."""
    model = _evonorm_b_model(kind)
    data = _data()
    x, y = data.tensors
    per_sample = _per_sample_reference(model, x, y)
    clip, expected = _median_clipped_mean(per_sample)

    module = Classifier(model, data, batch_size=N)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    running_var = model[1].running_var.clone()
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=clip)
    _trainer(strategy, max_steps=1).fit(module)
    assert torch.equal(model[1].running_var, running_var)  # no statistic of the private batch is kept
    for name, param in module.named_parameters():
        torch.testing.assert_close(before[name] - param.detach(), expected[name.removeprefix("model.")], **TOL)
    assert incompatible_layers(model, batchnorm="refuse") == {"1": f"EvoNorm2d{kind}"}


def test_convnext_layer_scale_one_step_equals_clipped_sum():
    """timm's ConvNeXt blocks own their layer scale (``gamma``): its per-sample gradient comes from two taps
    (the MLP's output, the gradient at ``drop_path``'s input) while the block's convs, norms and MLP keep
    their own paths. σ = 0, q = 1, SGD lr = 1."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES, ls_init_value=0.5)
    data = _data(4, seed=2)
    x, y = data.tensors
    x = torch.nn.functional.interpolate(x, size=32)
    paths = {}

    class Paths(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            paths.update({(p.module, p.path) for p in trainer.strategy.engine.paths()})

    assert_one_step_equals_clipped_sum(model, TensorDataset(x, y), callbacks=(Paths(),))
    assert paths["model.stages.0.blocks.0"] == "grad_sampler"
    assert paths["model.stages.0.blocks.0.mlp.fc1"] == "ghost"


def test_poolformer_trains_although_float32_rounding_is_large_in_its_last_stage():
    """The first-step sum check must not refuse a correct model whose float32 gradients are ill-conditioned.

    At 64 px the last stage of timm's PoolFormer is 2x2: its token mixer ``pool(x) - x`` nearly cancels,
    and autograd's own float32 gradient of the layer scale is 2.5e-3 off the float64 one.
    """
    torch.manual_seed(0)
    model = timm.create_model("poolformer_s12", pretrained=False, num_classes=CLASSES)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, 64, 64, generator=g), torch.randint(0, CLASSES, (6,), generator=g))
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    _trainer(strategy, max_steps=1).fit(Classifier(model, data, batch_size=6, lr=0.01))
    assert strategy.steps == 1
