"""Small DP-compatible models for the Fashion-MNIST demo and a plain classification LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "MODEL_REGISTRY",
    "ClassifierModule",
    "GroupNormCNN",
    "WarmupCosineSchedule",
    "create_model",
]


class GroupNormCNN(nn.Module):
    """A small CNN built only from layers that support per-sample gradients (no BatchNorm).

    Three blocks ``Conv2d(3×3) → GroupNorm → ReLU`` with 32, 64 and 64 channels (the first two followed
    by 2×2 max pooling), global average pooling and a linear ``head``. Any input size of at least 4×4
    works; about 56k parameters for five classes.

    Args:
        num_classes: Number of output classes.
        in_chans: Number of input channels.
        channels: Output channels of the three convolution blocks.
        groups: Number of GroupNorm groups (must divide every entry of ``channels``).

    Raises:
        ValueError: If ``num_classes`` or ``in_chans`` is not positive, or ``groups`` does not divide a
            channel count.

    Example:
        >>> model = GroupNormCNN(num_classes=5)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5])
        >>> model.reset_classifier(3)
        >>> model.get_classifier()
        Linear(in_features=64, out_features=3, bias=True)
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        channels: tuple[int, int, int] = (32, 64, 64),
        groups: int = 8,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
        if in_chans < 1:
            raise ValueError(f"`in_chans` must be a positive integer, got {in_chans!r}.")
        if any(c % groups for c in channels):
            raise ValueError(f"`groups` must divide every entry of `channels`={channels}, got {groups!r}.")
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, kernel_size=3, padding=1),
            nn.GroupNorm(groups, c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.GroupNorm(groups, c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.GroupNorm(groups, c3),
            nn.ReLU(),
        )
        self.num_features = c3
        self.num_classes = num_classes
        self.head = nn.Linear(c3, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, num_features]``."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_chans, H, W]``."""
        return self.head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classification head (same name as timm's API)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised ``Linear(num_features, num_classes)``.

        The new head is created on the old head's device and dtype.

        Args:
            num_classes: Number of classes of the new head.

        Raises:
            ValueError: If ``num_classes`` is not positive.
        """
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
        old = self.head.weight
        self.head = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        self.num_classes = num_classes


def _gn_cnn(num_classes: int, image_size: int) -> nn.Module:
    return GroupNormCNN(num_classes=num_classes)


def _vit_tiny(num_classes: int, image_size: int) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=image_size,
        patch_size=4,
        in_chans=1,
        num_classes=num_classes,
        depth=4,
    )


#: Known model names for :func:`create_model`, each a factory ``(num_classes, image_size) -> nn.Module``.
MODEL_REGISTRY: dict[str, Callable[[int, int], nn.Module]] = {
    "gn_cnn": _gn_cnn,
    "vit_tiny": _vit_tiny,
}


def create_model(name: str, num_classes: int, image_size: int = 28) -> nn.Module:
    """Create a single-channel image classifier by name.

    ``"gn_cnn"`` is :class:`GroupNormCNN`; ``"vit_tiny"`` is timm's ViT-Tiny (embedding 192, 3 heads)
    cut to 4 blocks with 4×4 patches and one input channel (about 1.8M parameters), randomly initialised.

    Args:
        name: A key of :data:`MODEL_REGISTRY`.
        num_classes: Number of output classes.
        image_size: Side of the square input images (ViT patches need a multiple of 4).

    Returns:
        The model; it exposes ``get_classifier()`` and ``reset_classifier(num_classes)``.

    Raises:
        ValueError: If ``name`` is unknown or ``image_size`` does not suit the model.

    Example:
        >>> create_model("gn_cnn", num_classes=5)(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 5])
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model `name`={name!r}; known names: {sorted(MODEL_REGISTRY)}.")
    if name == "vit_tiny" and image_size % 4:
        raise ValueError(f"`image_size` must be a multiple of 4 for {name!r} (4×4 patches), got {image_size}.")
    return MODEL_REGISTRY[name](num_classes, image_size)


class WarmupCosineSchedule:
    """Learning-rate factor for ``LambdaLR``: linear warm-up, then cosine decay to 0 (or constant).

    ``factor(step) = (step + 1) / warmup_steps`` during warm-up, then ``0.5 * (1 + cos(pi * progress))``
    with ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to ``[0, 1]``;
    ``1`` after warm-up when ``cosine`` is False. A class rather than a lambda so that schedulers stay
    picklable.

    Args:
        warmup_steps: Number of warm-up steps (0 for none).
        total_steps: Total number of optimizer steps.
        cosine: Whether to decay with a cosine after warm-up.

    Example:
        >>> schedule = WarmupCosineSchedule(warmup_steps=2, total_steps=6)
        >>> [round(schedule(s), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """

    def __init__(self, warmup_steps: int, total_steps: int, cosine: bool = True) -> None:
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps!r}.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class ClassifierModule(L.LightningModule):
    """Image classification with cross-entropy, SGD with momentum and a warm-up + cosine LR schedule.

    Logs ``train_loss``/``train_acc`` per step and epoch, ``val_loss``/``val_acc`` and
    ``test_loss``/``test_acc`` per epoch (accuracy is the plain fraction of correct predictions).

    Args:
        model: The network mapping images to logits.
        num_classes: Number of classes; inferred from ``model.get_classifier().out_features`` when None.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: Length of the linear warm-up in epochs (may be fractional; 0 for none).
        cosine: Whether to decay the learning rate to 0 with a cosine over the remaining steps.

    Raises:
        ValueError: If ``num_classes`` cannot be inferred or is not positive, or ``lr``, ``momentum``,
            ``weight_decay`` or ``warmup_epochs`` is negative.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.0,
        cosine: bool = True,
    ) -> None:
        super().__init__()
        if num_classes is None:
            head = model.get_classifier() if hasattr(model, "get_classifier") else None
            num_classes = getattr(head, "out_features", None)
            if num_classes is None:
                raise ValueError(
                    "`num_classes` is None and cannot be inferred: the model has no `get_classifier()` "
                    "returning a module with `out_features`. HINT: pass `num_classes`."
                )
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
        for arg, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"`{arg}` must be >= 0, got {value!r}.")
        if warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs!r}.")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.cosine = cosine
        self.train_loss_mean = MeanMetric()  # per-sample mean over an epoch, synchronised at its end
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean cross-entropy of one (micro-)batch; logs ``train_loss`` and ``train_acc``.

        Both are torchmetrics metrics, so no step makes a cross-process call: under
        :class:`~lightning_sparta.DPStrategy` with DDP, ranks run ``training_step`` a different number
        of times (once per micro-batch, never for an empty Poisson batch). Step values are the rank's
        own; epoch values are synchronised once, at the end of the epoch.
        """
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, reduction="mean")
        self.train_loss_mean(loss.detach(), weight=len(y))
        self.train_acc(logits.detach(), y)
        self.log("train_loss", self.train_loss_mean, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, reduction="mean")
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}_acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc``."""
        self._eval_step(batch, "test")

    def _total_and_warmup_steps(self) -> tuple[int, int]:
        total = self.trainer.estimated_stepping_batches
        max_epochs = self.trainer.max_epochs
        if not math.isfinite(total):
            total_steps = 0
            steps_per_epoch = float(self.trainer.num_training_batches)
        else:
            total_steps = int(total)
            steps_per_epoch = total / max_epochs if max_epochs and max_epochs > 0 else total
        if not math.isfinite(steps_per_epoch):
            steps_per_epoch = 0.0
        warmup_steps = round(self.warmup_epochs * steps_per_epoch)
        return total_steps, warmup_steps

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """SGD over *all* parameters (frozen ones included) with a per-step warm-up + cosine schedule.

        Parameters with ``requires_grad=False`` are still put in the param group: SGD skips those whose
        ``.grad`` is None, and a callback may unfreeze them later without rebuilding the optimizer.
        """
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        total_steps, warmup_steps = self._total_and_warmup_steps()
        schedule = WarmupCosineSchedule(warmup_steps, total_steps, cosine=self.cosine and total_steps > 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
