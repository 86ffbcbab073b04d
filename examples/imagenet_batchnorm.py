"""Private sparse fine-tuning of an ImageNet CNN with BatchNorm (timm ResNet-50, EfficientNet, ...).

BatchNorm mixes the samples of a batch in training mode, so DP-SGD cannot clip per sample. With frozen
running statistics (ImageNet's, from public data) a BN layer is a fixed per-channel affine map of each
sample and DP-SGD applies; its affine weight and bias keep training. ``DPStrategy`` does this by default
(``batchnorm="freeze"``): the model's code, modules and state-dict keys are unchanged.

    python examples/imagenet_batchnorm.py --data-dir /data/my_images      # ImageFolder: train/ and val/
    python examples/imagenet_batchnorm.py --model efficientnet_b0 --fake-data 64 --no-pretrained

``--fake-data N`` trains on N random images (a smoke run without data or downloads); ``--pretrained``
(the default) downloads timm's ImageNet weights.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sparta import DPStrategy, PrivacyBudgetCallback, SpartaMaskCallback
from lightning_sparta.demo.models import ClassifierModule


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="timm model name (default: %(default)s)")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data-dir", help="ImageFolder root with train/ and val/ sub-folders")
    parser.add_argument("--fake-data", type=int, default=0, help="train on this many random images instead")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of --fake-data (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mask-epoch", type=int, default=3, help="T0, the scoring epoch (default: %(default)s)")
    parser.add_argument("--trainable-fraction", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=256, help="expected logical (Poisson) batch")
    parser.add_argument("--physical-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--output", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def datasets(args: argparse.Namespace, config: dict[str, Any]) -> tuple[Dataset, Dataset, int]:
    """Training and validation sets (the model's own resize and normalisation) and the number of classes."""
    if args.fake_data:
        g = torch.Generator().manual_seed(args.seed)
        n, size = args.fake_data, args.image_size
        images = torch.randn(n, 3, size, size, generator=g)
        labels = torch.randint(0, args.num_classes, (n,), generator=g)
        dataset = TensorDataset(images, labels)
        return dataset, dataset, args.num_classes
    if not args.data_dir:
        raise SystemExit("Pass --data-dir (an ImageFolder with train/ and val/) or --fake-data N.")
    from torchvision.datasets import ImageFolder

    config = {**config, "input_size": (3, args.image_size, args.image_size)}
    train = ImageFolder(f"{args.data_dir}/train", transform=timm.data.create_transform(**config, is_training=True))
    val = ImageFolder(f"{args.data_dir}/val", transform=timm.data.create_transform(**config))
    return train, val, len(train.classes)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    L.seed_everything(args.seed)
    model = timm.create_model(args.model, pretrained=args.pretrained)  # ImageNet head first: weights load as is
    train, val, num_classes = datasets(args, timm.data.resolve_data_config({}, model=model))
    model.reset_classifier(num_classes)  # a fresh head for the private task

    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        # BatchNorm layers normalise with their (public, ImageNet) running statistics and never update them.
        strategy=DPStrategy(
            target_epsilon=args.epsilon,
            target_delta=args.delta,
            max_grad_norm=args.max_grad_norm,
            physical_batch_size=args.physical_batch_size,
            batchnorm="freeze",
        ),
        callbacks=[
            # Biases, BN affine parameters and the head train throughout; conv filters from the mask on.
            SpartaMaskCallback(mask_epoch=args.mask_epoch, trainable_fraction=args.trainable_fraction),
            PrivacyBudgetCallback(),
        ],
        logger=L.pytorch.loggers.TensorBoardLogger(args.output, name=f"imagenet_batchnorm_{args.model}"),
        enable_checkpointing=False,
    )
    module = ClassifierModule(model, lr=args.lr, warmup_epochs=1.0 if args.epochs > 2 else 0.0)
    loader = {"batch_size": args.batch_size, "num_workers": 0}
    trainer.fit(module, DataLoader(train, shuffle=True, **loader), DataLoader(val, **loader))
    result = {"val_acc": float(trainer.callback_metrics["val_acc"]), "epsilon": trainer.strategy.epsilon()}
    accuracy, epsilon = result["val_acc"], result["epsilon"]
    print(f"\n{args.model}: validation accuracy {accuracy:.4f} at ε = {epsilon:.3f}, δ = {args.delta:g}")
    return result


if __name__ == "__main__":
    main()
