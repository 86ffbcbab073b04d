"""SpartaMaskCallback in a real Trainer: scores, masks, phases, optimizer state, resume, bad input."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import nullcontext

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.privacy import epsilon_for
from lightning_sparta.privacy.validation import IncompatibleModelError
from lightning_sparta.sparse import (
    MaskedConv2d,
    MaskedLinear,
    RowSparseConv2d,
    RowSparseLinear,
    densify_,
    get_selector,
    register_selector,
    registered_selectors,
)
from lightning_sparta.sparse.selectors import MagnitudeSelector, MaskSelector, num_kept, top_elements, top_rows

N, BATCH = 32, 8  # q = 1/4, four Poisson steps per epoch
SCORED = ("net.conv", "net.fc")
FRACTION = 0.3
SCORING_SELECTORS = ("sparta", "dp_gradient", "oracle")


class Net(nn.Module):
    """Conv2d → GroupNorm → Linear → LayerNorm → head, with timm's ``get_classifier()``."""

    def __init__(self, groups: int = 1, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, groups=groups)
        self.norm = nn.BatchNorm2d(6) if batch_norm else nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6 * 16, 10)
        self.norm2 = nn.LayerNorm(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.norm2(self.fc(x))))

    def get_classifier(self) -> nn.Module:
        return self.head


class HeadlessNet(Net):
    get_classifier = None  # type: ignore[assignment]


class ConvOnlyNet(nn.Module):
    """No `get_classifier()` and no Linear layer: a 1x1 conv classifies (SqueezeNet-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x))).mean((2, 3))


def _data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


class SparseModule(L.LightningModule):
    """SGD with momentum in two param groups (head: larger LR) and a StepLR schedule."""

    def __init__(self, net: nn.Module | None = None, batch_size: int = BATCH, head_only_optimizer: bool = False):
        super().__init__()
        self.net = net if net is not None else Net()
        self.dataset = _data()
        self.batch_size = batch_size
        self.head_only_optimizer = head_only_optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        head = list(self.net.head.parameters())
        rest = [p for p in self.parameters() if all(p is not h for h in head)]
        groups = [{"params": head, "lr": 0.2}]
        if not self.head_only_optimizer:
            groups.append({"params": rest, "lr": 0.05})
        optimizer = torch.optim.SGD(groups, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size)


class Probe(Callback):
    """Records per epoch: optimizer steps, trainable names, weights, head momentum and a fixed output."""

    def __init__(self) -> None:
        self.steps: dict[int, int] = defaultdict(int)
        self.trainable: dict[int, list[str]] = {}
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}
        self.momentum_start: dict[int, torch.Tensor] = {}
        self.momentum_end: dict[int, torch.Tensor] = {}
        self.output_end: dict[int, torch.Tensor] = {}
        self.x = _data(4, seed=9).tensors[0]

    def on_fit_start(self, trainer, pl_module):
        def count(*_):
            self.steps[trainer.current_epoch] += 1

        trainer.optimizers[0].register_step_post_hook(count)

    def _momentum(self, trainer, pl_module) -> torch.Tensor | None:
        state = trainer.optimizers[0].state.get(pl_module.net.head.weight, {})
        buf = state.get("momentum_buffer")
        return None if buf is None else buf.clone()

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.trainable[epoch] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        self.start[epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.momentum_start[epoch] = self._momentum(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        self.end[epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.momentum_end[epoch] = self._momentum(trainer, pl_module)
        with torch.no_grad():
            self.output_end[epoch] = pl_module(self.x)


def _fit(
    tmp_path,
    selector: str = "sparta",
    mask_epoch: int = 1,
    max_epochs: int = 3,
    sigma: float = 1.0,
    clip: float = 1.0,
    module: SparseModule | None = None,
    callback_kwargs: dict | None = None,
    extra_callbacks: tuple = (),
    strategy: object | None = None,
    ckpt_path=None,
    **trainer_kwargs,
):
    """Fit with a SpartaMaskCallback between two probes; returns (module, callback, trainer, before, after)."""
    L.seed_everything(0)
    module = module if module is not None else SparseModule()
    kwargs = {"trainable_fraction": FRACTION, "allow_non_private": selector == "oracle", **(callback_kwargs or {})}
    callback = SpartaMaskCallback(mask_epoch=mask_epoch, selector=selector, **kwargs)
    before, after = Probe(), Probe()
    if strategy is None:
        strategy = DPStrategy(noise_multiplier=sigma, max_grad_norm=clip, seed=3)
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    trainer = L.Trainer(
        strategy=strategy, callbacks=[before, callback, after, *extra_callbacks], **{**defaults, **trainer_kwargs}
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, callback, trainer, before, after


ALWAYS = [
    "net.conv.bias",
    "net.fc.bias",
    "net.head.bias",
    "net.head.weight",
    "net.norm.bias",
    "net.norm.weight",
    "net.norm2.bias",
    "net.norm2.weight",
]
NORMS_AND_HEAD = [
    "net.head.bias",
    "net.head.weight",
    "net.norm.bias",
    "net.norm.weight",
    "net.norm2.bias",
    "net.norm2.weight",
]
ALL = sorted([*ALWAYS, "net.conv.weight", "net.fc.weight"])


# ---------------------------------------------------------------------------------------------- selectors
def test_registry_and_helpers():
    assert {*SCORING_SELECTORS, "random", "magnitude", "all", "last", "bitfit", "layers"} <= set(registered_selectors())
    with pytest.raises(ValueError, match="already registered"):
        register_selector("magnitude", MagnitudeSelector())
    register_selector("mp_copy", MagnitudeSelector())
    register_selector("mp_copy", MagnitudeSelector(), force=True)
    assert isinstance(get_selector("mp_copy"), MagnitudeSelector)
    with pytest.raises(ValueError, match=r"registered selectors: \['all'"):
        get_selector("nope")
    with pytest.raises(ValueError, match="`selector` must be a MaskSelector"):
        register_selector("bad", object())  # type: ignore[arg-type]
    assert (num_kept(0.2, 10), num_kept(1e-9, 10), num_kept(1.0, 7)) == (2, 1, 7)
    # ties: the lower row index wins; result sorted ascending
    assert top_rows(torch.ones(5, 3), 0.4).tolist() == [0, 1]
    assert top_rows(torch.tensor([[0.0], [2.0], [1.0], [2.0]]), 0.5).tolist() == [1, 3]
    assert top_elements(torch.tensor([[1.0, 1.0], [1.0, 5.0]]), 0.5).tolist() == [[True, False], [False, True]]
    w = {"a": torch.randn(4, 5)}
    random = get_selector("random")
    m1 = random.select(w, None, 0.25, torch.Generator().manual_seed(1))["a"]
    m2 = random.select(w, None, 0.25, torch.Generator().manual_seed(1))["a"]
    assert torch.equal(m1, m2)
    assert m1.dtype == torch.bool
    assert int(m1.sum()) == 5
    mp = get_selector("magnitude").select(w, None, 0.25)["a"]
    assert w["a"].abs()[mp].min() >= w["a"].abs()[~mp].max()
    with pytest.raises(ValueError, match="needs the scores"):
        get_selector("sparta").select(w, None, 0.5)
    with pytest.raises(ValueError, match=r"no scores for layers \['a'\]"):
        get_selector("sparta").select(w, {"b": torch.ones(4, 5)}, 0.5)

    class Incomplete(MaskSelector):
        name = "incomplete"

    with pytest.raises(NotImplementedError, match="must implement `select_layer`"):
        Incomplete().select(w, None, 0.5)


# ---------------------------------------------------------------------------------------------- scores
def _reference_scores(state, trainable, x, y, clip, scoring):
    """Per-sample gradients with torch.func over the trainable set, clipped jointly, per scoring mode."""
    net = Net()
    params = {k.removeprefix("net."): v for k, v in state.items()}
    keys = [k.removeprefix("net.") for k in trainable]

    def loss_one(trained, xi, yi):
        return F.cross_entropy(functional_call(net, {**params, **trained}, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))({k: params[k] for k in keys}, x, y)
    norms = torch.stack([g.reshape(len(x), -1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any(), "clipping should be active in this test"
    result = {}
    for layer in SCORED:
        g = per_sample[layer.removeprefix("net.") + ".weight"]
        if scoring == "sparta":
            result[layer] = torch.einsum("i,i...->...", factor, g.abs())
        elif scoring == "dp_gradient":
            result[layer] = torch.einsum("i,i...->...", factor, g)
        else:
            result[layer] = g.abs().sum(0)
    return result


@pytest.mark.filterwarnings("ignore:.*NOT differentially private")
@pytest.mark.parametrize("selector", SCORING_SELECTORS)
def test_scores_and_mask_match_hand_computation(tmp_path, selector):
    """σ = 0, q = 1: the scoring epoch is one batch of all samples; scores are computed by hand."""
    module = SparseModule(batch_size=N)  # batch_size == n: q = 1, every sample in the single step
    clip = 0.05
    _, callback, trainer, before, after = _fit(tmp_path, selector, sigma=0.0, clip=clip, module=module)
    assert trainer.strategy.steps_per_epoch == 1
    assert after.trainable[1] == ALL  # scoring: scored weights + the always-trainable set
    x, y = module.dataset.tensors
    expected = _reference_scores(after.start[1], after.trainable[1], x, y, clip, selector)
    assert set(callback.scores) == set(SCORED)
    for layer in SCORED:
        torch.testing.assert_close(callback.scores[layer], expected[layer], rtol=1e-4, atol=1e-7)
        weight = after.start[1][f"{layer}.weight"]
        mask = callback.mask[layer]
        if selector == "sparta":
            assert mask.dtype == torch.long
            assert mask.tolist() == sorted(mask.tolist())
            assert mask.numel() == math.ceil(FRACTION * weight.shape[0])
            assert torch.equal(mask, top_rows(expected[layer], FRACTION))
            row_scores = expected[layer].reshape(weight.shape[0], -1).sum(1)
            chosen = torch.zeros(weight.shape[0], dtype=torch.bool)
            chosen[mask] = True
            assert row_scores[chosen].min() >= row_scores[~chosen].max()
        else:
            ranked = expected[layer].abs()
            assert mask.dtype == torch.bool
            assert mask.shape == weight.shape
            assert int(mask.sum()) == math.ceil(FRACTION * weight.numel())
            assert torch.equal(mask, top_elements(ranked, FRACTION))
    # no optimizer step in the scoring epoch, so no weight moved (`before` sees the epoch end before the swap)
    assert after.steps[1] == 0
    for name, value in after.start[1].items():
        assert torch.equal(value, before.end[1][name]), name


def test_epsilon_equals_plain_dp_sgd(tmp_path):
    """Prop. 4.2: T epochs of SPARTA (scoring epoch included) cost exactly T epochs of DP-SGD."""
    _, _, trainer, _, _ = _fit(tmp_path, "sparta", sigma=1.0, max_epochs=3)
    strategy = trainer.strategy
    assert strategy.steps_per_epoch == 4
    assert strategy.steps == 12
    expected = epsilon_for([(1.0, BATCH / N, 12)], delta=1e-5, accountant="prv")
    assert strategy.epsilon() == pytest.approx(expected, rel=1e-12)
    L.seed_everything(0)
    plain = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    L.Trainer(
        strategy=plain,
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(SparseModule())
    assert plain.epsilon() == pytest.approx(strategy.epsilon(), rel=1e-12)


# ---------------------------------------------------------------------------------------------- one SPARTA run
@pytest.fixture(scope="module")
def sparta_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sparta")
    module = SparseModule()
    pretrained = {k: v.clone() for k, v in module.state_dict().items()}
    logger = TensorBoardLogger(tmp_path, name="tb")
    result = _fit(tmp_path, "sparta", mask_epoch=1, max_epochs=3, module=module, logger=logger)
    return (*result, pretrained, logger)


def test_frozen_rows_bit_identical_selected_rows_trained(sparta_run):
    module, callback, _, _, _, pretrained, _ = sparta_run
    state = module.state_dict()
    assert set(state) == set(pretrained)  # dense keys only
    for layer in SCORED:
        rows = callback.mask[layer]
        frozen = torch.ones(state[f"{layer}.weight"].shape[0], dtype=torch.bool)
        frozen[rows] = False
        assert torch.equal(state[f"{layer}.weight"][frozen], pretrained[f"{layer}.weight"][frozen])
        changed = (state[f"{layer}.weight"][rows] != pretrained[f"{layer}.weight"][rows]).flatten(1).any(1)
        assert changed.all()
        assert rows.numel() == math.ceil(FRACTION * state[f"{layer}.weight"].shape[0])
        sparse = module.get_submodule(layer)
        assert isinstance(sparse, RowSparseConv2d if "conv" in layer else RowSparseLinear)
        assert torch.equal(sparse.to_dense().weight, state[f"{layer}.weight"])


def test_phases_and_optimizer_state(sparta_run):
    module, callback, trainer, before, after = sparta_run[:5]
    assert callback.phase == "masked"
    assert after.trainable[0] == ALWAYS  # bitfit warm-up
    assert after.trainable[1] == ALL  # scoring epoch
    assert after.trainable[2] == sorted([*ALWAYS, "net.conv.weight_rows", "net.fc.weight_rows"])
    assert dict(after.steps) == {0: 4, 2: 4}  # no optimizer step during the scoring epoch
    # the head's momentum does not change during scoring, and survives the swap
    assert torch.equal(before.momentum_end[0], after.momentum_start[2])
    optimizer = trainer.optimizers[0]
    head_group, rest_group = optimizer.param_groups
    for layer in SCORED:
        new = module.get_submodule(layer).weight_rows
        assert any(p is new for p in rest_group["params"])
        assert not any(p is new for p in head_group["params"])
        assert "momentum_buffer" in optimizer.state[new]
    assert rest_group["lr"] == pytest.approx(0.05 * 0.5**3)  # the schedule went on
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters()}  # no stale dense weight left
    assert len(optimizer.state) == len([p for p in module.parameters() if p.requires_grad])
    # the swap at the end of the scoring epoch leaves the forward unchanged
    torch.testing.assert_close(before.output_end[1], after.output_end[1], rtol=0, atol=1e-6)


def test_trained_state_dict_loads_into_dense_model_and_densify(sparta_run):
    module = sparta_run[0]
    x = _data(5, seed=4).tensors[0]
    module.eval()
    with torch.no_grad():
        expected = module(x)
    dense = Net()
    dense.load_state_dict(module.net.state_dict())
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), expected, rtol=0, atol=1e-6)
    net = module.net
    assert densify_(net) == 2
    assert type(net.conv) is nn.Conv2d
    assert type(net.fc) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)


def test_mask_saved_and_logged(sparta_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, callback, _, _, _, _, logger = sparta_run
    saved = torch.load(f"{logger.log_dir}/sparta_mask.pt")
    assert saved["selector"] == "sparta"
    assert saved["trainable_fraction"] == FRACTION
    for layer in SCORED:
        assert torch.equal(saved["mask"][layer], callback.mask[layer])
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for layer in SCORED:
        assert f"sparta/kept_fraction/{layer}" in tags["scalars"]
        assert f"sparta/scores/{layer}" in tags["histograms"]
        assert f"sparta/mask/{layer}" in tags["images"]
    value = events.Scalars("sparta/kept_fraction/net.fc")[0].value
    assert value == pytest.approx(math.ceil(FRACTION * 10) / 10)


# ---------------------------------------------------------------------------------------------- every selector
FINAL_SETS = {
    "sparta": sorted([*ALWAYS, "net.conv.weight_rows", "net.fc.weight_rows"]),
    "dp_gradient": sorted([*ALWAYS, "net.conv.weight_values", "net.fc.weight_values"]),
    "oracle": sorted([*ALWAYS, "net.conv.weight_values", "net.fc.weight_values"]),
    "magnitude": sorted([*ALWAYS, "net.conv.weight_values", "net.fc.weight_values"]),
    "random": sorted([*ALWAYS, "net.conv.weight_values", "net.fc.weight_values"]),
    "all": ALL,
    "last": NORMS_AND_HEAD,
    "bitfit": ALWAYS,
    "layers": sorted([*ALWAYS, "net.fc.weight"]),  # the last block: net.fc (layers outside numbered blocks)
}


@pytest.mark.parametrize(("selector", "warmup"), [*((s, "bitfit") for s in FINAL_SETS), ("magnitude", "full")])
def test_every_selector_trains_its_set(tmp_path, selector, warmup):
    warns = pytest.warns(UserWarning, match="NOT differentially private") if selector == "oracle" else nullcontext()
    with warns:
        module, callback, trainer, _, after = _fit(
            tmp_path, selector, mask_epoch=1, max_epochs=3, callback_kwargs={"warmup": warmup, "seed": 5}
        )
    assert after.trainable[0] == (ALWAYS if warmup == "bitfit" else ALL)
    scoring = selector in SCORING_SELECTORS
    # a scoring epoch takes no optimizer step; data-free selectors and fixed sets train in epoch T0
    assert after.steps[1] == (0 if scoring else 4)
    assert after.steps[2] == 4
    assert after.trainable[2] == FINAL_SETS[selector]
    if not scoring:
        assert after.trainable[1] == FINAL_SETS[selector]
    first_sparse = 2 if scoring else 1
    # exactly the final set moves during the sparse phase; everything else keeps its value
    start, end = after.start[first_sparse], after.end[2]
    for name in start:
        moved = not torch.equal(start[name], end[name])
        layer = name.rpartition(".")[0]
        trained = (
            name in FINAL_SETS[selector]
            or (name.endswith(".weight") and f"{layer}.weight_rows" in FINAL_SETS[selector])
            or (name.endswith(".weight") and f"{layer}.weight_values" in FINAL_SETS[selector])
        )
        assert moved == trained, name
    if selector in ("all", "last", "bitfit", "layers"):
        assert callback.mask == {}
        assert all(type(module.get_submodule(layer)) in (nn.Conv2d, nn.Linear) for layer in SCORED)
    else:
        for layer in SCORED:
            kind = (RowSparseConv2d, RowSparseLinear) if selector == "sparta" else (MaskedConv2d, MaskedLinear)
            assert isinstance(module.get_submodule(layer), kind)
    if selector == "oracle":
        assert trainer.strategy.epsilon() == math.inf
        assert "oracle" in trainer.strategy.non_private_reason
    else:
        assert math.isfinite(trainer.strategy.epsilon())


def test_mask_epoch_zero_and_data_free_selector_without_dp_strategy(tmp_path):
    """MP as in the paper: sparse from the first epoch; a data-free selector needs no DPStrategy."""
    _, callback, _, _, after = _fit(tmp_path, "magnitude", mask_epoch=0, max_epochs=1, strategy="auto")
    assert after.trainable[0] == FINAL_SETS["magnitude"]
    assert after.steps[0] == 4
    for layer in SCORED:
        weight = after.start[0][f"{layer}.weight"]
        assert torch.equal(callback.mask[layer], top_elements(weight.abs(), FRACTION))


# ---------------------------------------------------------------------------------------------- resume
def _resumable_fit(tmp_path, ckpt_path=None, save: bool = False):
    callbacks = ()
    if save:
        callbacks = (
            ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=5, save_top_k=-1),
            ModelCheckpoint(dirpath=tmp_path / "epochs", every_n_epochs=1, save_top_k=-1),
            # every 8 steps = in on_train_batch_end of every second epoch's last batch
            ModelCheckpoint(dirpath=tmp_path / "last_batch", every_n_train_steps=8, save_top_k=-1),
        )
    return _fit(
        tmp_path,
        "sparta",
        mask_epoch=1,
        max_epochs=4,
        extra_callbacks=callbacks,
        enable_checkpointing=save,
        ckpt_path=ckpt_path,
    )[:3]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    return tmp_path, *_resumable_fit(tmp_path, save=True)


@pytest.mark.parametrize(
    ("checkpoint", "phase"),
    [
        ("epochs/epoch=0-step=4.ckpt", "warmup"),
        ("steps/epoch=1-step=5.ckpt", "scoring"),
        ("epochs/epoch=1-step=8.ckpt", "masked"),
        ("last_batch/epoch=1-step=8.ckpt", "scoring"),
        ("steps/epoch=2-step=10.ckpt", "masked"),
    ],
    ids=["end-of-warmup", "mid-scoring", "end-of-scoring", "last-batch-of-scoring", "mid-sparse"],
)
def test_resume_gives_bit_identical_weights(uninterrupted, checkpoint, phase):
    """Resume from a checkpoint in every phase; the final weights equal the uninterrupted run's bit for bit."""
    tmp_path, full, full_callback, full_trainer = uninterrupted
    assert (tmp_path / "steps" / "sparta_mask.pt").is_file()  # saved next to the checkpoints too
    saved = torch.load(tmp_path / checkpoint, weights_only=False)["callbacks"]["SpartaMaskCallback"]
    assert saved["phase"] == phase
    assert (saved["scoring_sums"] is not None) == (phase == "scoring")
    resumed, callback, trainer = _resumable_fit(tmp_path / "resumed", ckpt_path=tmp_path / checkpoint)
    assert trainer.strategy.steps == full_trainer.strategy.steps == 16
    assert trainer.strategy.epsilon() == full_trainer.strategy.epsilon()
    for layer in SCORED:
        assert torch.equal(callback.mask[layer], full_callback.mask[layer])
        if phase != "masked":  # scored after the resume (partly, for mid-scoring): same noisy sums
            assert torch.equal(callback.scores[layer], full_callback.scores[layer])
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    for name, value in full_state.items():
        assert torch.equal(value, resumed_state[name]), name
    optimizer, full_optimizer = trainer.optimizers[0], full_trainer.optimizers[0]
    for p, q in zip(resumed.parameters(), full.parameters(), strict=True):
        if "momentum_buffer" in full_optimizer.state.get(q, {}):
            assert torch.equal(optimizer.state[p]["momentum_buffer"], full_optimizer.state[q]["momentum_buffer"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no step in the scoring epoch
def test_second_fit_continues_sparse(tmp_path):
    """Fitting the trained module again with the same callback keeps the mask and the frozen rows."""
    module = SparseModule()
    pretrained = {k: v.clone() for k, v in module.state_dict().items()}
    _, callback, _, _, _ = _fit(tmp_path, "sparta", mask_epoch=0, max_epochs=2, module=module)
    mask = {k: v.clone() for k, v in callback.mask.items()}
    probe = Probe()
    trainer = L.Trainer(
        strategy=DPStrategy(noise_multiplier=1.0, seed=4),
        callbacks=[callback, probe],
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert probe.trainable[0] == FINAL_SETS["sparta"]
    assert probe.steps[0] == 4
    state = module.state_dict()
    for layer in SCORED:
        assert torch.equal(callback.mask[layer], mask[layer])
        frozen = torch.ones(state[f"{layer}.weight"].shape[0], dtype=torch.bool)
        frozen[mask[layer]] = False
        assert torch.equal(state[f"{layer}.weight"][frozen], pretrained[f"{layer}.weight"][frozen])


def test_checkpoint_state_round_trip_and_selector_mismatch():
    callback = SpartaMaskCallback(mask_epoch=2, selector="sparta")
    callback.load_state_dict(
        {
            "phase": "masked",
            "selector": "sparta",
            "trainable_fraction": 0.2,
            "mask_epoch": 2,
            "seed": 1,
            "mask": {"net.fc": torch.tensor([1, 4])},
            "scoring_sums": None,
        }
    )
    state = callback.state_dict()
    assert state["phase"] == "masked"
    assert torch.equal(state["mask"]["net.fc"], torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="`selector`='magnitude'"):
        SpartaMaskCallback(selector="sparta").load_state_dict({**state, "selector": "magnitude"})
    with pytest.warns(UserWarning, match="`mask_epoch`=2"):
        SpartaMaskCallback(mask_epoch=3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trainable_fraction": 0.0}, "trainable_fraction"),
        ({"trainable_fraction": 1.5}, "trainable_fraction"),
        ({"trainable_fraction": True}, "trainable_fraction"),
        ({"mask_epoch": -1}, "mask_epoch"),
        ({"mask_epoch": 1.0}, "mask_epoch"),
        ({"selector": "nope"}, r"selector.*registered selectors: \["),
        ({"selector": 3}, "selector"),
        ({"warmup": "none"}, "warmup"),
        ({"selector": "oracle"}, "allow_non_private"),
        ({"layer_filter": "conv"}, "layer_filter"),
        ({"head": 3}, "head"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpartaMaskCallback(**kwargs)


@pytest.mark.parametrize(
    ("module", "kwargs", "error", "match"),
    [
        (None, {"mask_epoch": 3}, ValueError, "mask_epoch"),
        (None, {"strategy": "auto"}, TypeError, "DPStrategy"),
        (
            SparseModule(Net(batch_norm=True)),
            {"strategy": DPStrategy(noise_multiplier=1.0, batchnorm="refuse")},
            IncompatibleModelError,
            "BatchNorm",
        ),
        (
            None,
            {"callback_kwargs": {"layer_filter": lambda m, n: False}},
            ValueError,
            "no layer to score.*layer_filter",
        ),
        (SparseModule(ConvOnlyNet()), {}, ValueError, r"no Linear layer.*head="),
        (None, {"callback_kwargs": {"head": "net.nothing"}}, ValueError, "`head`"),
        (SparseModule(head_only_optimizer=True), {}, ValueError, "optimizer.*net.conv.bias"),
    ],
    ids=["mask_epoch", "strategy", "batchnorm", "no-layer", "no-head", "head-name", "optimizer"],
)
def test_refused_configurations(tmp_path, module, kwargs, error, match):
    with pytest.raises(error, match=match):
        _fit(tmp_path, "sparta", module=module, **kwargs)


def test_head_defaults_to_the_last_linear_layer_and_says_so(tmp_path, caplog):
    """Without `get_classifier()` (torchvision's models) the head is the last Linear layer, named in the log."""
    module = SparseModule(HeadlessNet())
    with caplog.at_level(logging.INFO, logger="lightning_sparta"):
        _, callback, _, _, _ = _fit(tmp_path, "sparta", module=module, max_epochs=2)
    assert callback._head_ids == {id(module.net.head)}
    assert "the classifier head is `net.head`, its last Linear layer" in caplog.text


def test_explicit_head_and_layer_filter(tmp_path):
    """`head=` and `layer_filter` narrow the roles; the filtered-out layer and its bias stay frozen."""
    module = SparseModule(HeadlessNet())
    with pytest.warns(UserWarning, match="mask is scored but never trained"):
        _, callback, _, _, after = _fit(
            tmp_path,
            "sparta",
            module=module,
            max_epochs=2,
            callback_kwargs={"head": module.net.head, "layer_filter": lambda m, n: isinstance(m, nn.Linear)},
        )
    assert callback.scored_layers == ["net.fc"]
    assert after.trainable[1] == sorted([*NORMS_AND_HEAD, "net.fc.bias", "net.fc.weight"])
    assert list(callback.mask) == ["net.fc"]
