"""Clipping engines (issue 10): ghost norms + book-keeping against the torch.func reference, layer by layer.

For every layer type and path, the per-sample squared norms and the clipped sums (signed, and the
absolute sums SPARTA's scoring takes) must equal those of per-sample gradients from
``vmap(grad(functional_call))`` to 1e-5 relative.
"""

from __future__ import annotations

import typing

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_sparta.sparse  # noqa: F401  (registers the sparse layers' grad samplers)
from lightning_sparta.privacy import clipping
from lightning_sparta.privacy.clipping import GhostClipping, create_clipping_engine
from lightning_sparta.privacy.per_sample import PerSampleGradients
from lightning_sparta.sparse.layers import RowSparseConv2d, RowSparseLinear
from test_per_sample import std_conv

MODES = ("per_sample", "ghost", "auto")


class _Loss(nn.Module):
    """A fixed non-linear readout, so that output gradients differ per position and per sample."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y.flatten(1)
        weights = torch.linspace(-1.0, 2.0, y.shape[1], dtype=y.dtype, device=y.device)
        return (torch.sin(3 * y) * weights).sum(1) + 0.1 * y.square().sum(1)


class _Twice(nn.Module):
    """Calls the same Linear twice in one forward pass (its per-sample gradient sums both calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class _Attention(nn.Module):
    """nn.MultiheadAttention as models call it: self-attention, masks, causal, or separate key/value inputs."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        tokens = x.shape[1]
        if self.how == "cross":
            memory = torch.tanh(x.flip(1))
            return self.attn(x, memory, memory)[0]
        if self.how == "masks":
            padding = x[..., 0] > 0.8  # each sample's own tokens to ignore (from its data, not its index)
            padding[:, 0] = False
            bias = torch.linspace(-1, 1, tokens * tokens, dtype=x.dtype, device=x.device).view(tokens, tokens)
            return self.attn(x, x, x, key_padding_mask=padding, attn_mask=bias)[0]
        if self.how == "causal":
            mask = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
            return self.attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return self.attn(x, x, x)[0]  # need_weights=True by default: the explicit softmax path


def _conv(*args, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(*args, **kwargs)


def _row_sparse_linear():
    return RowSparseLinear.from_dense(nn.Linear(7, 6), torch.tensor([4, 1]))


def _row_sparse_conv(groups: int = 1, stride: int = 1):
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups)
    return RowSparseConv2d.from_dense(conv, torch.tensor([5, 0, 2]))


# (name, layer factory, input factory); inputs are float64 except the Embedding's indices
CASES = [
    ("linear-2d", lambda: nn.Linear(7, 5), lambda g: torch.randn(6, 7, generator=g)),
    ("linear-3d", lambda: nn.Linear(7, 5), lambda g: torch.randn(6, 4, 7, generator=g)),
    ("linear-4d-no-bias", lambda: nn.Linear(7, 5, bias=False), lambda g: torch.randn(6, 2, 3, 7, generator=g)),
    ("linear-called-twice", _Twice, lambda g: torch.randn(6, 3, 5, generator=g)),
    ("conv", lambda: _conv(3, 4, 3, padding=1), lambda g: torch.randn(5, 3, 6, 6, generator=g)),
    (
        "conv-strided-dilated",
        lambda: _conv(3, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
        lambda g: torch.randn(5, 3, 9, 7, generator=g),
    ),
    ("conv-grouped", lambda: _conv(4, 6, 3, groups=2, padding="same"), lambda g: torch.randn(5, 4, 5, 5, generator=g)),
    ("conv-depthwise", lambda: _conv(4, 4, 3, groups=4, bias=False), lambda g: torch.randn(5, 4, 6, 6, generator=g)),
    ("conv2d-same", lambda: Conv2dSame(3, 4, 3, stride=2), lambda g: torch.randn(5, 3, 7, 7, generator=g)),
    # T >= GROUPED_CONV_MIN_T: materialised as one convolution with the samples as groups
    ("conv-many-positions", lambda: _conv(3, 4, 3, padding=1), lambda g: torch.randn(5, 3, 9, 9, generator=g)),
    (
        "conv-depthwise-many-positions",
        lambda: _conv(4, 4, 3, groups=4, padding=1),
        lambda g: torch.randn(5, 4, 10, 10, generator=g),
    ),
    ("conv-one-position", lambda: _conv(3, 4, 3), lambda g: torch.randn(5, 3, 3, 3, generator=g)),
    ("std-conv", lambda: std_conv("StdConv2d", 3, 4, 3, padding=1), lambda g: torch.randn(5, 3, 6, 6, generator=g)),
    (
        "scaled-std-conv-grouped",
        lambda: std_conv("ScaledStdConv2d", 4, 6, 3, groups=2),
        lambda g: torch.randn(5, 4, 5, 5, generator=g),
    ),
    (
        "std-conv-same-strided",
        lambda: std_conv("StdConv2dSame", 3, 4, 3, stride=2),
        lambda g: torch.randn(5, 3, 7, 7, generator=g),
    ),
    (
        "scaled-std-conv-same-many-positions",
        lambda: std_conv("ScaledStdConv2dSame", 3, 4, 3),
        lambda g: torch.randn(5, 3, 9, 9, generator=g),
    ),
    (
        "scaled-std-conv-one-position",
        lambda: std_conv("ScaledStdConv2d", 3, 4, 3, padding=0),
        lambda g: torch.randn(5, 3, 3, 3, generator=g),
    ),
    ("row-sparse-linear", _row_sparse_linear, lambda g: torch.randn(6, 7, generator=g)),
    ("row-sparse-linear-3d", _row_sparse_linear, lambda g: torch.randn(6, 3, 7, generator=g)),
    ("row-sparse-conv", _row_sparse_conv, lambda g: torch.randn(5, 4, 6, 6, generator=g)),
    (
        "row-sparse-conv-grouped-strided",
        lambda: _row_sparse_conv(groups=2, stride=2),
        lambda g: torch.randn(5, 4, 7, 7, generator=g),
    ),
    ("row-sparse-conv-many-positions", _row_sparse_conv, lambda g: torch.randn(5, 4, 9, 9, generator=g)),
    (
        "row-sparse-conv-grouped-many-positions",
        lambda: _row_sparse_conv(groups=2),
        lambda g: torch.randn(5, 4, 8, 8, generator=g),
    ),
    (
        "norms",
        lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4)),
        lambda g: torch.randn(6, 6, generator=g),
    ),
    (
        "embedding",
        lambda: nn.Embedding(9, 4, padding_idx=2),
        lambda g: torch.randint(0, 9, (6, 5), generator=g),
    ),
    ("attention-self", lambda: _Attention("self"), lambda g: torch.randn(5, 4, 6, generator=g)),
    ("attention-masks", lambda: _Attention("masks"), lambda g: torch.randn(5, 4, 6, generator=g)),
    ("attention-causal", lambda: _Attention("causal"), lambda g: torch.randn(5, 4, 6, generator=g)),
    ("attention-cross", lambda: _Attention("cross"), lambda g: torch.randn(5, 4, 6, generator=g)),
    ("conv1d-falls-back", lambda: nn.Conv1d(3, 4, 3, padding=1), lambda g: torch.randn(5, 3, 6, generator=g)),
]


def _reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p, xi):
        return model[1](functional_call(model[0], {k.removeprefix("0."): v for k, v in p.items()}, (xi[None],)))[0]

    return vmap(grad(loss_one), in_dims=(None, 0))(params, x)


def _run(model: nn.Module, x: torch.Tensor, mode: str, clip_quantile: float = 0.5):
    hooks = PerSampleGradients()
    engine = create_clipping_engine(mode, hooks)
    engine.attach(model)
    # a mean-reduced loss, as DPStrategy backpropagates by default: per-sample gradients are the loss
    # scale times what reaches the hooks (the ghost engine applies it to norms and factors)
    hooks.loss_scale = 1.0 if mode == "ghost" else float(len(x))
    with hooks.capturing():
        (model[1](model[0](x)).sum() / hooks.loss_scale).backward()
    engine.check_batch_dimension(len(x))
    norms2 = engine.squared_norms()
    clip = norms2.sqrt().quantile(clip_quantile)
    factors = (clip / (norms2.sqrt() + 1e-6)).clamp(max=1.0)
    signed, absolute, unclipped = {}, {}, engine.unclipped_sums()
    engine.accumulate(signed, factors)
    params = list(engine.parameters)
    # absolute sums last: the materialising engine takes |g_i| in place
    engine.accumulate(absolute, factors, absolute=params)
    names = dict(hooks.parameter_names)
    paths = hooks.paths()
    engine.clear()
    return (
        norms2,
        factors,
        {names[p]: v for p, v in signed.items()},
        {names[p]: v for p, v in absolute.items()},
        {names[p]: v for p, v in unclipped.items()},
        paths,
    )


def _two_sample_chunks(batch: int, per_sample: int, limit: int | None = None):
    return ((lo, min(batch, lo + 2)) for lo in range(0, batch, 2))


@pytest.mark.parametrize("mode", [*MODES, "auto-small-chunks", "auto-uneven-chunks"])
@pytest.mark.parametrize(("name", "layer", "inputs"), CASES, ids=[c[0] for c in CASES])
def test_norms_and_clipped_sums_equal_torch_func(name, layer, inputs, mode, monkeypatch):
    if mode == "auto-small-chunks":  # chunked loops sample by sample, every conv as a grouped conv, nothing kept
        monkeypatch.setattr(clipping, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(clipping, "CACHE_ELEMENTS", 1)
        monkeypatch.setattr(clipping, "KEEP_ELEMENTS", 0)  # materialised norms dropped, sums by book-keeping
        monkeypatch.setattr(clipping, "KEEP_GROUPED_ELEMENTS", 0)
        monkeypatch.setattr(clipping, "GROUPED_CONV_MIN_T", 1)
        mode = "auto"
    if mode == "auto-uneven-chunks":  # chunks of two samples, the last one shorter on odd batches: the
        monkeypatch.setattr(clipping, "_chunks", _two_sample_chunks)  # reused buffer is sliced
        monkeypatch.setattr(clipping, "KEEP_ELEMENTS", 0)
        monkeypatch.setattr(clipping, "KEEP_GROUPED_ELEMENTS", 0)
        mode = "auto"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(layer(), _Loss()).double()
    x = inputs(g)
    x = x.double() if x.is_floating_point() else x
    if name == "embedding":
        x[:, 0] = 2  # padding positions get no gradient
        x[:, 1] = x[:, 2]  # repeated indices within a sample
    reference = _reference(model, x)
    norms2, factors, signed, absolute, unclipped, paths = _run(model, x, mode)
    factors = factors.double()
    expected = torch.stack([g.flatten(1).square().sum(1) for g in reference.values()]).sum(0)
    torch.testing.assert_close(norms2.double(), expected, rtol=1e-5, atol=0)
    assert (factors < 1).any()
    assert (factors == 1).any()
    for key, g in reference.items():
        name_ = key
        torch.testing.assert_close(
            signed[name_].double(), torch.einsum("i,i...->...", factors, g), rtol=1e-5, atol=1e-12
        )
        torch.testing.assert_close(
            absolute[name_].double(), torch.einsum("i,i...->...", factors, g.abs()), rtol=1e-5, atol=1e-12
        )
        torch.testing.assert_close(unclipped[name_].double(), g.sum(0), rtol=1e-5, atol=1e-12)
    kinds = {p.path for p in paths}
    if mode == "per_sample" or name in ("norms", "conv1d-falls-back"):
        assert "ghost" not in kinds or name == "norms"
    else:
        assert "ghost" in kinds
    if name == "conv1d-falls-back":
        assert kinds == {"grad_sampler"}


@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_ghost_engine_forms_no_per_sample_weight_gradient(mode):
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)), _Loss())
    hooks = PerSampleGradients()
    engine = create_clipping_engine(mode, hooks)
    engine.attach(model)
    with hooks.capturing():
        model[1](model[0](torch.randn(5, 4))).sum().backward()
    engine.squared_norms()
    inner = model[0]
    assert getattr(inner[0].weight, "grad_sample", None) is None
    assert getattr(inner[2].weight, "grad_sample", None) is None
    assert inner[1].weight.grad_sample.shape == (5, 8)  # a norm layer keeps its cheap per-sample gradient
    table = hooks.summary()
    assert "ghost norm (T=1" in table, table
    assert "per-sample" in table, table


def test_auto_picks_the_cheaper_norm_from_the_shapes():
    """Mixed ghost: a conv with many positions and few channels materialises, a Linear on T=1 goes ghost."""
    conv = nn.Conv2d(2, 2, 3, padding=1)  # T = 64 positions, d_in·d_out = 18·2
    head = nn.Linear(128, 3)
    model = nn.Sequential(nn.Sequential(conv, nn.Flatten(), head), _Loss())
    hooks = PerSampleGradients()
    engine = GhostClipping(hooks, mixed=True)
    engine.attach(model)
    with hooks.capturing():
        model[1](model[0](torch.randn(4, 2, 8, 8))).sum().backward()
    engine.squared_norms()
    rows = {p.module: p.clipping for p in hooks.paths()}
    assert "weight: materialised norm (T=64" in rows["0.0"], rows
    assert "weight: ghost norm (T=1" in rows["0.2"], rows


def test_folded_batch_is_refused_on_the_ghost_path():
    model = nn.Sequential(nn.Linear(4, 3), _Loss())
    hooks = PerSampleGradients()
    engine = create_clipping_engine("ghost", hooks)
    engine.attach(model)
    with hooks.capturing():
        model[1](model[0](torch.randn(6, 4))).sum().backward()
    with pytest.raises(ValueError, match=r"module `0` produced per-sample gradients for 6 samples"):
        engine.check_batch_dimension(3)


# ------------------------------------------------------------------------------ whole models in DPStrategy
def _tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=3)


def _tiny_resnet_gn() -> nn.Module:
    """ResNet-18's structure (BasicBlocks, strided downsampling) with GroupNorm, small widths, in-place ops."""
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        num_classes=3,
        stem_width=8,
        channels=(8, 16, 16, 16),
        norm_layer=lambda channels, **_: nn.GroupNorm(4, channels),
        zero_init_last=False,  # every conv gets a gradient from the first step
    )


def _fit(
    model_fn,
    clipping: str,
    scoring: bool = False,
    steps: int = 3,
    physical_batch_size: int | None = None,
    sparta: dict | None = None,
):
    import lightning as L
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sparta import DPStrategy

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 3, (24,), generator=g))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model_fn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def get_classifier(self):
            return self.model.get_classifier()

        def train_dataloader(self):
            return DataLoader(data, batch_size=12)

    module = Module()
    scored = {n: p for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1}

    class Score(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.strategy.begin_scoring(scored)

    class Paths(L.Callback):
        paths: typing.ClassVar[set] = set()

        def on_train_batch_end(self, trainer, *args):
            Paths.paths = {(p.type, p.path) for p in trainer.strategy.engine.paths()}

    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(
            noise_multiplier=0.0,
            max_grad_norm=0.1,
            seed=3,
            clipping=clipping,
            physical_batch_size=physical_batch_size,
        )
    callbacks = [Paths(), Score()] if scoring else [Paths()]
    if sparta is not None:
        from lightning_sparta import SpartaMaskCallback

        callbacks.append(SpartaMaskCallback(**sparta))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module)
    paths = Paths.paths  # of the last step (the engine detaches at teardown)
    result = strategy.end_scoring() if scoring else {k: v.detach().clone() for k, v in module.state_dict().items()}
    if sparta is not None:
        result = (result, callbacks[-1].mask)
    return result, paths


@pytest.mark.parametrize("model_fn", [_tiny_vit, _tiny_resnet_gn], ids=["vit", "resnet-gn"])
@pytest.mark.parametrize("clipping", ["ghost", "auto"])
def test_whole_model_steps_match_the_per_sample_engine(model_fn, clipping):
    """σ = 0, three steps (the first one checks sums with autograd, the next ones skip its weight gradients)."""
    expected, _ = _fit(model_fn, "per_sample")
    found, _ = _fit(model_fn, clipping, physical_batch_size=5)
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_fn", [_tiny_vit, _tiny_resnet_gn], ids=["vit", "resnet-gn"])
def test_scoring_sums_match_the_per_sample_engine(model_fn):
    """SPARTA's Σ_i c_i |g_i|: materialised in chunks on the ghost engine, with clip factors from ghost norms."""
    expected, _ = _fit(model_fn, "per_sample", scoring=True, steps=2)
    found, _ = _fit(model_fn, "auto", scoring=True, steps=2)
    assert expected.keys() == found.keys()
    for name, value in expected.items():
        assert value.abs().sum() > 0, name
        torch.testing.assert_close(found[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_fn", [_tiny_vit, _tiny_resnet_gn], ids=["vit", "resnet-gn"])
def test_sparta_run_matches_the_per_sample_engine(model_fn):
    """Warm-up, scoring epoch, sparse phase on RowSparseLinear/RowSparseConv2d: same mask, same weights."""
    sparta = {"mask_epoch": 1, "trainable_fraction": 0.25}
    (expected, expected_mask), _ = _fit(model_fn, "per_sample", steps=6, sparta=sparta)
    (found, found_mask), paths = _fit(model_fn, "auto", steps=6, sparta=sparta)
    assert {kind for kind, path in paths if path == "ghost"} >= {
        "RowSparseLinear" if model_fn is _tiny_vit else "RowSparseConv2d"
    }
    assert expected_mask.keys() == found_mask.keys()
    for name, rows in expected_mask.items():
        assert torch.equal(found_mask[name], rows), name
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("name", "layer", "inputs"),
    [c for c in CASES if c[0].startswith("row-sparse")],
    ids=[c[0] for c in CASES if c[0].startswith("row-sparse")],
)
def test_opacus_ghost_clipping_uses_the_row_sparse_norm_samplers(name, layer, inputs):
    """Opacus' own ghost clipping (norm samplers by exact type) gets the row-sparse layers' norms right."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[type(layer())].__name__ == "opacus_norm_sampler"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(layer(), _Loss()).double()
    x = inputs(g).double()
    reference = _reference(model, x)
    expected = torch.stack([v.flatten(1).square().sum(1) for v in reference.values()]).sum(0).sqrt()
    # strict=False: the row-sparse layers keep the frozen weight and the rows as buffers
    wrapped = GradSampleModuleFastGradientClipping(model[0], loss_reduction="sum", strict=False)
    model[1](wrapped(x)).sum().backward()
    torch.testing.assert_close(wrapped.get_norm_sample(), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("checkpointing", ["timm", "reentrant"])
def test_activation_checkpointing_gives_the_same_norms_and_sums(mode, checkpointing):
    """Blocks recomputed in backward (timm's ``set_grad_checkpointing``, or reentrant checkpoints).

    The recomputation runs every hooked module's forward a second time, inside the backward pass:
    each call must still be counted once, with its own input and output gradient.
    """
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    vit = _tiny_vit()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in vit.named_parameters()}

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(vit, p, (xi[None],)), yi[None])

    reference = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    expected = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()]).norm(dim=0)
    names = {id(p): k for k, p in vit.named_parameters()}  # before the blocks are wrapped

    if checkpointing == "timm":
        vit.set_grad_checkpointing(True)
    else:

        class Checkpointed(nn.Module):
            def __init__(self, blocks: nn.Module) -> None:
                super().__init__()
                self.blocks = blocks

            def forward(self, h):
                for block in self.blocks:
                    h = checkpoint(block, h, use_reentrant=True)
                return h

        vit.blocks = Checkpointed(vit.blocks)
    hooks = PerSampleGradients()
    engine = create_clipping_engine(mode, hooks)
    engine.attach(vit)
    with hooks.capturing():
        nn.functional.cross_entropy(vit(x), y, reduction="sum").backward()
    engine.check_batch_dimension(5)
    norms = engine.squared_norms().sqrt()
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-6)
    sums = {}
    engine.accumulate(sums, torch.ones(5))
    for p, value in sums.items():
        name = names[id(p)]
        torch.testing.assert_close(value, reference[name].sum(0), rtol=1e-4, atol=1e-5, msg=name)
    assert len(sums) == len(reference)
