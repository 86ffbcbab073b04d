"""Tests for the sparse layers, their Opacus grad samplers and the swap helpers."""

import copy
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from timm.layers import LayerNorm, LayerNorm2d, LayerScale, LayerScale2d
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_sparta.sparse import (
    SPARSE_LAYER_TYPES,
    MaskedConv2d,
    MaskedLinear,
    RowSparseConv2d,
    RowSparseLinear,
    densify_,
    sparse_modules,
    sparsify_,
)
from lightning_sparta.sparse.grad_samplers import compute_layer_scale_grad_sample
from lightning_sparta.sparse.layers import select_channels

# Opacus' hooks warn when the module input does not require grad, as in these isolated layers.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _linear(bias: bool = True) -> nn.Linear:
    return nn.Linear(6, 5, bias=bias)


def _conv(bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(3, 4, kernel_size=(3, 2), stride=2, padding=1, dilation=2, bias=bias)


def _mask(layer: nn.Module) -> torch.Tensor:
    return torch.rand(layer.weight.shape) < 0.4


# name -> (dense factory, sparse type, selection factory, input shape)
SPARSE_CASES: dict[str, tuple[Callable[..., nn.Module], type, Callable[[nn.Module], torch.Tensor], tuple]] = {
    "row_linear_2d": (_linear, RowSparseLinear, lambda _: torch.tensor([3, 0, 4]), (4, 6)),
    "row_linear_3d": (_linear, RowSparseLinear, lambda _: torch.tensor([1, 2]), (4, 3, 6)),
    "row_conv": (_conv, RowSparseConv2d, lambda _: torch.tensor([2, 1]), (4, 3, 9, 8)),
    "masked_linear_2d": (_linear, MaskedLinear, _mask, (4, 6)),
    "masked_linear_3d": (_linear, MaskedLinear, _mask, (4, 3, 6)),
    "masked_conv": (_conv, MaskedConv2d, _mask, (4, 3, 9, 8)),
}


def _build(case: str, bias: bool = True) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Return (dense layer, sparse copy, input) for a case."""
    make_dense, sparse_type, make_selection, input_shape = SPARSE_CASES[case]
    dense = make_dense(bias)
    return dense, sparse_type.from_dense(dense, make_selection(dense)), torch.randn(input_shape)


def _trainable(sparse: nn.Module) -> nn.Parameter:
    return sparse.weight_rows if hasattr(sparse, "weight_rows") else sparse.weight_values


def _perturb_(sparse: nn.Module) -> None:
    with torch.no_grad():
        _trainable(sparse).add_(torch.randn_like(_trainable(sparse)))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out**2).sum() / 2  # non-linear, so each sample gets its own backprops


def assert_per_sample_grads_match(module: nn.Module, x: torch.Tensor, opacus_check: bool = False) -> None:
    """Opacus' hook per-sample gradients for ``module`` equal torch.func's, with no functorch fallback.

    The reference runs each sample on its own (vmap over samples, batch dim 1). With
    ``opacus_check`` also run Opacus' own microbatch check; it wraps the module in strict mode,
    which refuses trainable modules that own buffers, so it only applies to the timm layers.
    """
    trainable_types = {type(m) for m in module.modules() if any(p.requires_grad for p in m.parameters(False))}
    assert trainable_types <= GradSampleModule.GRAD_SAMPLERS.keys()
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}

    def sample_loss(params: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return _loss(functional_call(module, params, (sample.unsqueeze(0),)))

    expected = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    # Our layers hold frozen tensors as buffers, which strict mode rejects: see DESIGN.md.
    wrapped = GradSampleModule(copy.deepcopy(module), strict=False, loss_reduction="sum")
    _loss(wrapped(x)).backward()
    actual = {name: p.grad_sample for name, p in wrapped._module.named_parameters() if p.requires_grad}
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value)
    if opacus_check:
        assert check_per_sample_gradients_are_correct(x, module)


@pytest.mark.parametrize("bias", ["trainable", "frozen", "none"])
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_per_sample_grads(case: str, bias: str) -> None:
    _, sparse, x = _build(case, bias=bias != "none")
    _perturb_(sparse)
    if bias == "frozen":
        sparse.bias.requires_grad_(False)
    assert_per_sample_grads_match(sparse, x)


@pytest.mark.parametrize(
    ("shape", "dim"), [((4, 7, 9), -1), ((4, 9, 7), 1), ((9, 4), 0), ((2, 9, 3, 5), 1), ((9,), 0), ((2, 3, 9), 2)]
)
@pytest.mark.parametrize("contiguous", [True, False])
def test_select_channels_is_index_select(shape: tuple[int, ...], dim: int, contiguous: bool) -> None:
    t = torch.randn(*shape)
    if not contiguous:  # a permuted view with the same shape
        t = torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))
    index = torch.tensor([8, 0, 3, 4])
    assert torch.equal(select_channels(t, dim, index), t.index_select(dim, index))


def test_row_sparse_grad_sample_has_k_rows() -> None:
    _, sparse, x = _build("row_conv")
    wrapped = GradSampleModule(sparse, strict=False, loss_reduction="sum")
    _loss(wrapped(x)).backward()
    assert sparse.weight_rows.grad_sample.shape == (4, 2, 3, 3, 2)
    assert sparse.bias.grad_sample.shape == (4, 4)


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_forward_matches_dense_after_from_dense(case: str) -> None:
    dense, sparse, x = _build(case)
    torch.testing.assert_close(sparse(x), dense(x))
    assert sparse.bias is dense.bias
    assert sparse.weight_old.dtype == dense.weight.dtype
    assert torch.equal(sparse.weight, dense.weight)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_to_dense_is_exact(case: str, bias: bool) -> None:
    dense, sparse, x = _build(case, bias=bias)
    _perturb_(sparse)
    exported = sparse.to_dense()
    assert type(exported) is type(dense)
    assert exported.weight.requires_grad
    assert exported.bias is dense.bias
    torch.testing.assert_close(exported(x), sparse(x))
    flat, original = exported.weight.detach().flatten(1), dense.weight.detach().flatten(1)
    if isinstance(sparse, RowSparseLinear | RowSparseConv2d):
        selected = torch.zeros(len(flat), dtype=torch.bool)
        selected[sparse.rows] = True
        assert torch.equal(flat[selected], sparse.weight_rows.detach().flatten(1))
    else:
        selected = torch.zeros(flat.numel(), dtype=torch.bool)
        selected[sparse.indices] = True
        selected = selected.view_as(flat)
        assert torch.equal(flat.flatten()[sparse.indices], sparse.weight_values.detach())
    assert torch.equal(flat[~selected], original[~selected])
    assert not torch.equal(flat[selected], original[selected])


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 5 * 5, 7), nn.Tanh(), nn.Linear(7, 2, bias=False)),
    )


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"0": torch.tensor([3, 1]), "3.0": torch.tensor([6]), "3.2": _mask(model[3][2])}


def test_sparsify_and_densify() -> None:
    model, x = _model(), torch.randn(2, 3, 5, 5)
    expected = model(x)
    created = sparsify_(model, _masks(model))
    assert {name: type(m) for name, m in created.items()} == {
        "0": RowSparseConv2d,
        "3.0": RowSparseLinear,
        "3.2": MaskedLinear,
    }
    assert sparse_modules(model) == created
    assert model[3][0] is created["3.0"]
    torch.testing.assert_close(model(x), expected)
    for module in created.values():
        _perturb_(module)
    perturbed = model(x)
    assert densify_(model) == 3
    assert sparse_modules(model) == {}
    assert [type(m) for m in (model[0], model[3][0], model[3][2])] == [nn.Conv2d, nn.Linear, nn.Linear]
    torch.testing.assert_close(model(x), perturbed)


def test_sparsified_model_per_sample_grads() -> None:
    model = _model()
    sparsify_(model, _masks(model))
    assert_per_sample_grads_match(model, torch.randn(3, 3, 5, 5))


def test_state_dict_is_dense_and_round_trips() -> None:
    dense = _model()
    masks = _masks(dense)
    sparse = copy.deepcopy(dense)
    sparsify_(sparse, masks)
    for module in sparse_modules(sparse).values():
        _perturb_(module)
    state = sparse.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in dense.state_dict().items()}

    dense.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(dense(x), sparse(x))

    # A dense state dict loads back into a fresh sparse model with the same rows, bit-exactly.
    fresh = _model()
    sparsify_(fresh, masks)
    trainable = {name: _trainable(m) for name, m in sparse_modules(fresh).items()}
    fresh.load_state_dict(dense.state_dict(), strict=True)
    for name, module in sparse_modules(fresh).items():
        assert _trainable(module) is trainable[name]
        assert torch.equal(module.weight, dense.get_submodule(name).weight)
        assert torch.equal(module.weight_old, dense.get_submodule(name).weight)
        assert torch.equal(_trainable(module), _trainable(sparse_modules(sparse)[name]))


def test_load_state_dict_reports_key_problems() -> None:
    sparse = RowSparseLinear.from_dense(_linear(), torch.tensor([0]))
    weight = torch.randn(5, 6)
    result = sparse.load_state_dict({"weight": weight, "extra": torch.ones(1)}, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["bias"], ["extra"])
    assert torch.equal(sparse.weight, weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        sparse.load_state_dict({"weight": weight})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        sparse.load_state_dict({"weight": torch.randn(6, 5), "bias": torch.randn(5)})


class _OverridesForward(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RowSparseLinear.from_dense(_linear(), [0, 1]), "rows"),
        (lambda: RowSparseLinear.from_dense(_linear(), torch.tensor([0.0])), "rows"),
        (lambda: RowSparseLinear.from_dense(_linear(), torch.tensor([[0]])), "rows"),
        (lambda: RowSparseLinear.from_dense(_linear(), torch.tensor([], dtype=torch.long)), "rows"),
        (lambda: RowSparseLinear.from_dense(_linear(), torch.tensor([0, 5])), r"rows must lie in \[0, 5\)"),
        (lambda: RowSparseLinear.from_dense(_linear(), torch.tensor([-1])), "rows"),
        (lambda: RowSparseConv2d.from_dense(_conv(), torch.tensor([2, 0, 2])), "rows must be unique, got 2"),
        (lambda: RowSparseLinear.from_dense(_conv(), torch.tensor([0])), "layer must be an nn.Linear"),
        (
            lambda: MaskedConv2d.from_dense(_OverridesForward(3, 4, 3), torch.ones(4, 3, 3, 3, dtype=torch.bool)),
            "layer",
        ),
        (
            lambda: RowSparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding_mode="reflect"), torch.tensor([0])),
            "padding_mode",
        ),
        (
            lambda: RowSparseConv2d.from_dense(nn.Conv2d(3, 4, 2, padding="same"), torch.tensor([0])),
            "padding",
        ),
        (lambda: MaskedLinear.from_dense(_linear(), torch.ones(6, 5, dtype=torch.bool)), "mask"),
        (lambda: MaskedLinear.from_dense(_linear(), torch.ones(5, 6)), "mask"),
        (lambda: MaskedLinear.from_dense(_linear(), torch.zeros(5, 6, dtype=torch.bool)), "mask"),
        (lambda: sparsify_(_model(), {"9": torch.tensor([0])}), "masks names '9'"),
        (lambda: sparsify_(_model(), {"1": torch.tensor([0])}), r"masks\['1'\] must name .* got ReLU"),
        (lambda: sparsify_(_model(), {"0": [0]}), r"masks\['0'\]"),
        (lambda: sparsify_(nn.MultiheadAttention(4, 2), {"out_proj": torch.tensor([0])}), "masks"),
        (lambda: densify_(RowSparseLinear.from_dense(_linear(), torch.tensor([0]))), "model"),
    ],
)
def test_bad_inputs_raise(build: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_sparsify_validates_before_modifying() -> None:
    model = _model()
    with pytest.raises(ValueError, match="rows"):
        sparsify_(model, {"0": torch.tensor([0]), "3.0": torch.tensor([99])})
    assert sparse_modules(model) == {}


def test_conv_same_padding_is_converted() -> None:
    dense = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
    sparse = RowSparseConv2d.from_dense(dense, torch.tensor([1]))
    x = torch.randn(2, 3, 7, 7)
    assert sparse.padding == (2, 2)
    torch.testing.assert_close(sparse(x), dense(x))
    assert_per_sample_grads_match(sparse, x)


def _randomize_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize(
    ("module", "input_shape"),
    [
        (LayerNorm(6), (4, 3, 6)),
        (LayerNorm2d(3), (4, 3, 5, 5)),
        (LayerScale(6), (4, 3, 6)),
        (LayerScale2d(3), (4, 3, 5, 5)),
    ],
    ids=["LayerNorm", "LayerNorm2d", "LayerScale", "LayerScale2d"],
)
def test_timm_per_sample_grads(module: nn.Module, input_shape: tuple[int, ...]) -> None:
    assert_per_sample_grads_match(_randomize_(module), torch.randn(input_shape), opacus_check=True)


def test_inplace_layer_scale_is_rejected() -> None:
    # Opacus' backward hooks already fail in forward for inplace=True; this is the sampler's own guard.
    layer, x = LayerScale(6, inplace=True), torch.randn(2, 6)
    with pytest.raises(ValueError, match="inplace"):
        compute_layer_scale_grad_sample(layer, [x], torch.ones(2, 6))


def test_every_sparse_type_has_a_grad_sampler() -> None:
    assert set(SPARSE_LAYER_TYPES) == {RowSparseLinear, RowSparseConv2d, MaskedLinear, MaskedConv2d}
    assert all(t in GradSampleModule.GRAD_SAMPLERS for t in SPARSE_LAYER_TYPES)
