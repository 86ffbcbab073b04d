"""The paper's main experiment: private sparse fine-tuning of a pretrained DeiT on CIFAR-10/100 (LightningCLI).

Setting of Section 6 ("Details on Hyper-parameters") of Makni, Behdin, Afriat, Xu, Vassilvitskii,
Ponomareva, Hazimeh and Mazumder, *SPARTA: An Optimization Framework for Differentially Private Sparse
Fine-Tuning*, KDD '25 (arXiv:2503.12822), as in ``configs/cifar10_deit_tiny.yaml``:

* an ImageNet-pretrained timm DeiT (``deit_tiny_patch16_224``; ``deit_small``/``deit_base`` or any timm
  name without BatchNorm) with a freshly initialised head, on CIFAR-10 or CIFAR-100 (torchvision
  download) resized to 224×224 and normalised with the model's pretrained statistics;
* DP-SGD (:class:`~lightning_sparta.DPStrategy`): Poisson batches of expected size 500 split into
  physical micro-batches, C = 1, δ = 1e-5, ε ∈ {2, 4, 8} (σ calibrated with the PRV accountant);
* SGD, momentum 0.9, no weight decay, lr 0.01, one epoch of linear warm-up then cosine annealing,
  T = 50 epochs;
* SPARTA (:class:`~lightning_sparta.SpartaMaskCallback`): DP-BitFit until T0 = 10, one private scoring
  epoch, then 20% of the rows of every Linear/Conv2d layer (plus biases, norms and head);
* ε logged by :class:`~lightning_sparta.PrivacyBudgetCallback`; TensorBoard logs under ``runs/``.

After fitting the program tests the model and prints the test accuracy and the ε spent.

Usage (a GPU and the internet; pretrained weights and CIFAR are downloaded on the first run)::

    python examples/cifar_deit_sparta.py --config examples/configs/cifar10_deit_tiny.yaml
    # 4 GPUs, DDP with the single-device guarantee (the batch of 500 is global):
    python examples/cifar_deit_sparta.py --config examples/configs/cifar10_deit_tiny.yaml --trainer.devices 4
    # ε = 4 and ε = 8:
    python examples/cifar_deit_sparta.py --config examples/configs/cifar10_deit_tiny.yaml \\
        --trainer.strategy.init_args.target_epsilon 4
    # CIFAR-100 with DeiT-Small (the head follows --data.dataset):
    python examples/cifar_deit_sparta.py --config examples/configs/cifar100_deit_small.yaml
    # offline smoke run on a CPU (no download, about 25 s of CPU): generated 32 px images, a small random ViT
    python examples/cifar_deit_sparta.py --config examples/configs/cifar10_deit_tiny.yaml \\
        --data.synthetic true --model.pretrained false --trainer.accelerator cpu \\
        --model.model_name vit_tiny_patch16_224 \\
        --model.model_kwargs '{img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}' \\
        --data.synthetic_size 64 --data.batch_size 16 --data.num_workers 0 \\
        --trainer.strategy.init_args.physical_batch_size 8 --trainer.max_epochs 3 --sparta.mask_epoch 1
    # every option, and the full resolved configuration:
    python examples/cifar_deit_sparta.py --help
    python examples/cifar_deit_sparta.py --config examples/configs/cifar10_deit_tiny.yaml --print_config

The methods of the paper's Table 2 (``--sparta.*`` are the arguments of ``SpartaMaskCallback``):

==============  =====================================================================================
SPARTA          ``--sparta.selector sparta`` (default; ``--sparta.trainable_fraction``, ``--sparta.mask_epoch``)
All             ``--sparta.selector all --sparta.mask_epoch 0`` (full DP fine-tuning)
Last            ``--sparta.selector last --sparta.mask_epoch 0`` (head and normalisation layers)
MP (Luo et al.) ``--sparta.selector magnitude --sparta.mask_epoch 0`` (top-|W| entries of the pretrained model)
DP-BitFit       ``--sparta.selector bitfit`` (biases, norms and head)
random mask     ``--sparta.selector random``
DP-SGD mask     ``--sparta.selector dp_gradient`` (Algorithm 2: element mask from noisy clipped gradients)
oracle mask     ``--sparta.selector oracle --sparta.allow_non_private true`` (Algorithm 3: NOT private)
==============  =====================================================================================

The strategy is configured in the YAML under ``trainer.strategy`` (``class_path:
lightning_sparta.DPStrategy`` and ``init_args``); override one of its arguments with
``--trainer.strategy.init_args.<name> <value>`` (e.g. ``physical_batch_size`` to fit GPU memory,
``accountant rdp``). A fixed noise multiplier instead of a target ε:
``--trainer.strategy.init_args.target_epsilon null --trainer.strategy.init_args.noise_multiplier 1.0``.
``--ckpt_path runs/.../checkpoints/last.ckpt`` resumes a run with its privacy accounting and its mask;
resume with the same configuration: the checkpoint's σ is kept, so a larger ``--trainer.max_epochs``
would spend more than ``target_epsilon``.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch.distributed as dist
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sparta import DPStrategy, PrivacyBudgetCallback, SpartaMaskCallback
from lightning_sparta.demo.cifar import CIFARDataModule, TimmClassifier, cifar_num_classes
from lightning_sparta.demo.console import quiet_lightning_notices

__all__ = ["SpartaCLI", "SpartaMask", "main"]

#: The strategy when the configuration names none: the paper's (ε, δ) = (2, 1e-5).
DEFAULT_STRATEGY = {"class_path": "lightning_sparta.DPStrategy", "init_args": {"target_epsilon": 2.0}}

# Sphinx markup of the docstrings that become the help: :class:`~a.b.C` -> C, ``x`` -> x.
_SPHINX_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]*)``")


class _PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the Sphinx markup of docstrings turned into plain text."""

    def _expand_help(self, action: Any) -> str:
        return _plain(super()._expand_help(action))

    def _format_text(self, text: str) -> str:  # group descriptions (class docstrings)
        return super()._format_text(_plain(text))

    def start_section(self, heading: str | None) -> None:  # group titles (first docstring lines)
        super().start_section(None if heading is None else _plain(heading))


def _plain(text: str) -> str:
    text = _SPHINX_ROLE.sub(lambda m: m.group(1).rpartition(".")[2], text)
    return _LITERAL.sub(r"\1", text)


class SpartaMask(SpartaMaskCallback):
    """:class:`~lightning_sparta.SpartaMaskCallback` for the command line: ``head`` is a qualified module name.

    Typed as a string, ``--sparta.head`` takes e.g. ``model.head`` (the timm model's classifier inside
    ``TimmClassifier``); ``None`` finds it with ``get_classifier()``. The library's ``head`` also accepts a
    module, which on the command line made the help list every ``nn.Module`` subclass.

    Args:
        head: qualified name of the classifier head, or None to find it with ``get_classifier()``.
    """

    def __init__(self, head: str | None = None, **kwargs: Any) -> None:
        super().__init__(head=head, **kwargs)


class SpartaCLI(LightningCLI):
    """LightningCLI for private (sparse) fine-tuning of a timm classifier on CIFAR.

    Adds to Lightning's ``trainer``/``model``/``data`` groups: ``sparta`` (the arguments of
    :class:`~lightning_sparta.SpartaMaskCallback`), ``privacy`` (those of
    :class:`~lightning_sparta.PrivacyBudgetCallback`), both added to the Trainer's callbacks, and
    ``ckpt_path`` (resume fitting). ``model.num_classes`` follows ``data.dataset``, and the data's
    input size and normalisation follow the created model (``TimmClassifier.data_config``) unless
    ``data.image_size``/``data.mean``/``data.std`` are given.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the SPARTA and privacy callbacks, ``ckpt_path`` and the model/data links."""
        parser.add_lightning_class_args(SpartaMask, "sparta")
        parser.add_lightning_class_args(PrivacyBudgetCallback, "privacy")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="Checkpoint to resume fitting from (e.g. last.ckpt)."
        )
        parser.link_arguments("data.dataset", "model.num_classes", compute_fn=cifar_num_classes)
        parser.link_arguments("model.data_config", "data.model_data_config", apply_on="instantiate")
        parser.set_defaults({"trainer.strategy": DEFAULT_STRATEGY})  # DP by default, not Lightning's 'auto'


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse the configuration, fit with DP (and SPARTA), test, and print the test accuracy and ε.

    Args:
        args: Command-line arguments (``sys.argv[1:]`` when None), e.g.
            ``["--config", "examples/configs/cifar10_deit_tiny.yaml", "--sparta.selector", "magnitude"]``.

    Returns:
        ``test_acc``, ``train_loss`` (mean over the last training epoch), ``epsilon`` (``inf`` for a
        non-private run), ``delta``, ``private`` (bool), ``noise_multiplier``, and the ``trainer``,
        ``model``, ``datamodule`` and ``callback`` (the :class:`~lightning_sparta.SpartaMaskCallback`)
        objects.

    Raises:
        ValueError: If ``trainer.strategy`` is not a :class:`~lightning_sparta.DPStrategy`; any bad
            argument raises when its class is created (the message names it).
        SystemExit: On a parse error (unknown option, wrong type), after printing the usage.
    """
    quiet_lightning_notices()
    cli = SpartaCLI(
        TimmClassifier,
        CIFARDataModule,
        run=False,
        args=args,
        auto_configure_optimizers=False,  # the module's own SGD + warm-up + cosine
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__.split("\n\n")[0], "formatter_class": _PlainHelpFormatter},
    )
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    strategy = trainer.strategy
    if not isinstance(strategy, DPStrategy):
        raise ValueError(
            f"`trainer.strategy` must be lightning_sparta.DPStrategy (class_path: lightning_sparta.DPStrategy), "
            f"found {type(strategy).__name__}."
        )
    callback = next(c for c in trainer.callbacks if isinstance(c, SpartaMaskCallback))
    with warnings.catch_warnings():
        # data.val_size=0 (the paper's setting) gives no validation batches on purpose.
        warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
        trainer.fit(model, datamodule=datamodule, ckpt_path=cli.config.get("ckpt_path"))
    train_loss = float(trainer.callback_metrics.get("train_loss_epoch", math.nan))
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    result: dict[str, Any] = {
        "test_acc": float(test["test_acc"]),
        "train_loss": train_loss,
        "epsilon": strategy.epsilon(),
        "delta": strategy.target_delta,
        "private": strategy.is_private,
        "noise_multiplier": strategy.noise_multiplier,
        "trainer": trainer,
        "model": model,
        "datamodule": datamodule,
        "callback": callback,
    }
    log_dir = trainer.log_dir  # a collective under DDP: every rank asks
    if trainer.is_global_zero:
        privacy = (
            f"ε = {result['epsilon']:.3f} at δ = {result['delta']:g}"
            if strategy.is_private
            else f"NOT PRIVATE ({strategy.non_private_reason})"
        )
        print(
            f"\n{model.model_name} on {datamodule.dataset}{' (synthetic)' if datamodule.synthetic else ''}, "
            f"selector={callback.selector.name!r}, trainable_fraction={callback.trainable_fraction:g}, "
            f"mask_epoch={callback.mask_epoch}: test accuracy {result['test_acc']:.4f}, {privacy} "
            f"(σ = {strategy.noise_multiplier:.4f}, {strategy.steps} private steps)."
        )
        if log_dir is not None:
            print(f"TensorBoard: tensorboard --logdir {log_dir}")
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        # gloo's worker threads can abort the process at interpreter exit (SIGABRT, "terminate called
        # without an active exception") unless the process group is destroyed first; Lightning leaves it up
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
