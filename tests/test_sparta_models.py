"""SPARTA on real model shapes: grouped/depthwise and timm 'same' convs, EfficientNet, the user's trainable set."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Conv2dSame, StdConv2d
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_sparta.privacy.per_sample import PerSampleGradients
from lightning_sparta.sparse import MaskedConv2d, RowSparseConv2d, densify_, sparsify_
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
