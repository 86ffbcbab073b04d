"""The GPU paths against the same independent references as the CPU tests, on a CUDA device.

These run on the device machine (``pytest tests/test_gpu.py`` there); without a CUDA device they are
skipped: the CPU tests in test_strategy.py, test_sparse_layers.py and test_sparta.py cover the same
code. cuDNN's TF32 convolutions are turned off so that float32 comparisons keep float32 tolerances.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.sparse import RowSparseConv2d, RowSparseLinear
from test_clipping import CASES as CLIPPING_CASES
from test_clipping import _Loss, _reference, _run
from test_per_sample import assert_per_sample_grads_match as assert_hooked_grads_match
from test_per_sample import build as build_per_sample_case
from test_sparse_layers import SPARSE_CASES, _build, _perturb_, assert_per_sample_grads_match
from test_sparta import FRACTION, SCORED, SparseModule
from test_strategy import TinyModule, _clipped_sum_reference, _trainer
from test_torchvision_models import check_one_step_equals_clipped_sum

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (run on the device machine); the CPU tests cover the same code",
)


@pytest.fixture(autouse=True)
def _float32_convolutions():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_one_step_on_gpu_equals_clipped_sum(precision):
    """σ = 0, q = 1, micro-batches of 5: the update is -lr · Σ_i clip(g_i) / n, computed on the GPU."""
    L.seed_everything(0)
    module = TinyModule(batch_size=24)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    expected = _clipped_sum_reference(module, x, y, clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, physical_batch_size=5)
    _trainer(strategy, max_steps=1, accelerator="gpu", precision=precision).fit(module)
    assert next(module.parameters()).device.type == "cuda"
    for name, p in module.named_parameters():
        update, reference = before[name] - p.detach().cpu(), expected[name] / 24
        if precision == "32-true":
            torch.testing.assert_close(update, reference, atol=1e-6, rtol=1e-4)
        else:  # bf16 autocast: relative error of the whole update, as the strategy's own check measures it
            assert (update - reference).norm() / reference.norm() < 5e-2, name


def test_noise_std_on_gpu_matches_formula():
    """Zero gradients: the update is pure noise of std lr·σ·C/(q·n), drawn on the GPU; tolerance 6%."""
    L.seed_everything(1)
    module = TinyModule(zero_loss=True, batch_size=12, width=600, lr=0.5)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    strategy = DPStrategy(noise_multiplier=2.0, max_grad_norm=0.3)
    _trainer(strategy, max_steps=1, accelerator="gpu").fit(module)
    update = torch.cat([p.detach().flatten().cpu() for p in module.parameters()]) - before
    expected = 0.5 * 2.0 * 0.3 / (12 / 24 * 24)
    assert abs(update.std().item() / expected - 1) < 0.06
    assert abs(update.mean().item()) < 4 * expected / math.sqrt(update.numel())


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_per_sample_grads_on_gpu(case):
    _, sparse, x = _build(case)
    _perturb_(sparse)
    assert_per_sample_grads_match(sparse.cuda(), x.cuda())


def test_sparta_on_gpu_keeps_frozen_rows_bit_identical(tmp_path):
    """Warm-up, private scoring and the row-sparse phase on the GPU; frozen rows never change."""
    L.seed_everything(0)
    module = SparseModule()
    pretrained = {k: v.clone() for k, v in module.state_dict().items()}
    callback = SpartaMaskCallback(mask_epoch=1, trainable_fraction=FRACTION)
    trainer = L.Trainer(
        strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3),
        accelerator="gpu",
        devices=1,
        max_epochs=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    state = {k: v.cpu() for k, v in module.state_dict().items()}
    for layer in SCORED:
        rows = callback.mask[layer]
        frozen = torch.ones(state[f"{layer}.weight"].shape[0], dtype=torch.bool)
        frozen[rows] = False
        assert torch.equal(state[f"{layer}.weight"][frozen], pretrained[f"{layer}.weight"][frozen])
        assert (state[f"{layer}.weight"][rows] != pretrained[f"{layer}.weight"][rows]).flatten(1).any(1).all()
        assert isinstance(module.get_submodule(layer), RowSparseConv2d | RowSparseLinear)
    assert trainer.strategy.steps == 3 * 4  # the scoring epoch's steps are accounted too


def check_clipping_case(layer, inputs, device: str) -> None:
    """The ghost engine's norms and clipped sums of one layer case on ``device`` equal torch.func's there."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(layer(), _Loss()).double().to(device)
    x = inputs(g)
    x = (x.double() if x.is_floating_point() else x).to(device)
    reference = _reference(model, x)
    norms2, factors, signed, absolute, _, _ = _run(model, x, "auto")
    expected = torch.stack([r.flatten(1).square().sum(1) for r in reference.values()]).sum(0)
    torch.testing.assert_close(norms2.double(), expected, rtol=1e-5, atol=0)
    for key, r in reference.items():
        f = factors.double().to(r.device)
        torch.testing.assert_close(signed[key].double(), torch.einsum("i,i...->...", f, r), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(
            absolute[key].double(), torch.einsum("i,i...->...", f, r.abs()), rtol=1e-5, atol=1e-12
        )


@pytest.mark.parametrize(("name", "layer", "inputs"), CLIPPING_CASES, ids=[c[0] for c in CLIPPING_CASES])
def test_clipping_engine_on_gpu_equals_torch_func(name, layer, inputs):
    """Every ghost form (standardised convs included) and its materialised path, on the GPU."""
    check_clipping_case(layer, inputs, "cuda")


REPLAY_CASES = [
    "replay_buffers_kwargs",
    "replay_timm_efficientformer",
    "std_conv",
    "scaled_std_conv_groups",
    "beit",
    "eva02",
]


def check_per_sample_case(case: str, device: str) -> None:
    """The per-sample replay, the standardised-conv sampler and the BEiT/EVA paths on ``device``."""
    model, x, y, loss_fn = build_per_sample_case(case, torch.float32)
    assert_hooked_grads_match(model.to(device), x.to(device), y.to(device), loss_fn, "mean")


@pytest.mark.parametrize("case", REPLAY_CASES)
def test_per_sample_paths_on_gpu_equal_torch_func(case):
    check_per_sample_case(case, "cuda")


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2", "convnext"])
def test_torchvision_transformers_on_gpu_equal_torch_func(name):
    """nn.MultiheadAttention and Swin's window attention replayed with their functional children on CUDA."""
    check_one_step_equals_clipped_sum(name, accelerator="gpu")


@pytest.mark.parametrize("clipping", ["per_sample", "auto"])
def test_a_non_finite_sample_is_left_out_on_gpu(clipping):
    """The NaN sample's rows are zeroed on the device; the update is the clipped sum over the others."""
    from test_privacy_holes import _NormedModule, _poisoned

    L.seed_everything(0)
    module = _NormedModule(dataset=_poisoned(math.nan), batch_size=24)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    x, y = module.dataset.tensors
    keep = torch.arange(24) != 3
    expected = _clipped_sum_reference(module, x[keep], y[keep], clip=0.05)
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.05, clipping=clipping, physical_batch_size=5)
    with pytest.warns(UserWarning, match="not finite"):
        _trainer(strategy, max_steps=1, accelerator="gpu").fit(module)
    for name, p in module.named_parameters():
        torch.testing.assert_close(before[name] - p.detach().cpu(), expected[name] / 24, atol=1e-6, rtol=1e-4)


def test_parameters_changed_during_a_step_are_refused_on_gpu():
    """The state watch compares device tensors bit for bit, and restores them on the device."""
    from test_privacy_holes import _flat, _WeightFromBatch

    module = _WeightFromBatch(through_data=True)
    before = _flat(module)
    with pytest.raises(RuntimeError, match=r"parameters net\.0\.weight changed during `training_step`"):
        _trainer(DPStrategy(noise_multiplier=1.0), accelerator="gpu").fit(module)
    assert torch.equal(_flat(module).cpu(), before)
