"""Offline demo: Fashion-MNIST tasks, small DP-compatible models, public pretraining, ImageNet weights."""

from lightning_sparta.demo.cifar import CIFARDataModule, TimmClassifier
from lightning_sparta.demo.console import quiet_lightning_notices
from lightning_sparta.demo.data import FashionMNISTTransfer, default_cache_dir
from lightning_sparta.demo.models import ClassifierModule, GroupNormCNN, WarmupCosineSchedule, create_model
from lightning_sparta.demo.pretrain import load_pretrained, pretrain_public, pretrained_path
from lightning_sparta.demo.pretrained import efficientnet_lite0_imagenet, load_pretrained_weights
from lightning_sparta.demo.transfer import TransferConfig, run_transfer

__all__ = [
    "CIFARDataModule",
    "ClassifierModule",
    "FashionMNISTTransfer",
    "GroupNormCNN",
    "TimmClassifier",
    "TransferConfig",
    "WarmupCosineSchedule",
    "create_model",
    "default_cache_dir",
    "efficientnet_lite0_imagenet",
    "load_pretrained",
    "load_pretrained_weights",
    "pretrain_public",
    "pretrained_path",
    "quiet_lightning_notices",
    "run_transfer",
]
