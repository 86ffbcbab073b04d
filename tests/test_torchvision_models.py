"""torchvision's ImageNet architectures (and torch.nn's sequence layers) under DPStrategy: which train,
on which paths, and exactly.

torchvision builds some layers differently from timm: ``nn.MultiheadAttention`` (ViT) and Swin's
``shifted_window_attention`` take their projections' weights as arguments instead of calling them,
ConvNeXt's ``CNBlock`` owns its layer scale and applies stochastic depth after it, ViT keeps its class
token on the root module and its position embedding on the encoder. References are per-sample
gradients from ``torch.func`` on the same model in ``eval()``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.models.vision_transformer import VisionTransformer

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.sparse import sparse_modules
from test_real_models import (
    TOL,
    Classifier,
    _median_clipped_mean,
    _per_sample_reference,
    _randomise_batchnorm,
    assert_one_step_equals_clipped_sum,
)
from test_strategy import _trainer

CLASSES = 5


def _vit() -> nn.Module:
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=CLASSES
    )
    nn.init.normal_(model.heads.head.weight, std=0.3)  # zero-initialised: every other gradient would be 0
    return model


def _swin(v2: bool = False, stochastic_depth: float = 0.0) -> nn.Module:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=[4, 4],
        stochastic_depth_prob=stochastic_depth,
        num_classes=CLASSES,
        **extra,
    )


def _convnext(stochastic_depth: float = 0.0) -> nn.Module:
    setting = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=stochastic_depth, layer_scale=0.5, num_classes=CLASSES)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    builders = {"vit": _vit, "swin": _swin, "swin_v2": lambda: _swin(v2=True), "convnext": _convnext}
    if name in builders:
        return builders[name]()
    model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
    _randomise_batchnorm(model)
    return model


def _data(n: int, side: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, side, side, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


class _Paths(L.Callback):
    def __init__(self):
        self.paths: dict[str, str] = {}

    def on_train_batch_end(self, trainer, *args):
        self.paths = {p.module: p.path for p in trainer.strategy.engine.paths()}


def check_one_step_equals_clipped_sum(name: str, accelerator: str = "cpu") -> None:
    assert_one_step_equals_clipped_sum(_model(name), _data(4), accelerator=accelerator)


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2", "convnext"])
def test_one_step_equals_clipped_sum(name):
    """Every parameter: ViT's in/out projections, Swin's window attention and relative-position tables,
    ConvNeXt's layer scale."""
    check_one_step_equals_clipped_sum(name)


# one private step each at 32 px, with the set of paths the model's layers take
ZOO = {
    "resnet18": {"ghost", "grad_sampler"},
    "wide_resnet50_2": {"ghost", "grad_sampler"},
    "resnext50_32x4d": {"ghost", "grad_sampler"},
    "efficientnet_b0": {"ghost", "grad_sampler"},
    "mobilenet_v3_small": {"ghost", "grad_sampler"},
    "regnet_y_400mf": {"ghost", "grad_sampler"},
    "densenet121": {"ghost", "grad_sampler"},
    "shufflenet_v2_x0_5": {"ghost", "grad_sampler"},
    "squeezenet1_0": {"ghost"},
    "convnext_sd": {"ghost", "grad_sampler"},  # layer scale from two taps, with stochastic depth
    "vit": {"broadcast", "ghost", "grad_sampler"},  # nn.MultiheadAttention: its own ghost form
    "swin_sd": {"functorch", "ghost", "grad_sampler"},  # functorch: the window attention
}


@pytest.mark.parametrize("name", list(ZOO))
def test_trains(name):
    if name.endswith("_sd"):  # the usual fine-tuning recipe: stochastic depth on
        torch.manual_seed(0)
        model = _convnext(0.1) if name == "convnext_sd" else _swin(stochastic_depth=0.1)
    else:
        model = _model(name)
    paths = _Paths()
    strategy = DPStrategy(noise_multiplier=1.0, seed=0)
    _trainer(strategy, max_steps=1, callbacks=[paths]).fit(Classifier(model, _data(4), batch_size=4, lr=0.01))
    assert strategy.steps == 1
    assert set(paths.paths.values()) == ZOO[name]


def test_multihead_attention_paths():
    """The attention takes its ghost form (its out projection with it, no path of its own), and the class
    token and position embedding are broadcast instead of replaying the whole model for them; the
    per-sample engine replays the attention instead."""
    for clipping, path in (("auto", "ghost"), ("per_sample", "functorch")):
        paths = _Paths()
        module = Classifier(_model("vit"), _data(4), batch_size=4, lr=0.01)
        strategy = DPStrategy(noise_multiplier=1.0, seed=0, clipping=clipping)
        _trainer(strategy, max_steps=1, callbacks=[paths]).fit(module)
        attention = "model.encoder.layers.encoder_layer_0.self_attention"
        assert paths.paths[attention] == path
        assert f"{attention}.out_proj" not in paths.paths
        assert paths.paths["model"] == paths.paths["model.encoder"] == "broadcast"


class _Sequence(L.LightningModule):
    """A sequence layer (attention or recurrent) on [B, T, D] tokens, in either layout, then a head."""

    def __init__(self, kind: str, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        if kind == "MultiheadAttention":
            self.layer = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        else:
            self.layer = getattr(nn, kind)(8, 8, batch_first=batch_first)
        self.head = nn.Linear(8, CLASSES)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(4, 4, 8, generator=g), torch.randint(0, CLASSES, (4,), generator=g))

    def forward(self, x):
        tokens = x if self.batch_first else x.transpose(0, 1)  # [T, B, D] with T == B: shapes cannot tell
        args = (tokens, tokens, tokens) if isinstance(self.layer, nn.MultiheadAttention) else (tokens,)
        out = self.layer(*args)[0]
        return self.head(out.mean(1 if self.batch_first else 0))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=4)


@pytest.mark.parametrize("kind", ["MultiheadAttention", "LSTM", "GRU"])
def test_sequence_first_layers_are_refused_naming_them(kind):
    """PyTorch's default [tokens, batch, features] layout: per-sample gradients along the first dimension
    would be per token, and with as many tokens as samples no shape check could tell."""
    module = _Sequence(kind, batch_first=False)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=rf"`layer` \({kind}\).*batch_first=True"):
        _trainer(DPStrategy(noise_multiplier=1.0, seed=0), max_steps=1).fit(module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_lstm_is_replayed_per_sample_exactly():
    """nn.LSTM (batch_first=True) has no grad sampler: the replay runs it per sample. σ = 0, q = 1, lr = 1."""
    module = _Sequence("LSTM", batch_first=True)
    x, y = module.data.tensors
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    per_sample = _per_sample_reference(module, x, y)
    clip, expected = _median_clipped_mean(per_sample)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=clip)
    _trainer(strategy, max_steps=1).fit(module)
    for key, param in module.named_parameters():
        torch.testing.assert_close(param.detach(), params[key] - expected[key], **TOL, msg=key)


def test_a_layer_the_replay_cannot_run_is_refused_naming_it():
    """nn.GRU's fused kernel has no per-sample (vmap) rule: a clear refusal, not torch.func's shape error."""
    module = _Sequence("GRU", batch_first=True)
    with pytest.raises(RuntimeError, match=r"replay of `layer` \(GRU\) failed.*Freeze its parameters"):
        _trainer(DPStrategy(noise_multiplier=1.0, seed=0), max_steps=1).fit(module)


class _RowsAtSwap(L.Callback):
    """The selected rows of every sparse layer right after the swap, to compare with the end of the run."""

    def __init__(self):
        self.rows: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            self.rows = {n: m.weight_rows.detach().clone() for n, m in sparse_modules(pl_module).items()}


@pytest.mark.parametrize(("name", "head", "functional"), [("vit", "heads.head", "out_proj"), ("swin", "head", "qkv")])
def test_sparta_finds_the_head_and_leaves_layers_used_as_arguments_dense(name, head, functional):
    """torchvision models have no `get_classifier()`: the head is their last Linear layer. A layer whose weight
    the parent passes to a function cannot be row-sparse (the sparse layer's merged weight carries no gradient
    to its rows: Swin's selected qkv/proj rows got pure noise before), so it stays dense, frozen, unscored;
    every row that is swapped in trains. σ = 0 so that a row without gradient does not move at all."""
    torch.manual_seed(0)
    model = _model(name)
    module = Classifier(model, _data(16), batch_size=4, lr=0.1)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=1.0)
    callback, rows = SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.3), _RowsAtSwap()
    with pytest.warns(UserWarning, match=rf"not called by their parent.*{functional}"):
        _trainer(strategy, max_epochs=3, callbacks=[callback, rows]).fit(module)
    assert callback._head_ids == {id(m) for m in model.get_submodule(head).modules()}
    sparse = sparse_modules(module)
    assert sparse
    assert not any(n.endswith(functional) for n in sparse)
    for layer_name, layer in sparse.items():
        assert not torch.equal(layer.weight_rows.detach(), rows.rows[layer_name]), layer_name
