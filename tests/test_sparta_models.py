"""SPARTA on real model shapes: grouped/depthwise and timm 'same' convs, EfficientNet, the user's trainable set."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from timm.layers import Conv2dSame, StdConv2d
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.privacy.per_sample import PerSampleGradients
from lightning_sparta.sparse import MaskedConv2d, RowSparseConv2d, densify_, sparse_modules, sparsify_
from lightning_sparta.sparse.layers import UnsupportedForwardError

# Hooks warn when the module input does not require grad, as in these isolated layers.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# name -> (dense conv factory, selected rows, input shape)
GROUPED_CASES = {
    "grouped": (lambda bias: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=bias), [5, 0, 3], (3, 4, 7, 6)),
    "depthwise": (lambda bias: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=bias), [4, 1], (3, 6, 9, 8)),
    "depthwise_multiplier": (  # two filters per input channel, dilated, both filters of group 1 selected
        lambda bias: nn.Conv2d(3, 6, (3, 2), padding=2, dilation=2, groups=3, bias=bias),
        [2, 3, 5],
        (3, 3, 8, 7),
    ),
    "same_depthwise_stride2": (  # timm's Conv2dSame: asymmetric padding from the input size
        lambda bias: Conv2dSame(6, 6, 5, stride=2, groups=6, bias=bias),
        [0, 5],
        (3, 6, 9, 8),
    ),
    "same_dense_stride2": (lambda bias: Conv2dSame(3, 4, 3, stride=2, bias=bias), [1], (3, 3, 8, 9)),
}


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out**2).sum() / 2  # non-linear, so each sample gets its own backprops


def _reference_grads(dense: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the dense layer's parameters with torch.func (one sample at a time)."""
    params = {name: p.detach() for name, p in dense.named_parameters()}

    def sample_loss(params: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return _loss(functional_call(dense, params, (sample.unsqueeze(0),)))

    return vmap(grad(sample_loss), in_dims=(None, 0))(params, x)


def _engine_grads(module: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-sample gradients from the strategy's hook engine (registered grad samplers), and its paths."""
    engine = PerSampleGradients()
    engine.attach(module)
    with engine.capturing():
        _loss(module(x)).backward()
    grads = {name: p.grad_sample for name, p in module.named_parameters() if p.requires_grad}
    paths = [p.path for p in engine.paths()]
    engine.detach()
    return grads, paths


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_row_sparse_per_sample_grads_match_torch_func(case: str, bias: bool) -> None:
    make, rows, shape = GROUPED_CASES[case]
    dense, x = make(bias), torch.randn(shape)
    with torch.no_grad():  # move the rows first, so the check does not rely on weight_rows == weight_old
        dense.weight.add_(0.1 * torch.randn_like(dense.weight))
    sparse = RowSparseConv2d.from_dense(copy.deepcopy(dense), torch.tensor(rows))
    torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=1e-6)

    expected = _reference_grads(dense, x)
    actual, paths = _engine_grads(sparse, x)
    assert paths == ["grad_sampler"]
    selected = torch.tensor(sorted(rows))
    assert actual["weight_rows"].shape == (len(x), len(rows), *dense.weight.shape[1:])
    torch.testing.assert_close(actual["weight_rows"], expected["weight"][:, selected])
    if bias:
        torch.testing.assert_close(actual["bias"], expected["bias"])


@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_masked_conv_and_dense_same_conv_per_sample_grads(case: str) -> None:
    make, _, shape = GROUPED_CASES[case]
    dense, x = make(True), torch.randn(shape)
    expected = _reference_grads(dense, x)

    mask = torch.rand(dense.weight.shape) < 0.4
    masked = MaskedConv2d.from_dense(copy.deepcopy(dense), mask)
    torch.testing.assert_close(masked(x), dense(x), rtol=0, atol=1e-6)
    actual, paths = _engine_grads(masked, x)
    assert paths == ["grad_sampler"]
    torch.testing.assert_close(actual["weight_values"], expected["weight"].flatten(1)[:, mask.flatten()])
    torch.testing.assert_close(actual["bias"], expected["bias"])

    # The dense layer itself (scoring epoch): no functorch fallback for timm's Conv2dSame either.
    actual, paths = _engine_grads(copy.deepcopy(dense), x)
    assert paths == ["grad_sampler"]
    torch.testing.assert_close(actual["weight"], expected["weight"])


def test_grouped_row_sparse_forward_costs_k_filters() -> None:
    """The trained part reads only the selected filters' groups: a gathered input of k channels (depthwise)."""
    dense = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    sparse = RowSparseConv2d.from_dense(dense, torch.tensor([7, 40]))
    x = torch.randn(2, 64, 5, 5)
    assert sparse._row_inputs(x).shape == (2, 2, 5, 5)
    assert sparse._row_input_channels().tolist() == [7, 40]
    grouped = RowSparseConv2d.from_dense(nn.Conv2d(8, 4, 1, groups=2), torch.tensor([0, 3]))
    assert grouped._row_input_channels().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("case", GROUPED_CASES)
def test_grouped_and_same_convs_round_trip(case: str) -> None:
    """Sparse output = dense conv with the merged weight; state dict and ``densify_`` give the same function."""
    make, rows, shape = GROUPED_CASES[case]
    dense, x = make(True), torch.randn(shape)
    model = nn.Sequential(copy.deepcopy(dense))
    (sparse,) = sparsify_(model, {"0": torch.tensor(rows)}).values()
    with torch.no_grad():
        sparse.weight_rows.add_(torch.randn_like(sparse.weight_rows))
    frozen = [r for r in range(dense.out_channels) if r not in rows]
    assert torch.equal(sparse.weight[frozen], dense.weight[frozen])
    out = model(x)
    fresh = make(True)
    fresh.load_state_dict(model[0].state_dict())
    torch.testing.assert_close(fresh(x), out)
    densify_(model)
    assert type(model[0]) is type(dense)
    assert (model[0].groups, model[0].padding) == (dense.groups, dense.padding)
    torch.testing.assert_close(model(x), out)


def test_conv2d_same_swap_keeps_model_outputs_identical() -> None:
    """Swapping a Conv2dSame (stride 2, input-dependent asymmetric padding) keeps the model's function."""
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), Conv2dSame(8, 8, 5, stride=2, groups=8))
    x = torch.randn(2, 3, 11, 10)  # odd/even sizes: the 'same' padding differs per side
    before = model(x)
    swapped = sparsify_(model, {"0": torch.tensor([1, 6]), "2": torch.ones(8, 1, 5, 5, dtype=torch.bool)})
    assert isinstance(swapped["0"], RowSparseConv2d)
    assert isinstance(swapped["2"], MaskedConv2d)
    assert swapped["0"].same_pad
    assert swapped["2"].same_pad
    assert torch.equal(model(x), before)
    densify_(model)
    assert [type(m) for m in model] == [Conv2dSame, nn.ReLU, Conv2dSame]
    assert torch.equal(model(x), before)


def test_conv_subclass_with_own_forward_is_refused() -> None:
    with pytest.raises(UnsupportedForwardError, match=r"StdConv2d.*different function"):
        RowSparseConv2d.from_dense(StdConv2d(3, 4, 3), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------- in a Trainer
N, BATCH = 8, 4  # q = 1/2


class Classifier(L.LightningModule):
    """Cross-entropy on a fixed random data set; SGD over every parameter."""

    def __init__(self, net: nn.Module, image: tuple[int, ...] = (3, 32, 32), classes: int = 3) -> None:
        super().__init__()
        self.net = net
        g = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(torch.randn(N, *image, generator=g), torch.randint(0, classes, (N,), generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=BATCH)


class PhaseProbe(Callback):
    """Records, at every epoch start and at the end of fitting, the phase, trainable names and state dict."""

    def __init__(self, sparta: SpartaMaskCallback) -> None:
        self.sparta = sparta
        self.phase: dict[int, str | None] = {}
        self.trainable: dict[int, set[str]] = {}
        self.state: dict[int | str, dict[str, torch.Tensor]] = {}

    def _record(self, key, pl_module) -> None:
        self.state[key] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.phase[epoch] = self.sparta.phase
        self.trainable[epoch] = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self._record(epoch, pl_module)

    def on_fit_end(self, trainer, pl_module):
        self._record("end", pl_module)


def _fit(module: L.LightningModule, tmp_path, **callback_kwargs) -> tuple[SpartaMaskCallback, PhaseProbe]:
    """Warm-up (epoch 0), SPARTA scoring (epoch 1), sparse training (epoch 2) with DPStrategy."""
    L.seed_everything(0)
    callback = SpartaMaskCallback(**{"mask_epoch": 1, "trainable_fraction": 0.25, **callback_kwargs})
    probe = PhaseProbe(callback)
    trainer = L.Trainer(
        strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3),
        callbacks=[callback, probe],
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert probe.phase == {0: "warmup", 1: "scoring", 2: "masked"}
    return callback, probe


def _efficientnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    return model  # real BatchNorm layers: DPStrategy freezes their statistics


@pytest.fixture(scope="module")
def efficientnet_run(tmp_path_factory):
    model = _efficientnet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    module = Classifier(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, probe = _fit(module, tmp_path_factory.mktemp("efficientnet"))
    assert not [w for w in caught if "functorch" in str(w.message)]  # Conv2dSame has its own grad sampler
    return module, callback, probe, initial


def test_efficientnet_depthwise_and_same_convs_scored_and_row_sparse(efficientnet_run):
    module, callback, _, _ = efficientnet_run
    net = module.net
    depthwise = [n for n, m in _efficientnet().named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    same = [n for n, m in _efficientnet().named_modules() if isinstance(m, Conv2dSame)]
    assert len(depthwise) == 16
    assert {"conv_stem", "blocks.1.0.conv_dw"} <= set(same)
    assert set(callback.scored_layers) >= {f"net.{n}" for n in depthwise + same}
    assert set(callback.mask) == set(callback.scored_layers)
    for name in depthwise:
        layer = net.get_submodule(name)
        assert isinstance(layer, RowSparseConv2d)
        assert layer.groups == layer.out_channels
        assert layer.weight_rows.shape[1:] == (1, *layer.kernel_size)
        assert layer.same_pad == (name in same)
    assert net.conv_stem.same_pad
    assert callback.scores is not None
    assert all(callback.scores[n].abs().sum() > 0 for n in callback.scored_layers)


def test_efficientnet_frozen_rows_bit_identical_and_exports_agree(efficientnet_run):
    module, callback, _, initial = efficientnet_run
    net = module.net
    final = net.state_dict()
    changed = 0
    for name, rows in callback.mask.items():
        key = name.removeprefix("net.") + ".weight"
        frozen = torch.ones(initial[key].shape[0], dtype=torch.bool)
        frozen[rows] = False
        assert torch.equal(final[key][frozen], initial[key][frozen]), name
        changed += int(not torch.equal(final[key][~frozen], initial[key][~frozen]))
    assert changed == len(callback.mask)  # every selected row set moved (DP noise alone moves it)
    for key, value in initial.items():  # BatchNorm statistics are frozen
        if "running_" in key or "num_batches_tracked" in key:
            assert torch.equal(final[key], value), key

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    net.eval()
    with torch.no_grad():
        sparse_out = net(x)
        exported = copy.deepcopy(net)
        assert densify_(exported) == len(callback.mask)
        assert not sparse_modules(exported)
        assert [type(m) for m in exported.modules()] == [type(m) for m in _efficientnet().modules()]
        fresh = _efficientnet().eval()
        fresh.load_state_dict(exported.state_dict())
        torch.testing.assert_close(exported(x), sparse_out, rtol=1e-5, atol=1e-6)
        assert torch.equal(fresh(x), exported(x))


class LowRankAdapter(nn.Module):
    """A user's LoRA-style adapter: its own Parameters, of a module type SPARTA does not know."""

    def __init__(self, features_in: int, features_out: int, rank: int = 2) -> None:
        super().__init__()
        self.down = nn.Parameter(0.3 * torch.randn(rank, features_in))
        self.up = nn.Parameter(0.3 * torch.randn(features_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.down.T @ self.up.T


class AdaptedNet(nn.Module):
    """Backbone (conv, GroupNorm, depthwise conv) → neck Linear (+ optional adapter) → LayerNorm → head."""

    def __init__(self, adapter: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        )
        self.neck = nn.Linear(32, 16)
        self.adapter = LowRankAdapter(32, 16) if adapter else None
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.backbone(x)), 2).flatten(1)
        y = self.neck(x) + (self.adapter(x) if self.adapter is not None else 0)
        return self.head(torch.tanh(self.norm(y)))

    def get_classifier(self) -> nn.Module:
        return self.head


@pytest.mark.parametrize("warmup", ["bitfit", "full"])
def test_frozen_backbone_stays_frozen_in_every_phase(tmp_path, warmup: str) -> None:
    torch.manual_seed(0)
    module = Classifier(AdaptedNet(), image=(3, 8, 8))
    module.net.backbone.requires_grad_(False)
    backbone = {k for k in module.state_dict() if k.startswith("net.backbone.")}
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    callback, probe = _fit(module, tmp_path, warmup=warmup)

    assert callback.scored_layers == ["net.neck"]  # frozen-weight layers are not scored
    assert callback.extra_parameters == []
    for epoch, trainable in probe.trainable.items():
        assert not any(n.startswith("net.backbone.") for n in trainable), epoch
        assert "net.head.weight" in trainable
    assert "net.neck.weight" in probe.trainable[1]  # scored
    assert "net.neck.weight_rows" in probe.trainable[2]  # sparse
    for key in [0, 1, 2, "end"]:
        for name in backbone:
            assert torch.equal(probe.state[key][name], initial[name]), (key, name)
    assert not torch.equal(probe.state["end"]["net.head.weight"], initial["net.head.weight"])


def test_respect_frozen_false_lets_the_callback_decide(tmp_path) -> None:
    torch.manual_seed(0)
    module = Classifier(AdaptedNet(adapter=True), image=(3, 8, 8))
    module.net.backbone.requires_grad_(False)
    callback, probe = _fit(module, tmp_path, warmup="full", respect_frozen=False)
    assert "net.backbone.0.weight" in probe.trainable[0]  # full warm-up unfreezes it
    assert {"net.backbone.0", "net.backbone.3", "net.neck"} == set(callback.scored_layers)
    assert callback.extra_parameters == []
    for epoch in (1, 2):  # scoring and sparse phases: the adapter is frozen, as before `respect_frozen`
        assert not any(n.startswith("net.adapter.") for n in probe.trainable[epoch])


def test_user_adapter_trains_in_every_phase_with_a_warning(tmp_path) -> None:
    torch.manual_seed(0)
    module = Classifier(AdaptedNet(adapter=True), image=(3, 8, 8))
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.warns(UserWarning, match=r"do(es)? not recognise.*net\.adapter\.down, net\.adapter\.up"):
        callback, probe = _fit(module, tmp_path)

    assert callback.extra_parameters == ["net.adapter.down", "net.adapter.up"]
    assert "net.adapter" not in callback.scored_layers
    for epoch, trainable in probe.trainable.items():
        assert {"net.adapter.down", "net.adapter.up"} <= trainable, epoch
    for name in ("net.adapter.down", "net.adapter.up"):
        assert not torch.equal(probe.state[1][name], initial[name])  # trained in warm-up
        assert torch.equal(probe.state[2][name], probe.state[1][name])  # the scoring epoch takes no step
        assert not torch.equal(probe.state["end"][name], probe.state[2][name])  # trained in the sparse phase


def test_conv_with_its_own_forward_stays_dense_with_a_warning(tmp_path) -> None:
    torch.manual_seed(0)
    module = Classifier(AdaptedNet(), image=(3, 8, 8))
    module.net.backbone[0] = StdConv2d(3, 8, 3, padding=1)  # weight standardisation in its forward
    initial = module.net.backbone[0].weight.clone()
    with pytest.warns(UserWarning, match=r"stay dense.*net\.backbone\.0 \(StdConv2d\)"):
        callback, _ = _fit(module, tmp_path)
    assert set(callback.scored_layers) == {"net.backbone.3", "net.neck"}
    assert type(module.net.backbone[0]) is StdConv2d
    assert torch.equal(module.net.backbone[0].weight, initial)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 6, "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"in_channels": 6, "out_channels": 6, "kernel_size": 3, "padding": 1, "groups": 6},  # depthwise
        {"in_channels": 6, "out_channels": 12, "kernel_size": 3, "stride": 2, "groups": 3, "dilation": 2},
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1, "padding_mode": "circular"},
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 2, "padding_mode": "reflect", "groups": 2},
        {"in_channels": 4, "out_channels": 4, "kernel_size": (3, 2), "padding": "same", "padding_mode": "replicate"},
        {"in_channels": 4, "out_channels": 8, "kernel_size": 2, "padding": "valid", "bias": False},
    ],
    ids=["dense", "depthwise", "grouped-strided-dilated", "circular", "reflect-grouped", "same-replicate", "valid"],
)
def test_dense_conv2d_sampler_matches_torch_func(kwargs):
    """Our nn.Conv2d sampler (groups, padding modes, string padding) against torch.func per-sample gradients."""
    from lightning_sparta.sparse.grad_samplers import compute_conv2d_grad_sample

    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(5, conv.in_channels, 7, 6, dtype=torch.float64)
    out = conv(x)
    backprops = torch.randn_like(out)
    params = {k: v.detach() for k, v in conv.named_parameters()}

    def one(p, xi, bi):
        return (functional_call(conv, p, (xi[None],)) * bi[None]).sum()

    expected = vmap(grad(one), in_dims=(None, 0, 0))(params, x, backprops)
    got = compute_conv2d_grad_sample(conv, [x], backprops)
    assert set(got) == set(conv.parameters())
    for name, p in conv.named_parameters():
        torch.testing.assert_close(got[p], expected[name], rtol=1e-9, atol=1e-9)
