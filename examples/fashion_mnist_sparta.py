"""The main job: private sparse fine-tuning (SPARTA) on Fashion-MNIST, end to end, offline.

The paper's setting in small:

1. "public" pretraining, not private: a GroupNorm CNN trained on Fashion-MNIST classes 0-4 (cached
   after the first run under ~/.cache/lightning_sparta/pretrained);
2. private fine-tuning on classes 5-9 with a fresh head: ``DPStrategy`` (DP-SGD at a stated (ε, δ)),
   ``SpartaMaskCallback`` (DP-BitFit warm-up, one private scoring epoch at ``--mask-epoch``, then
   row-sparse training) and ``PrivacyBudgetCallback`` (ε in the logs and the progress bar).

Run it with ``make run`` (or ``python examples/fashion_mnist_sparta.py --help``); the TensorBoard
logs go to ``runs/`` (``tensorboard --logdir runs``).
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sparta import DPStrategy, PrivacyBudgetCallback, SpartaMaskCallback
from lightning_sparta.demo import ClassifierModule, FashionMNISTTransfer, load_pretrained, pretrain_public
from lightning_sparta.sparse import densify_


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("privacy and method")
    run.add_argument("--epsilon", type=float, default=2.0, help="target ε of the whole run (default: 2.0)")
    run.add_argument("--delta", type=float, default=1e-5, help="δ of the guarantee (default: 1e-5)")
    run.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping threshold C (default: 1.0)")
    run.add_argument("--selector", default="sparta", help="mask selector: sparta, magnitude, ... (default: sparta)")
    run.add_argument("--trainable-fraction", type=float, default=0.2, help="rows kept per layer (default: 0.2)")
    run.add_argument("--mask-epoch", type=int, default=2, help="T0, the scoring epoch (default: 2)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=8, help="T, epochs in total (default: 8)")
    train.add_argument("--batch-size", type=int, default=500, help="expected logical batch q·n (default: 500)")
    train.add_argument("--physical-batch-size", type=int, default=250, help="micro-batch size (default: 250)")
    train.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1)")
    train.add_argument("--train-subset", type=int, default=None, help="use only this many private examples")
    train.add_argument("--pretrain-epochs", type=int, default=3, help="public pretraining epochs (default: 3)")
    train.add_argument("--devices", type=int, default=1, help="processes (DDP when > 1; default: 1)")
    train.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (default: cpu)")
    train.add_argument("--seed", type=int, default=0)
    io = parser.add_argument_group("input and output")
    io.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    io.add_argument("--output", default="runs", help="TensorBoard and checkpoint folder (default: runs)")
    io.add_argument("--no-progress-bar", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    L.seed_everything(args.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    weights = pretrain_public("gn_cnn", data_dir=args.data_dir, epochs=args.pretrain_epochs, seed=args.seed)
    model = load_pretrained("gn_cnn", num_classes=5, path=weights)
    module = ClassifierModule(model, lr=args.lr, momentum=0.9, warmup_epochs=1.0 if args.epochs > 2 else 0.0)
    data = FashionMNISTTransfer(
        data_dir=args.data_dir, split="private", batch_size=args.batch_size, train_subset=args.train_subset
    )

    logger = TensorBoardLogger(args.output, name="fashion_mnist_sparta")
    strategy = DPStrategy(
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        physical_batch_size=args.physical_batch_size,
    )
    budget = PrivacyBudgetCallback(log_every_n_steps=5)
    sparta = SpartaMaskCallback(
        mask_epoch=args.mask_epoch, trainable_fraction=args.trainable_fraction, selector=args.selector
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        callbacks=[sparta, budget, LearningRateMonitor("step"), ModelCheckpoint(save_last=True)],
        logger=logger,
        log_every_n_steps=5,
        enable_progress_bar=not args.no_progress_bar,
    )
    trainer.fit(module, datamodule=data)
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    densify_(module)  # back to a plain torch model, ready to export
    result = {
        "test_acc": test["test_acc"],
        "epsilon": strategy.epsilon(),
        "delta": args.delta,
        "wall_time_s": time.perf_counter() - start,
    }
    if trainer.is_global_zero:
        print(
            f"\nSPARTA on Fashion-MNIST 5-9 ({args.trainable_fraction:.0%} of rows, selector={args.selector}): "
            f"test accuracy {result['test_acc']:.4f} at ε = {result['epsilon']:.3f}, δ = {args.delta:g} "
            f"in {result['wall_time_s']:.0f} s.\nTensorBoard: tensorboard --logdir {args.output}   ({logger.log_dir})"
        )
    return result


if __name__ == "__main__":
    main()
