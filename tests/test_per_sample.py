"""PerSampleGradients against independent references: torch.func and Opacus' micro-batch method.

The reference per-sample gradient of sample ``i`` is ``grad`` of that sample's own loss, computed by
``torch.func.functional_call`` on the sample alone (batch dimension 1) and vmapped over the batch.
It never looks at the engine's hooks: it is computed before the engine is attached.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from opacus.utils.per_sample_gradients_utils import (
    check_per_sample_gradients_are_correct,
    compute_microbatch_grad_sample,
)
from timm.models.convnext import ConvNeXtBlock
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_sparta.privacy.per_sample import PerSampleGradients, register_broadcast_parameters

try:  # registers grad samplers for timm's LayerNorm subclass and LayerScale
    import lightning_sparta.sparse  # noqa: F401

    _SPARSE_ERROR = None
except ImportError as error:  # pragma: no cover - only while the sparse package is being written
    _SPARSE_ERROR = repr(error)

# Isolated layers whose input does not require grad make PyTorch warn about full backward hooks.
# vmap of timm's fused attention on CPU warns that it has no batching rule (the reference is just slower).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread avoids OpenMP contention on a busy machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


B = 7  # batch size: a size that no feature dimension below shares, so transposed results cannot pass
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-8}}

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> [batch]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).flatten(1).sum(1)


# ------------------------------------------------------------------------------------------ references
def reference_per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss
) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}``: the gradient of each sample's own loss, each sample run alone."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def loss_of_one_sample(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **params}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    return vmap(grad(loss_of_one_sample), in_dims=(None, 0, 0), randomness="error")(trainable, x, y)


def engine_per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss, reduction: str
) -> PerSampleGradients:
    """Attach an engine, run one captured forward/backward pass with the given reduction."""
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing():
        losses = loss_fn(model(x), y)
        loss = losses.sum() if reduction == "sum" else losses.mean()
        engine.loss_scale = 1.0 if reduction == "sum" else float(x.shape[0])
        loss.backward()
    return engine


def assert_per_sample_grads_match(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerSampleLoss, reduction: str
) -> PerSampleGradients:
    """The engine's ``grad_sample`` of every trainable parameter equals the torch.func reference.

    Also: frozen parameters get no ``grad_sample``, and ``grad_sample`` summed over the batch and
    divided by ``loss_scale`` is autograd's ordinary ``.grad``.
    """
    model.train()
    expected = reference_per_sample_grads(model, x, y, loss_fn)
    engine = engine_per_sample_grads(model, x, y, loss_fn, reduction)
    dtype = next(model.parameters()).dtype
    for name, param in model.named_parameters():
        grad_sample = getattr(param, "grad_sample", None)
        if not param.requires_grad:
            assert grad_sample is None, f"frozen parameter {name} got a grad_sample"
            continue
        assert grad_sample is not None, f"{name} has no grad_sample"
        assert grad_sample.shape == (x.shape[0], *param.shape), name
        torch.testing.assert_close(grad_sample, expected[name], **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(grad_sample.sum(0) / engine.loss_scale, param.grad, **TOL[dtype])
    return engine


# ------------------------------------------------------------------------------------------ models
class Scale(nn.Module):
    """Element-wise scaling by its own Parameter: no registered grad sampler (functorch path)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Gated(nn.Module):
    """Owns a Parameter *and* a child Linear: functorch covers the whole subtree."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(dim))
        self.inner = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * torch.sigmoid(self.gate) + x


class SharedTwice(nn.Module):
    """One module (a Linear by default) applied twice in a row in the same forward pass."""

    def __init__(self, scale: nn.Module | None = None) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5) if scale is None else scale
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.tanh(self.shared(x))))


class SharedBranches(nn.Module):
    """One Linear applied to two independent branches that are multiplied together."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(5, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.shared(x)
        b = self.shared(torch.tanh(self.pre(x)))
        return self.head(a * b)


class TokenOnly(nn.Module):
    """Only a declared broadcast parameter (leading dim 1), added to every sample."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.token)


class TokenAndScale(TokenOnly):
    """A broadcast parameter next to a parameter no sampler knows: the replay and the broadcast hook, once each."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class BiasTable(nn.Module):
    """A relative-position-style bias: a trainable table gathered by a constant index buffer, added to
    every sample, scaled by a shared (non-batch) tensor passed as a keyword argument."""

    def __init__(self, positions: int = 4) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * positions - 1))
        rel = torch.arange(positions)[:, None] - torch.arange(positions)[None, :] + positions - 1
        self.register_buffer("index", rel.flatten())
        self.positions = positions

    def forward(self, scores: torch.Tensor, temperature: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.table[self.index].view(self.positions, self.positions)
        return (scores + bias) / (temperature if temperature is not None else 1.0)


class AttentionWithTable(nn.Module):
    """Owns a parameter (``gain``) next to submodules with their own paths, and calls ``BiasTable`` with a kwarg."""

    def __init__(self, dim: int = 5, positions: int = 4) -> None:
        super().__init__()
        self.qk = nn.Linear(dim, 2 * dim)
        self.bias = BiasTable(positions)
        self.gain = nn.Parameter(torch.randn(dim))
        self.register_buffer("temperature", torch.tensor([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, positions, dim]
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = self.bias(q @ k.transpose(1, 2), temperature=self.temperature)
        return scores.softmax(-1) @ (x * self.gain)


def std_conv(kind: str, *args, **kwargs) -> nn.Module:
    """timm's weight-standardised conv ``kind``, with a trained-looking gain (not all ones)."""
    conv = getattr(timm.layers, kind)(*args, **kwargs)
    if hasattr(conv, "gain"):
        with torch.no_grad():
            conv.gain.mul_(1 + 0.3 * torch.randn_like(conv.gain))
    return conv


def _tiny_timm_case(name: str, side: int = 16, **kwargs):
    """A one-block timm ViT-family model ``name`` on ``side``-pixel images, 3 classes."""
    config = {"img_size": side, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "num_classes": 3}
    return (
        lambda: timm.create_model(name, pretrained=False, **{**config, **kwargs}),
        _normal(3, side, side),
        _classes(3),
        cross_entropy,
    )


def _convnext_block_case(**kwargs):
    """One timm ConvNeXt block (layer scale 0.5) on 8-channel 5x5 inputs, flattened into a 3-class head."""
    return (
        lambda: nn.Sequential(
            ConvNeXtBlock(8, kernel_size=3, ls_init_value=0.5, **kwargs), nn.Flatten(), nn.Linear(8 * 5 * 5, 3)
        ),
        _normal(8, 5, 5),
        _classes(3),
        cross_entropy,
    )


def _std_conv_case(kind: str, shape: tuple[int, int, int], side: int, flat: int, **kwargs):
    """A ``kind`` conv (in, out, kernel) on ``side``-pixel inputs, flattened into a 3-class head."""
    return (
        lambda: nn.Sequential(std_conv(kind, *shape, **kwargs), nn.Flatten(), nn.Linear(flat, 3)),
        _normal(shape[0], side, side),
        _classes(3),
        cross_entropy,
    )


def efficientformer_attention() -> nn.Module:
    """timm's EfficientFormer attention: ``attention_biases`` indexed by the ``attention_bias_idxs`` buffer."""
    from timm.models.efficientformer import Attention

    attention = Attention(dim=8, key_dim=4, num_heads=2, attn_ratio=2, resolution=2)
    return nn.Sequential(attention, nn.Flatten(), nn.Linear(32, 3))


register_broadcast_parameters(TokenOnly, ["token"])
register_broadcast_parameters(TokenAndScale, ["token"])


def tiny_deit(**kwargs) -> nn.Module:
    # init_values adds LayerScale modules, so timm's LayerScale sampler is exercised as well.
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        num_classes=10,
        depth=2,
        embed_dim=24,
        num_heads=2,
        init_values=0.1,
        **kwargs,
    )


def _classes(n: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, n, (B,), generator=g)


def _normal(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(B, *shape, generator=g)


# name -> (model factory, input factory, target factory, per-sample loss)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable, Callable, PerSampleLoss]] = {
    "linear_2d": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
        _normal(6),
        _classes(3),
        cross_entropy,
    ),
    "linear_3d": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4)),
        _normal(3, 6),
        _normal(3, 4),
        squared_error,
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 2, (3, 2), stride=(1, 2), padding=(0, 1), dilation=(1, 1)),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        ),
        _normal(3, 9, 9),
        _classes(3),
        cross_entropy,
    ),
    "conv2d_groups_dilation": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False), nn.Flatten()),
        _normal(4, 5, 5),
        _normal(6 * 5 * 5),
        squared_error,
    ),
    "layernorm": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)),
        _normal(3, 6),
        _normal(3, 3),
        squared_error,
    ),
    "layernorm_2d_shape": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm((3, 8)), nn.Flatten(), nn.Linear(24, 3)),
        _normal(3, 6),
        _classes(3),
        cross_entropy,
    ),
    "groupnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
        ),
        _normal(3, 6, 6),
        _classes(3),
        cross_entropy,
    ),
    "embedding": (
        lambda: nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(4 * 5, 3)),
        lambda g: torch.randint(0, 4, (B, 5), generator=g),  # few distinct tokens: repeats within a sample
        _classes(3),
        cross_entropy,
    ),
    "embedding_padding_idx": (
        lambda: nn.Sequential(nn.Embedding(11, 4, padding_idx=0), nn.Flatten(), nn.Linear(4 * 5, 3)),
        lambda g: torch.randint(0, 4, (B, 5), generator=g),
        _classes(3),
        cross_entropy,
    ),
    "functorch_scale": (
        lambda: nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Linear(5, 3)),
        _normal(6),
        _classes(3),
        cross_entropy,
    ),
    "functorch_subtree": (
        lambda: nn.Sequential(nn.Linear(6, 5), Gated(5), nn.Linear(5, 3)),
        _normal(6),
        _classes(3),
        cross_entropy,
    ),
    "std_conv": _std_conv_case("StdConv2d", (3, 4, 3), 6, 4 * 6 * 6, padding=1),
    "scaled_std_conv_groups": _std_conv_case("ScaledStdConv2d", (4, 6, 3), 6, 6 * 6 * 6, groups=2, gain_init=0.7),
    "std_conv_same_strided": _std_conv_case("StdConv2dSame", (3, 4, 3), 7, 4 * 4 * 4, stride=2),
    "scaled_std_conv_same_strided": _std_conv_case("ScaledStdConv2dSame", (3, 4, 3), 7, 4 * 4 * 4, stride=2),
    "replay_buffers_kwargs": (
        lambda: nn.Sequential(nn.Linear(6, 5), AttentionWithTable(5, 4), nn.Flatten(), nn.Linear(20, 3)),
        _normal(4, 6),
        _classes(3),
        cross_entropy,
    ),
    "replay_timm_efficientformer": (efficientformer_attention, _normal(4, 8), _classes(3), cross_entropy),
    "broadcast_token": (
        lambda: nn.Sequential(nn.Linear(6, 5), TokenOnly(5), nn.Linear(5, 3)),
        _normal(6),
        _classes(3),
        cross_entropy,
    ),
    "broadcast_token_functorch": (
        lambda: nn.Sequential(nn.Linear(6, 5), TokenAndScale(5), nn.Linear(5, 3)),
        _normal(6),
        _classes(3),
        cross_entropy,
    ),
    "shared_twice": (SharedTwice, _normal(5), _classes(3), cross_entropy),
    "shared_functorch": (
        lambda: nn.Sequential(nn.Linear(6, 5), SharedTwice(scale=Scale(5))),
        _normal(6),
        _classes(3),
        cross_entropy,
    ),
    "shared_branches": (SharedBranches, _normal(5), _classes(3), cross_entropy),
    "deit": (tiny_deit, _normal(3, 32, 32), _classes(10), cross_entropy),
    "beit": _tiny_timm_case("beit_base_patch16_224"),
    "eva02": _tiny_timm_case("eva02_tiny_patch14_224"),
    "beit_layer_scale": _tiny_timm_case("beit_base_patch16_224", init_values=0.5),
    "cait": _tiny_timm_case("cait_xxs24_224", init_values=0.5),
    "convnext_block": _convnext_block_case(),
    "convnext_block_conv_mlp": _convnext_block_case(conv_mlp=True),
    "deit_distilled": _tiny_timm_case("deit_tiny_distilled_patch16_224", side=32, patch_size=8, embed_dim=24),
}


def build(case: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor, PerSampleLoss]:
    make_model, make_x, make_y, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = make_model().to(dtype)
    g = torch.Generator().manual_seed(1)
    x, y = make_x(g), make_y(g)
    if x.is_floating_point():
        x = x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    return model, x, y, loss_fn


def paths_of(engine: PerSampleGradients) -> dict[str, str]:
    return {p.module: p.path for p in engine.paths()}


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_func(case: str, dtype: torch.dtype, reduction: str) -> None:
    model, x, y, loss_fn = build(case, dtype)
    assert_per_sample_grads_match(model, x, y, loss_fn, reduction)


@pytest.mark.parametrize(
    ("case", "module", "path"),
    [
        ("linear_2d", "0", "grad_sampler"),
        ("embedding", "0", "grad_sampler"),
        ("groupnorm", "1", "grad_sampler"),
        ("functorch_scale", "1", "functorch"),
        ("functorch_subtree", "1", "functorch"),
        ("broadcast_token", "1", "broadcast"),
        ("broadcast_token_functorch", "1", "functorch"),
        ("std_conv", "0", "grad_sampler"),
        ("scaled_std_conv_same_strided", "0", "grad_sampler"),
        ("replay_buffers_kwargs", "1", "functorch"),
        ("replay_buffers_kwargs", "1.bias", "functorch"),
        ("replay_buffers_kwargs", "1.qk", "grad_sampler"),
        ("replay_timm_efficientformer", "0", "functorch"),
        ("deit", "", "broadcast"),
        ("deit_distilled", "", "broadcast"),
        ("beit", "", "broadcast"),
        ("beit_layer_scale", "blocks.0", "grad_sampler"),  # gamma_1, gamma_2 from taps, no replay
        ("cait", "blocks.0", "grad_sampler"),
        ("cait", "blocks_token_only.0", "grad_sampler"),
        ("convnext_block", "0", "grad_sampler"),
        ("convnext_block_conv_mlp", "0", "grad_sampler"),
        ("beit", "blocks.0.attn", "functorch"),  # q/v biases and the relative position table
        ("beit", "blocks.0.attn.qkv", "grad_sampler"),
        ("eva02", "", "broadcast"),
        ("eva02", "blocks.0.attn.qkv", "grad_sampler"),
    ],
)
def test_paths(case: str, module: str, path: str) -> None:
    model, *_ = build(case)
    engine = PerSampleGradients()
    engine.attach(model)
    assert path in {p.path for p in engine.paths() if p.module == module}


def test_functorch_replays_the_module_s_own_parameters_only() -> None:
    """The replay differentiates the module's own parameters; its submodules keep their own (fast) paths."""
    model, *_ = build("functorch_subtree")
    engine = PerSampleGradients()
    engine.attach(model)
    paths = {p.module: p for p in engine.paths()}
    assert (paths["1"].path, paths["1"].parameters) == ("functorch", ("gate",))
    assert (paths["1.inner"].path, paths["1.inner"].parameters) == ("grad_sampler", ("weight", "bias"))


def test_broadcast_and_replayed_parameters_of_one_module() -> None:
    model, *_ = build("broadcast_token_functorch")
    engine = PerSampleGradients()
    engine.attach(model)
    rows = sorted((p.path, p.parameters) for p in engine.paths() if p.module == "1")
    assert rows == [("broadcast", ("token",)), ("functorch", ("scale",))], rows


def test_deit_takes_no_functorch_path() -> None:
    if _SPARSE_ERROR is not None:
        pytest.xfail(f"lightning_sparta.sparse (timm grad samplers) is not importable: {_SPARSE_ERROR}")
    model, *_ = build("deit")
    assert all(p.requires_grad for p in model.parameters())
    engine = PerSampleGradients()
    engine.attach(model)
    paths = engine.paths()
    assert [p.module for p in paths if p.path == "functorch"] == []
    broadcast = [p for p in paths if p.path == "broadcast"]
    assert [(p.module, set(p.parameters)) for p in broadcast] == [("", {"cls_token", "pos_embed"})]
    # the recorded paths cover every trainable parameter exactly once
    covered = [f"{p.module}.{n}".lstrip(".") for p in paths for n in p.parameters]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters())


def test_deit_partially_frozen() -> None:
    """Frozen broadcast parameters and a frozen patch embedding get no grad_sample."""
    model, x, y, loss_fn = build("deit")
    for p in (model.cls_token, *model.patch_embed.parameters(), model.blocks[0].ls1.gamma):
        p.requires_grad_(False)
    engine = assert_per_sample_grads_match(model, x, y, loss_fn, "mean")
    assert set(paths_of(engine)) >= {"", "blocks.0.attn.qkv"}
    assert "patch_embed.proj" not in paths_of(engine)


@pytest.mark.parametrize("case", ["linear_2d", "conv2d", "functorch_scale"])
def test_frozen_parameters_get_no_grad_sample(case: str) -> None:
    model, x, y, loss_fn = build(case)
    first = next(m for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    for p in first.parameters(recurse=False):
        p.requires_grad_(False)
    engine = assert_per_sample_grads_match(model, x, y, loss_fn, "sum")
    assert all(p.requires_grad for p in engine.parameters)
    assert not {id(p) for p in first.parameters()} & {id(p) for p in engine.parameters}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_opacus_micro_batch_cross_check(reduction: str) -> None:
    """Opacus' own micro-batch reference agrees with the torch.func reference (and with the engine)."""
    model, x, _, _ = build("conv2d")
    assert check_per_sample_gradients_are_correct(x, model, atol=1e-8, rtol=1e-6)
    l1 = lambda out, _y: out.abs().flatten(1).sum(1)  # noqa: E731  - the loss of Opacus' ModelWithLoss
    # ModelWithLoss' L1Loss(reduction="mean") of a one-sample micro-batch averages over its elements.
    per_elem = 1.0 if reduction == "sum" else float(model(x[:1]).numel())
    micro = compute_microbatch_grad_sample(x, model, loss_reduction=reduction)
    reference = reference_per_sample_grads(model, x, torch.zeros(B), l1)
    assert micro.keys() == reference.keys()
    for name in micro:
        torch.testing.assert_close(micro[name] * per_elem, reference[name], atol=1e-10, rtol=1e-8)
    assert_per_sample_grads_match(model, x, torch.zeros(B), l1, reduction)


@pytest.mark.parametrize("case", ["linear_2d", "functorch_scale", "deit"])
def test_inactive_outside_capturing(case: str) -> None:
    model, x, y, loss_fn = build(case)
    engine = PerSampleGradients()
    engine.attach(model)
    model.train()
    loss_fn(model(x), y).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert not any(engine._activations.values())
    # the broadcast parameters are the model's own Parameters again after every forward pass
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


@pytest.mark.parametrize("case", ["linear_2d", "functorch_scale", "deit"])
def test_inactive_without_grad_and_active_in_eval_mode(case: str) -> None:
    """Evaluation (no gradients) records nothing; a model in eval() inside a captured backward pass (a
    backbone with dropout off) has per-sample gradients like in train()."""
    model, x, y, loss_fn = build(case)
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing(), torch.no_grad():
        model(x)
    assert not any(engine._activations.values())
    assert not engine.enabled
    model.eval()
    with engine.capturing():
        loss_fn(model(x), y).sum().backward()
    assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad)
    assert not any(engine._activations.values())


@pytest.mark.parametrize("case", ["linear_2d", "functorch_scale", "deit"])
def test_detach_removes_hooks(case: str) -> None:
    model, x, y, loss_fn = build(case)
    engine = PerSampleGradients()
    engine.attach(model)
    engine.detach()
    assert engine.paths() == []
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
    with engine.capturing():
        loss_fn(model(x), y).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert not any(engine._activations.values())


def test_reattach_and_repeated_steps() -> None:
    """Re-attaching (e.g. after freezing) and several steps in a row stay correct; clear() resets."""
    model, x, y, loss_fn = build("functorch_scale")
    reference_model = copy.deepcopy(model)  # an un-hooked copy for the torch.func reference
    engine = PerSampleGradients()
    for _ in range(2):
        engine.attach(model)
    for m in (model, reference_model):
        m[0].weight.requires_grad_(False)
    engine.attach(model)
    expected = reference_per_sample_grads(reference_model, x, y, loss_fn)
    for _ in range(3):
        engine.clear()
        engine.loss_scale = 1.0
        with engine.capturing():
            loss_fn(model(x), y).sum().backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad_sample, expected[name], **TOL[torch.float64])
        assert not any(engine._activations.values())
    assert getattr(model[0].weight, "grad_sample", None) is None


def test_per_sample_norms() -> None:
    model, x, y, loss_fn = build("conv2d")
    expected = reference_per_sample_grads(model, x, y, loss_fn)
    engine = engine_per_sample_grads(model, x, y, loss_fn, "mean")
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in expected.values()]).sum(0).sqrt()
    torch.testing.assert_close(engine.per_sample_norms().double(), norms, atol=1e-6, rtol=1e-5)


class WithTemperature(LightningModule):
    """A LightningModule owning a parameter directly (used outside any submodule's forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))
        self.body = nn.Sequential(nn.Linear(6, 5), Scale(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.temperature


def test_lightning_module_own_parameters_are_unsupported_not_functorch() -> None:
    model = WithTemperature()
    engine = PerSampleGradients()
    engine.attach(model)
    assert paths_of(engine) == {"": "unsupported", "body.0": "grad_sampler", "body.1": "functorch"}
    with engine.capturing():
        model(torch.randn(B, 6)).sum().backward()
    assert getattr(model.temperature, "grad_sample", None) is None
    assert model.body[1].scale.grad_sample.shape == (B, 5)


def test_call_outside_the_loss_does_not_steal_the_activation() -> None:
    """Each forward call's output carries its own hook and input (this was a known limitation of the
    last-in-first-out pairing of full backward hooks)."""
    model, x, y, loss_fn = build("linear_2d")
    expected = reference_per_sample_grads(model, x, y, loss_fn)
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing():
        out = model(x)
        model[0](x * 2)  # e.g. an auxiliary output computed for logging only
        loss_fn(out, y).sum().backward()
    torch.testing.assert_close(model[0].weight.grad_sample, expected["0.weight"], **TOL[torch.float64])


class RunningScale(nn.Module):
    """Keeps a running mean of its inputs (a statistic of the batch) in a buffer while training."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.register_buffer("running_mean", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return (x - self.running_mean) * self.scale


def test_replay_refuses_a_forward_that_changes_a_buffer() -> None:
    model = nn.Sequential(nn.Linear(6, 5), RunningScale(5), nn.Linear(5, 3))
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing(), pytest.raises(RuntimeError, match=r"`1` \(RunningScale\) changed its buffers running"):
        model(torch.randn(4, 6))


def test_beit_attention_computes_its_qkv_bias_separately_while_attached() -> None:
    """BEiT/EVA attention calls F.linear with its `qkv` child's weight: while hooked, the sum goes through `qkv`."""
    model, *_ = build("beit")
    attention = model.blocks[0].attn
    assert attention.qkv_bias_separate is False
    engine = PerSampleGradients()
    engine.attach(model)
    assert attention.qkv_bias_separate is True
    engine.detach()
    assert attention.qkv_bias_separate is False


class DroppedScale(Scale):
    """A replayed parameter next to dropout: the replay cannot redraw the forward pass's mask."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(super().forward(x))


def test_replay_refuses_random_operations_naming_the_module() -> None:
    model = nn.Sequential(nn.Linear(3, 4), DroppedScale(4), nn.Linear(4, 2))
    engine = PerSampleGradients()
    engine.attach(model)
    with engine.capturing(), pytest.raises(RuntimeError, match=r"replay of `1` \(DroppedScale\) met a random"):
        model(torch.randn(5, 3)).sum().backward()


def test_replay_refuses_a_keyword_input_changed_after_the_forward_pass() -> None:
    model = BiasTable(4)
    engine = PerSampleGradients()
    engine.attach(model)
    temperature = torch.tensor([2.0])
    with engine.capturing():
        out = model(torch.randn(3, 4, 4, requires_grad=True), temperature=temperature)
        temperature.mul_(3.0)  # the replay would divide by 6 where the forward divided by 2
        with pytest.raises(RuntimeError, match=r"Keyword input `temperature` of BiasTable was modified in place"):
            out.sum().backward()
