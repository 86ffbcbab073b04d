"""Test accuracy of SPARTA and every competing method at the same (ε, δ), each at its own tuned learning rate.

Two tasks, both through the main job's function :func:`lightning_sparta.demo.run_transfer` (``--model``):

* ``efficientnet_lite0`` (the default, the main job's): timm's EfficientNet-Lite0 with Google's ImageNet
  weights and a fresh 10-way head, fine-tuned privately on all ten Fashion-MNIST classes (images upsampled
  to ``--image-size`` and replicated to RGB, BatchNorm with frozen statistics), tested on the official
  test split (10,000 images). Results: ``benchmarks/results/accuracy_effnet*``.
* ``gn_cnn`` (the earlier, small benchmark, kept for history): a GroupNorm CNN pretrained without privacy
  on Fashion-MNIST classes 0-4, fine-tuned on classes 5-9 at one learning rate (``--lrs 0.1``). Its
  results files (``accuracy_cpu.*``, ``accuracy_t20.*``, ``accuracy_quick.*``) are the old benchmark's.

Every method runs with the same (ε, δ), epochs ``T``, expected batch size, micro-batch size, clipping
norm, learning-rate schedule (SGD, momentum 0.9, one epoch of linear warm-up then cosine decay) and
seeds. σ is calibrated for the whole run (``T`` epochs of Poisson steps, scoring epochs included), so it
is the same for every method at a given ε. Only the peak learning rate differs: each method gets its own,
chosen from ``--lrs`` (3 values by default) by the accuracy on a validation split held out of the private
training data (10% of ``--train-subset``, disjoint from it), at one seed (the first of ``--seeds``).
**That selection's own privacy cost is not accounted** (as in the paper and in Cattan et al. 2022): the
reported ε covers each training run, not the search.

Methods (``T0`` is ``--mask-epoch``; the paper's proportion is ``T0/T = 1/5``):

================  ====================================================================================
``sparta``        The paper's Algorithm 1: DP-BitFit for ``T0`` epochs, one private scoring epoch without
                  updates (Σ|clip(g)| + noise, summed per row), the top rows of every conv/linear layer.
``sparta_tws``    As ``sparta`` with ``train_while_scoring=True``: the scoring epoch also trains the
                  always-trainable set from the same noisy release (no epoch without updates).
``sparta_tws_k``  As ``sparta_tws`` with ``scoring_epochs = T0 + 1``: scores accumulate over the whole
                  warm-up, which trains at the same time.
``all``           Full DP fine-tuning (every weight) from epoch 0.
``magnitude``     MP (Algorithm 4, Luo et al.): the top entries of |W_old|, trained from epoch 0.
``bitfit``        DP-BitFit (biases, normalisation layers, head) from epoch 0.
``last``          The head and the normalisation layers (the paper's "Last") from epoch 0. Not in
                  ``efficientnet_lite0``'s default list: its convolutions have no biases, so ``last``
                  trains exactly ``bitfit``'s set there (run it with ``--methods``).
``layers``        Layer selection (Cattan et al. 2022): the last block trained densely, plus the
                  always-trainable set, from epoch 0.
``random``        DP-BitFit for ``T0`` epochs, then a random mask of entries (no scoring epoch).
``dp_gradient``   Algorithm 2 (entries of |Σ(clip(g) + noise)|), ``gn_cnn``'s default list only.
``oracle``        Algorithm 3, mask from true gradients: **NON-PRIVATE** (ε = ∞); optional.
================  ====================================================================================

The phases, one run after the other in this process (quiet: no logger, checkpoint or per-step ε):

1. learning-rate search (when ``--lrs`` has more than one value): every method at every rate, seed
   ``seeds[0]``, with a validation pass per epoch; the rate with the best last-epoch validation accuracy
   is the method's;
2. the method table: every method at its rate, every seed (the search's run at the chosen rate is
   reused for ``seeds[0]``);
3. optionally the profile (``--fractions``: ``sparta``/``magnitude`` at other trainable fractions) and
   ``--low-epsilon`` (the top methods, default the 3 best private ones, again at their rate, at a lower ε).

``--levers`` instead measures SPARTA's schedule levers one at a time, from ``sparta`` (``T0`` = 1,
DP-BitFit warm-up, fraction 0.2) at one learning rate (``--lrs``' single value, else the one the method
table chose for ``sparta``, else the grid's middle value): ``mask_epoch`` 0, 1 and 2 (all but the
baseline's), ``warmup="full"``, ``train_while_scoring``, ``scoring_epochs = T0 + 1``, the two that helped
together, an exponential moving average of the weights (Lightning's ``EMAWeightAveraging``, decay 0.8
and 0.9 per step; post-processing, ε unchanged), four augmented views of every image clipped together
(``augmentation_multiplicity=4``), and fractions 0.05 and 0.5 (``accuracy_effnet_levers.*``).

Sizing (EfficientNet-Lite0 at 32 px, ``--clipping auto``, 2 idle cores): one run with 2,000 private examples,
T = 10 and batch 250 took 136 s (``sparta``) and 198 s (``all``), i.e. about 7-10 ms of wall time per private
example and epoch, test included. The full mode (1,000 private examples, validation 100, T = 5, T0 = 1
(the paper's T0/T = 1/5, at the main job's T), batch 125 so q = 0.125 and 40 steps, 2,000 test images, rates
0.01/0.03/0.1 searched at seed 0, seeds 0-2: 8 × 3 + 8 × 2 = 40 runs of about a minute) therefore takes
about 45 minutes; ``--low-epsilon 1`` adds 9 runs and ``--levers`` 33. A larger setting
(``--train-subset 5000 --batch-size 500``) costs about 5 times as much: use a GPU (``--accelerator gpu``)
for it. ``--resume`` continues an interrupted run.

Outputs under ``benchmarks/results/`` (``--out-prefix``): ``PREFIX.md`` (command, machine, settings, the
search, the tables with mean ± std), ``PREFIX.json`` (every run, rewritten after each; ``--resume`` keeps the
finished runs) and ``PREFIX_vs_fraction.png`` (test accuracy against the trainable share of the model,
and against ε when ``--low-epsilon`` ran). ``--quick`` (one seed, one learning rate, 600 examples, T = 5,
T0 = 1) writes ``accuracy_effnet_quick.*``: a smoke test of a few minutes, not results.

Run ``python benchmarks/accuracy.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sparta.demo import TransferConfig

MODELS = ("efficientnet_lite0", "gn_cnn")
METHODS = (
    "sparta",
    "sparta_tws",
    "sparta_tws_k",
    "all",
    "magnitude",
    "bitfit",
    "last",
    "layers",
    "random",
    "dp_gradient",
    "oracle",
)
#: The methods run by default, per model (``oracle`` is optional: it is not private).
DEFAULT_METHODS = {
    "efficientnet_lite0": (
        "sparta",
        "sparta_tws",
        "sparta_tws_k",
        "all",
        "magnitude",
        "bitfit",
        "layers",
        "random",
    ),
    "gn_cnn": ("sparta", "all", "last", "bitfit", "magnitude", "random", "dp_gradient", "oracle"),
}
#: Methods with the SPARTA schedule: a DP-BitFit warm-up for T0 epochs, then their mask.
WARMUP_METHODS = ("sparta", "sparta_tws", "sparta_tws_k", "dp_gradient", "oracle", "random")
#: Methods whose mask is chosen from scoring at T0.
SCORING_METHODS = ("sparta", "sparta_tws", "sparta_tws_k", "dp_gradient", "oracle")
#: Methods that select rows (the others select entries or train a fixed set).
ROW_METHODS = ("sparta", "sparta_tws", "sparta_tws_k")
#: Methods without a mask (a fixed trainable set): the trainable fraction does not apply.
FIXED_METHODS = ("all", "last", "bitfit", "layers")
#: Methods whose mask is not differentially private.
NON_PRIVATE_METHODS = ("oracle",)
SWEEP_METHODS = ("sparta", "magnitude")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRETRAIN_SEED = 0

#: Defaults of the full mode and of ``--quick``, per model (see the module docstring for the sizing).
FULL = {
    "efficientnet_lite0": {
        "seeds": "0,1,2",
        "train_subset": 1000,
        "epochs": 5,
        "mask_epoch": 1,
        "fractions": "",
        "lrs": "0.01,0.03,0.1",
        "batch_size": 125,
        "physical_batch_size": 125,
        "image_size": 32,
        "test_subset": 2000,
        "clipping": "auto",
    },
    "gn_cnn": {
        "seeds": "0,1,2",
        "train_subset": 10000,
        "epochs": 8,
        "mask_epoch": 2,
        "fractions": "0.01,0.05,0.2,0.5,1.0",
        "lrs": "0.1",
        "batch_size": 500,
        "physical_batch_size": 250,
        "image_size": 28,
        "test_subset": None,
        "clipping": "per_sample",
    },
}
QUICK = {
    "efficientnet_lite0": {
        "seeds": "0",
        "train_subset": 300,
        "epochs": 5,
        "mask_epoch": 1,
        "fractions": "",
        "lrs": "0.03",
        "batch_size": 100,
        "physical_batch_size": 100,
        "image_size": 32,
        "test_subset": 1000,
        "clipping": "auto",
    },
    "gn_cnn": {
        "seeds": "0",
        "train_subset": 2500,
        "epochs": 4,
        "mask_epoch": 1,
        "fractions": "0.05,0.2",
        "lrs": "0.1",
        "batch_size": 500,
        "physical_batch_size": 250,
        "image_size": 28,
        "test_subset": None,
        "clipping": "per_sample",
    },
}
#: The levers of ``--levers``: name → (what changes, overrides of the ``sparta`` baseline).
#: ``None`` values are filled in from the command line (T0 + 1 scoring epochs).
LEVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("sparta as the paper: DP-BitFit warm-up T0 ep, scoring 1 ep, fraction 0.2", {}),
    "mask_epoch=0": ("score in the first epoch, no warm-up", {"mask_epoch": 0}),
    "mask_epoch=1": ("one warm-up epoch", {"mask_epoch": 1}),
    "mask_epoch=2": ("two warm-up epochs", {"mask_epoch": 2}),
    "warmup=full": ("warm-up trains every weight instead of DP-BitFit", {"warmup": "full"}),
    "train_while_scoring": ("the scoring epoch also trains the always-trainable set", {"train_while_scoring": True}),
    "scoring_epochs=T0+1": (
        "train while scoring, scores over the whole warm-up",
        {"train_while_scoring": True, "scoring_epochs": None},
    ),
    "mask_epoch=2+train_while_scoring": (
        "the two levers that helped, together: two warm-up epochs, and the scoring epoch trains",
        {"mask_epoch": 2, "train_while_scoring": True},
    ),
    "ema=0.8": ("test the exponential moving average of the weights (decay 0.8 per step)", {"ema_decay": 0.8}),
    "ema=0.9": ("test the exponential moving average of the weights (decay 0.9 per step)", {"ema_decay": 0.9}),
    "augmult=4": (
        "4 randomly shifted and flipped views of every image, clipped together (augmentation multiplicity)",
        {"augmentation_multiplicity": 4},
    ),
    "fraction=0.05": ("5% of the rows", {"trainable_fraction": 0.05}),
    "fraction=0.5": ("50% of the rows", {"trainable_fraction": 0.5}),
}

#: Settings that must match for ``--resume`` to reuse earlier runs.
SETTING_KEYS = (
    "model",
    "epsilon",
    "delta",
    "max_grad_norm",
    "epochs",
    "mask_epoch",
    "train_subset",
    "batch_size",
    "physical_batch_size",
    "image_size",
    "test_subset",
    "clipping",
    "pretrain_epochs",
    "data_dir",
    "accelerator",
)


# ---------------------------------------------------------------------------------------- arguments
def _csv(kind: type, name: str) -> Callable[[str], list]:
    """An argparse ``type`` for a comma-separated list of ``kind`` (``''`` is the empty list)."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected comma-separated {kind.__name__}s, got {text!r}"
            ) from None

    return parse


def _mode_help(name: str) -> str:
    full, quick = FULL["efficientnet_lite0"][name], QUICK["efficientnet_lite0"][name]
    return f"(efficientnet_lite0: default {full!r}, --quick {quick!r}; gn_cnn: {FULL['gn_cnn'][name]!r})"


def build_parser() -> argparse.ArgumentParser:
    """The command line (``None`` defaults are filled in by :func:`parse_args` from the model and mode)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--model", choices=MODELS, default="efficientnet_lite0", help="the task (default: %(default)s)")
    what.add_argument("--quick", action="store_true", help="smoke test in a few minutes (one seed, one rate)")
    what.add_argument("--levers", action="store_true", help="SPARTA's schedule levers one at a time (see above)")
    what.add_argument(
        "--methods",
        type=_csv(str, "--methods"),
        default=None,
        help=f"comma-separated subset of {METHODS} (default: the model's list, without oracle for efficientnet)",
    )
    what.add_argument("--seeds", type=_csv(int, "--seeds"), default=None, help="seeds " + _mode_help("seeds"))
    what.add_argument("--lrs", type=_csv(float, "--lrs"), default=None, help="learning-rate grid " + _mode_help("lrs"))
    what.add_argument("--lr", type=float, default=None, help="one learning rate for every method (no search)")
    what.add_argument("--fraction", type=float, default=0.2, help="trainable fraction of the masks (%(default)s)")
    what.add_argument(
        "--fractions",
        type=_csv(float, "--fractions"),
        default=None,
        help="profile fractions " + _mode_help("fractions"),
    )
    what.add_argument(
        "--sweep-methods",
        type=_csv(str, "--sweep-methods"),
        default=list(SWEEP_METHODS),
        help="methods of the profile (default: sparta,magnitude)",
    )
    what.add_argument("--low-epsilon", type=float, default=None, help="also run the top methods at this ε (e.g. 1)")
    what.add_argument(
        "--low-epsilon-methods",
        type=_csv(str, "--low-epsilon-methods"),
        default=None,
        help="methods run at --low-epsilon (default: the 3 best private methods of the table)",
    )
    dp = parser.add_argument_group("privacy and training (the same for every method)")
    dp.add_argument("--epsilon", type=float, default=2.0, help="target ε of every run (default: %(default)s)")
    dp.add_argument("--delta", type=float, default=1e-5, help="δ (default: %(default)g)")
    dp.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C (default: %(default)s)")
    dp.add_argument("--epochs", type=int, default=None, help="T " + _mode_help("epochs"))
    dp.add_argument("--mask-epoch", type=int, default=None, help="T0 " + _mode_help("mask_epoch"))
    dp.add_argument("--train-subset", type=int, default=None, help="private examples " + _mode_help("train_subset"))
    dp.add_argument("--batch-size", type=int, default=None, help="expected batch " + _mode_help("batch_size"))
    dp.add_argument(
        "--physical-batch-size", type=int, default=None, help="micro-batch " + _mode_help("physical_batch_size")
    )
    dp.add_argument("--image-size", type=int, default=None, help="image side " + _mode_help("image_size"))
    dp.add_argument("--test-subset", type=int, default=None, help="test images, 0 for all " + _mode_help("test_subset"))
    dp.add_argument(
        "--clipping",
        choices=("auto", "per_sample", "ghost"),
        default=None,
        help="DPStrategy clipping engine (same mechanism and ε, faster) " + _mode_help("clipping"),
    )
    dp.add_argument("--pretrain-epochs", type=int, default=3, help="gn_cnn public pretraining epochs (%(default)s)")
    io = parser.add_argument_group("machine, input and output")
    io.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (default: %(default)s)")
    io.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's and Lightning's choice)")
    io.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    io.add_argument(
        "--out-prefix",
        default=None,
        help="output path without extension (default: benchmarks/results/accuracy_effnet[_quick][_levers] for "
        "efficientnet_lite0, accuracy_<accelerator> / accuracy_quick for gn_cnn)",
    )
    io.add_argument("--resume", action="store_true", help="keep the runs already in PREFIX.json, run the others")
    io.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild PREFIX.md and the plot from PREFIX.json (e.g. of an unfinished run)",
    )
    io.add_argument("--verbose", action="store_true", help="show Lightning's logs and warnings")
    return parser


def default_prefix(args: argparse.Namespace) -> str:
    """The default output prefix (the old CNN benchmark keeps its names, the new one never overwrites them)."""
    if args.model == "gn_cnn":
        name = "accuracy_quick" if args.quick else f"accuracy_{args.accelerator}"
        return str(RESULTS_DIR / (name + ("_levers" if args.levers else "")))
    name = "accuracy_effnet" + ("_quick" if args.quick else "") + ("_levers" if args.levers else "")
    return str(RESULTS_DIR / name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; fill in the defaults of the model and mode (full or ``--quick``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = (QUICK if args.quick else FULL)[args.model]
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS[args.model])
    if args.seeds is None:
        args.seeds = _csv(int, "--seeds")(mode["seeds"])
    if args.fractions is None:
        args.fractions = _csv(float, "--fractions")(mode["fractions"])
    if args.lr is not None:
        if args.lrs is not None:
            parser.error("give --lr or --lrs, not both")
        args.lrs = [args.lr]
    if args.lrs is None:
        args.lrs = _csv(float, "--lrs")(mode["lrs"])
    for name in ("train_subset", "epochs", "mask_epoch", "batch_size", "physical_batch_size", "image_size"):
        if getattr(args, name) is None:
            setattr(args, name, mode[name])
    for name in ("test_subset", "clipping"):
        if getattr(args, name) is None:
            setattr(args, name, mode[name])
    if args.test_subset == 0:
        args.test_subset = None
    lists = (("methods", args.methods), ("sweep-methods", args.sweep_methods))
    lists += (("low-epsilon-methods", args.low_epsilon_methods or []),)
    for name, values in lists:
        unknown = sorted(set(values) - set(METHODS))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}, choose from {list(METHODS)}")
    fixed = sorted(set(args.sweep_methods) & set(FIXED_METHODS))
    if fixed:
        parser.error(f"--sweep-methods: {fixed} train a fixed set, they have no trainable fraction to sweep")
    if not args.levers and not args.methods:
        parser.error("--methods is empty: nothing to do")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if not args.lrs or len(set(args.lrs)) != len(args.lrs) or min(args.lrs) <= 0:
        parser.error(f"--lrs must be distinct positive numbers, got {args.lrs}")
    for name, value in (("fraction", [args.fraction]), ("fractions", args.fractions)):
        if any(not 0 < f <= 1 for f in value):
            parser.error(f"--{name} must be in (0, 1], got {value}")
    for name in ("epsilon", "low_epsilon"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.epochs < 1 or not 0 <= args.mask_epoch < args.epochs:
        parser.error(f"need --epochs >= 1 and 0 <= --mask-epoch < --epochs, got {args.epochs} and {args.mask_epoch}")
    scoring = set(args.methods) | (set(args.sweep_methods) if args.fractions else set())
    scoring = sorted((scoring | ({"sparta"} if args.levers else set())) & set(SCORING_METHODS))
    if scoring and args.mask_epoch > args.epochs - 2:
        parser.error(
            f"--mask-epoch {args.mask_epoch} leaves no epoch to train the mask of {scoring} after their scoring "
            f"epoch: need --mask-epoch <= --epochs - 2 = {args.epochs - 2}"
        )
    if args.train_subset < args.batch_size:
        parser.error(f"--train-subset ({args.train_subset}) must be at least --batch-size ({args.batch_size})")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.out_prefix is None:
        args.out_prefix = default_prefix(args)
    return args


# ---------------------------------------------------------------------------------------- the runs
def run_key(method: str, fraction: float | None, seed: int, lr: float, epsilon: float, lever: str | None = None) -> str:
    """The identifier of one run in the JSON (fraction ``-`` for fixed sets; levers are prefixed).

    Example:
        >>> run_key("sparta", 0.2, 1, 0.03, 2.0), run_key("all", 0.2, 0, 0.1, 1.0)
        ('sparta|0.2|lr=0.03|eps=2|seed=1', 'all|-|lr=0.1|eps=1|seed=0')
        >>> run_key("sparta", 0.2, 0, 0.03, 2.0, lever="warmup=full")
        'lever:warmup=full|lr=0.03|eps=2|seed=0'
    """
    tail = f"lr={lr:g}|eps={epsilon:g}|seed={seed}"
    if lever is not None:
        return f"lever:{lever}|{tail}"
    frac = "-" if method in FIXED_METHODS or fraction is None else f"{fraction:g}"
    return f"{method}|{frac}|{tail}"


def method_mask_epoch(method: str, mask_epoch: int) -> int:
    """``T0`` for the methods with the SPARTA schedule, 0 (their set from the start) for the others."""
    return mask_epoch if method in WARMUP_METHODS else 0


def method_options(method: str, mask_epoch: int) -> dict[str, Any]:
    """The :class:`~lightning_sparta.demo.TransferConfig` fields (hence ``SpartaMaskCallback`` kwargs) of a method.

    Example:
        >>> method_options("sparta_tws_k", 2)
        {'selector': 'sparta', 'mask_epoch': 2, 'train_while_scoring': True, 'scoring_epochs': 3}
        >>> method_options("layers", 2)
        {'selector': 'layers', 'mask_epoch': 0, 'train_while_scoring': False, 'scoring_epochs': 1}
    """
    t0 = method_mask_epoch(method, mask_epoch)
    return {
        "selector": "sparta" if method in ROW_METHODS else method,
        "mask_epoch": t0,
        "train_while_scoring": method in ("sparta_tws", "sparta_tws_k"),
        "scoring_epochs": t0 + 1 if method == "sparta_tws_k" else 1,
    }


def lever_options(lever: str, mask_epoch: int, fraction: float) -> dict[str, Any]:
    """The config fields of a lever: the ``sparta`` baseline with one thing changed.

    Example:
        >>> lever_options("scoring_epochs=T0+1", 2, 0.2)["scoring_epochs"]
        3
        >>> lever_options("mask_epoch=0", 2, 0.2)["mask_epoch"], lever_options("baseline", 2, 0.2)["warmup"]
        (0, 'bitfit')
    """
    options = {**method_options("sparta", mask_epoch), "warmup": "bitfit", "trainable_fraction": fraction}
    for name, value in LEVERS[lever][1].items():
        options[name] = options["mask_epoch"] + 1 if name == "scoring_epochs" and value is None else value
    return options


def schedule(method: str, epochs: int, mask_epoch: int) -> str:
    """A short description of what trains when, for the tables.

    Example:
        >>> schedule("sparta", 10, 2)
        'DP-BitFit 2 ep → scoring 1 ep → sparse rows 7 ep'
        >>> schedule("sparta_tws_k", 10, 2)
        'DP-BitFit + scoring 3 ep → sparse rows 7 ep'
        >>> schedule("magnitude", 8, 2)
        'mask from the magnitude of W_old → sparse entries 8 ep'
    """
    warmup = f"DP-BitFit {mask_epoch} ep → " if mask_epoch else ""
    unit = "rows" if method in ROW_METHODS else "entries"
    if method == "sparta_tws":
        return f"{warmup}scoring + DP-BitFit 1 ep → sparse rows {epochs - mask_epoch - 1} ep"
    if method == "sparta_tws_k":
        return f"DP-BitFit + scoring {mask_epoch + 1} ep → sparse rows {epochs - mask_epoch - 1} ep"
    if method in SCORING_METHODS:
        return f"{warmup}scoring 1 ep → sparse {unit} {epochs - mask_epoch - 1} ep"
    if method == "random":
        return f"{warmup}random mask → sparse entries {epochs - mask_epoch} ep"
    if method == "magnitude":
        return f"mask from the magnitude of W_old → sparse entries {epochs} ep"
    names = {
        "all": "all weights",
        "last": "head + norms",
        "bitfit": "DP-BitFit",
        "layers": "last block + DP-BitFit set",
    }
    return f"{names[method]} {epochs} ep"


def _run(
    method: str,
    fraction: float,
    seed: int,
    lr: float,
    epsilon: float,
    part: str,
    validate: bool = False,
    lever: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "key": run_key(method, fraction, seed, lr, epsilon, lever),
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "lr": lr,
        "epsilon_target": epsilon,
        "part": part,
        "validate": validate,
        "lever": lever,
        "options": options,
    }


def tuning_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The learning-rate search: every method at every rate of ``--lrs``, seed ``seeds[0]``, with validation.

    Empty when ``--lrs`` has one value (no search).
    """
    if len(args.lrs) < 2 or args.levers:
        return []
    seed = args.seeds[0]
    return [
        _run(m, args.fraction, seed, lr, args.epsilon, "search", validate=True) for m in args.methods for lr in args.lrs
    ]


def choose_lrs(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """Per method, the rate of ``--lrs`` with the best validation accuracy in the search (ties: the smaller).

    With one rate, or when a method's search runs all failed, that method gets ``lrs[0]`` (one rate) or the
    grid's middle value.

    Example:
        >>> import argparse
        >>> a = argparse.Namespace(lrs=[0.01, 0.1], methods=["all"], seeds=[0], fraction=0.2, epsilon=2.0, levers=False)
        >>> runs = [{"key": r["key"], "val_acc": v} for r, v in zip(tuning_plan(a), [0.8, 0.7])]
        >>> choose_lrs(runs, a)
        {'all': 0.01}
    """
    fallback = args.lrs[len(args.lrs) // 2]
    if len(args.lrs) < 2:
        return dict.fromkeys(args.methods, args.lrs[0])
    by_key = {r["key"]: r for r in runs if "error" not in r and r.get("val_acc") is not None}
    chosen: dict[str, float] = {}
    for method in args.methods:
        scored = []
        for lr in sorted(args.lrs):
            run = by_key.get(run_key(method, args.fraction, args.seeds[0], lr, args.epsilon))
            if run is not None:
                scored.append((-run["val_acc"], lr))
        chosen[method] = min(scored)[1] if scored else fallback
    return chosen


def table_plan(args: argparse.Namespace, lrs: dict[str, float]) -> list[dict[str, Any]]:
    """The method table (every method at its rate, every seed) and the profile's extra fractions."""
    runs = [_run(m, args.fraction, s, lrs[m], args.epsilon, "table") for s in args.seeds for m in args.methods]
    for seed in args.seeds:
        for fraction in args.fractions:
            for method in args.sweep_methods:
                lr = lrs.get(method, args.lrs[len(args.lrs) // 2])
                runs.append(_run(method, fraction, seed, lr, args.epsilon, "profile"))
    return _unique(runs)


def top_methods(runs: list[dict[str, Any]], args: argparse.Namespace, lrs: dict[str, float], n: int = 3) -> list[str]:
    """The ``n`` private methods with the best mean test accuracy in the method table."""
    means = []
    for method in args.methods:
        if method in NON_PRIVATE_METHODS:
            continue
        done = _done(runs, {run_key(method, args.fraction, s, lrs[method], args.epsilon) for s in args.seeds})
        if done:
            means.append((-statistics.fmean(r["test_acc"] for r in done), method))
    return [m for _, m in sorted(means)[:n]]


def low_epsilon_plan(args: argparse.Namespace, lrs: dict[str, float], methods: list[str]) -> list[dict[str, Any]]:
    """The chosen methods at ``--low-epsilon``, at the rate chosen at ``--epsilon`` (not searched again)."""
    if args.low_epsilon is None:
        return []
    fallback = args.lrs[len(args.lrs) // 2]
    return [
        _run(m, args.fraction, s, lrs.get(m, fallback), args.low_epsilon, "low_epsilon")
        for s in args.seeds
        for m in methods
    ]


def active_levers(mask_epoch: int) -> list[str]:
    """The levers of :data:`LEVERS` that change something from a baseline with ``T0 = mask_epoch``.

    Example:
        >>> "mask_epoch=1" in active_levers(1), "mask_epoch=2" in active_levers(1)
        (False, True)
    """
    return [lever for lever, (_, changes) in LEVERS.items() if changes != {"mask_epoch": mask_epoch}]


def levers_plan(args: argparse.Namespace, lr: float) -> list[dict[str, Any]]:
    """Every lever of :data:`LEVERS` (``sparta`` with one thing changed) at every seed, at one rate."""
    runs = []
    for seed in args.seeds:
        for lever in active_levers(args.mask_epoch):
            options = lever_options(lever, args.mask_epoch, args.fraction)
            fraction = options["trainable_fraction"]
            runs.append(_run("sparta", fraction, seed, lr, args.epsilon, "lever", lever=lever, options=options))
    return runs


def levers_lr(args: argparse.Namespace) -> tuple[float, str]:
    """The rate of ``--levers``: the single ``--lrs`` value, else ``sparta``'s in the method table, else the middle."""
    if len(args.lrs) == 1:
        return args.lrs[0], "--lrs"
    table = Path(args.out_prefix.removesuffix("_levers")).with_suffix(".json")
    if table.is_file():
        chosen = json.loads(table.read_text()).get("chosen_lrs", {})
        if "sparta" in chosen:
            return float(chosen["sparta"]), f"chosen for sparta in {table.name}"
    return args.lrs[len(args.lrs) // 2], "the grid's middle value (no method table found)"


def _unique(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for run in runs:
        if run["key"] not in seen:
            seen.add(run["key"])
            out.append(run)
    return out


def _done(runs: list[dict[str, Any]], keys: set[str]) -> list[dict[str, Any]]:
    return [r for r in runs if r["key"] in keys and "error" not in r]


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings shared by every run (what ``--resume`` checks)."""
    return {name: getattr(args, name) for name in SETTING_KEYS}


def transfer_config(args: argparse.Namespace, run: dict[str, Any], output: str) -> TransferConfig:
    """The :class:`~lightning_sparta.demo.TransferConfig` of one run (quiet: no logger, checkpoint or bar)."""
    from lightning_sparta.demo import TransferConfig

    method = run["method"]
    options = run.get("options") or {**method_options(method, args.mask_epoch), "trainable_fraction": run["fraction"]}
    # The shared options are named as the config's fields; the rest is the run's own.
    return TransferConfig.from_namespace(
        args,
        **options,
        lr=run["lr"],
        epsilon=run["epsilon_target"],
        pretrain_seed=PRETRAIN_SEED,
        seed=run["seed"],
        output=output,
        progress_bar=False,
        logger=False,
        checkpoint=False,
        save_mask=False,
        validate=run["validate"],
        model_summary=False,
        privacy_callback=False,
        allow_non_private=method in NON_PRIVATE_METHODS,
    )


def run_one(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """One run through :func:`~lightning_sparta.demo.run_transfer`; an exception is recorded, not raised."""
    import torch

    from lightning_sparta.demo import run_transfer

    options = run.get("options") or method_options(run["method"], args.mask_epoch)
    non_private = run["method"] in NON_PRIVATE_METHODS
    record = {
        **run,
        "schedule": schedule(run["method"], args.epochs, options["mask_epoch"])
        if run["lever"] is None
        else run["lever"],
        "mask_epoch": options["mask_epoch"],
        "non_private_method": non_private,
        "privacy": "NON-PRIVATE (mask from true gradients)" if non_private else "(ε, δ)-DP",
    }
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="accuracy_bench_") as output:
            result = run_transfer(transfer_config(args, run, output))
        result.pop("log_dir", None)
        result.pop("global_rank", None)
        record.update(result)
        if not result["private"]:  # whatever the method: the strategy says the run lost its guarantee
            record["privacy"] = f"NON-PRIVATE ({result['non_private_reason']})"
        record["threads"] = torch.get_num_threads()
    except Exception as err:  # one failed run must not lose the others
        record["error"] = f"{type(err).__name__}: {err}"
        record["wall_time_s"] = time.perf_counter() - start
    finally:
        gc.collect()
    return record


# ---------------------------------------------------------------------------------------- machine
def machine_description() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), core counts and library versions."""
    import lightning
    import opacus
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "opacus": opacus.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(machine: dict[str, Any]) -> str:
    """The machine in one line, for the Markdown."""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (
        f"CPU {machine['cpu']} ({machine['cpu_count']} cores, {machine['usable_cpus']} usable, torch threads "
        f"{machine['torch_threads']}){gpu}; Python {machine['python']}, torch {machine['torch']}, "
        f"lightning {machine['lightning']}, opacus {machine['opacus']}; {machine['platform']}"
    )


# ---------------------------------------------------------------------------------------- results
def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it the usual permissions
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: ε = inf is written as the string ``"inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _number(value: Any) -> float:
    return float(value) if isinstance(value, str) else value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the results atomically (a crash mid-write leaves the previous file)."""
    _write_atomic(path, json.dumps(_json_safe(payload), indent=1) + "\n")


def load_previous(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """An earlier JSON with the same settings (``{}`` when there is none), for ``--resume``.

    Raises:
        ValueError: If the file's settings differ from ``settings`` (the message names them).
    """
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    old = payload.get("settings", {})
    different = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if different:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in different.items())
        raise ValueError(f"--resume: {path} was written with other settings ({detail}); use another --out-prefix.")
    return payload


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _acc(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if math.isfinite(std) else f"{100 * mean:.2f} (1 seed)"


def _label(method: str) -> str:
    return f"{method} (NON-PRIVATE)" if method in NON_PRIVATE_METHODS else method


def _acc_of(done: list[dict[str, Any]]) -> str:
    return _acc([r["test_acc"] for r in done])


def _eps_text(done: list[dict[str, Any]], method: str) -> str:
    eps = max(_number(r["epsilon"]) for r in done)
    if method in NON_PRIVATE_METHODS or not math.isfinite(eps):
        dp_eps = max(_number(r["epsilon_dp_sgd"]) for r in done)
        return f"∞, **NON-PRIVATE** mask (DP-SGD steps alone: {dp_eps:.3f})"
    return f"{eps:.3f}"


def search_table(runs: list[dict[str, Any]], args: argparse.Namespace, lrs: dict[str, float]) -> str:
    """Validation accuracy per method and learning rate (seed ``seeds[0]``); the chosen rate in bold."""
    grid = sorted(args.lrs)
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
        "|---|" + "---:|" * len(grid) + "---:|",
    ]
    by_key = {r["key"]: r for r in runs}
    for method in args.methods:
        cells = []
        for lr in grid:
            run = by_key.get(run_key(method, args.fraction, args.seeds[0], lr, args.epsilon))
            if run is None:
                cells.append("not run")
            elif "error" in run or run.get("val_acc") is None:
                cells.append("failed")
            else:
                text = f"{100 * run['val_acc']:.1f} (test {100 * run['test_acc']:.1f})"
                cells.append(f"**{text}**" if lr == lrs.get(method) else text)
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + f" | {lrs.get(method, float('nan')):g} |")
    return "\n".join(lines)


def method_table(
    runs: list[dict[str, Any]], args: argparse.Namespace, lrs: dict[str, float], epsilon: float, methods: list[str]
) -> str:
    """Mean ± std test accuracy over seeds, ε reached, trainable parameters and wall time, per method."""
    lines = [
        f"| method | schedule (T = {args.epochs}, T0 = {args.mask_epoch}) | lr | test accuracy % (mean ± std) | "
        "seeds | ε reached (max over seeds) | trainable params (% of model) | mean wall time (s) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for method in methods:
        lr = lrs.get(method, args.lrs[len(args.lrs) // 2])
        keys = {run_key(method, args.fraction, s, lr, epsilon) for s in args.seeds}
        done = _done(runs, keys)
        failed = [r for r in runs if r["key"] in keys and "error" in r]
        sched = schedule(method, args.epochs, method_mask_epoch(method, args.mask_epoch))
        if method not in FIXED_METHODS:
            sched += f", {args.fraction:g} of {'rows' if method in ROW_METHODS else 'entries'}"
        if not done:
            why = f"failed: {failed[0]['error'][:80]}" if failed else "not run"
            lines.append(f"| {_label(method)} | {sched} | {lr:g} | {why} | 0 | | | |")
            continue
        trainable = statistics.fmean(r["trainable_params"] for r in done)
        share = statistics.fmean(r["trainable_param_fraction"] for r in done)
        seeds = f"{len(done)}" + (f" ({len(failed)} failed)" if failed else "")
        lines.append(
            f"| {_label(method)} | {sched} | {lr:g} | {_acc_of(done)} | {seeds} | {_eps_text(done, method)} | "
            f"{trainable:,.0f} ({100 * share:.1f}%) | {statistics.fmean(r['wall_time_s'] for r in done):.0f} |"
        )
    return "\n".join(lines)


def levers_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Per lever: what changes, mean ± std test accuracy, the change against the baseline."""
    lines = [
        f"| lever | what changes (from sparta, T0 = {args.mask_epoch}, fraction {args.fraction:g}) | "
        "test accuracy % (mean ± std) | seeds | Δ vs baseline (points) | ε reached | mean wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    groups = {
        lever: [r for r in runs if r.get("lever") == lever and "error" not in r]
        for lever in active_levers(args.mask_epoch)
    }
    base = groups["baseline"]
    base_mean = statistics.fmean(r["test_acc"] for r in base) if base else None
    for lever, done in groups.items():
        if not done:
            lines.append(f"| {lever} | {LEVERS[lever][0]} | not run or failed | 0 | | | |")
            continue
        mean = statistics.fmean(r["test_acc"] for r in done)
        delta = "" if base_mean is None or lever == "baseline" else f"{100 * (mean - base_mean):+.2f}"
        lines.append(
            f"| {lever} | {LEVERS[lever][0]} | {_acc_of(done)} | {len(done)} | {delta} | {_eps_text(done, 'sparta')} | "
            f"{statistics.fmean(r['wall_time_s'] for r in done):.0f} |"
        )
    return "\n".join(lines)


def profile_points(runs: list[dict[str, Any]], args: argparse.Namespace, lrs: dict[str, float]) -> dict[str, list]:
    """Per sweep method: ``(fraction, mean acc, std acc, n, mean trainable share)`` sorted by fraction."""
    points: dict[str, list[tuple]] = {}
    if not args.fractions:
        return points
    for method in args.sweep_methods:
        lr = lrs.get(method, args.lrs[len(args.lrs) // 2])
        for fraction in sorted(set(args.fractions) | {args.fraction}):
            done = _done(runs, {run_key(method, fraction, s, lr, args.epsilon) for s in args.seeds})
            if done:
                mean, std = _mean_std([r["test_acc"] for r in done])
                share = statistics.fmean(r["trainable_param_fraction"] for r in done)
                points.setdefault(method, []).append((fraction, mean, std, len(done), share))
    return points


def profile_table(points: dict[str, list[tuple]]) -> str:
    """Test accuracy against the trainable fraction (rows for ``sparta``, entries for the others)."""
    lines = [
        "| method | fraction of rows/entries | test accuracy % (mean ± std) | seeds | trainable params (% of model) |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, rows in points.items():
        for fraction, mean, std, n, share in rows:
            acc = f"{100 * mean:.2f} ± {100 * std:.2f}" if math.isfinite(std) else f"{100 * mean:.2f} (1 seed)"
            lines.append(f"| {_label(method)} | {fraction:g} | {acc} | {n} | {100 * share:.1f}% |")
    return "\n".join(lines)


def plot_points(runs: list[dict[str, Any]], args: argparse.Namespace, lrs: dict[str, float]) -> dict[str, list]:
    """Per method (or lever): ``(trainable share, ε target, mean acc, std acc)`` of its finished runs."""
    groups: dict[tuple[str, float, float], list[float]] = {}
    shares: dict[tuple[str, float, float], list[float]] = {}
    for run in runs:
        if "error" in run or (run["part"] == "search" and run["lr"] != lrs.get(run["method"])):
            continue
        label = f"lever {run['lever']}" if run.get("lever") else run["method"]
        group = (label, run["fraction"] if run["method"] not in FIXED_METHODS else -1.0, run["epsilon_target"])
        groups.setdefault(group, []).append(run["test_acc"])
        shares.setdefault(group, []).append(run["trainable_param_fraction"])
    points: dict[str, list] = {}
    for (label, _, eps), accs in sorted(groups.items()):
        mean, std = _mean_std(accs)
        share = statistics.fmean(shares[(label, _, eps)])
        points.setdefault(label, []).append((share, eps, mean, std if math.isfinite(std) else 0.0))
    return points


def plot_results(runs: list[dict[str, Any]], args: argparse.Namespace, lrs: dict[str, float], path: Path) -> bool:
    """Test accuracy against the trainable share of the model (log x) and, with ``--low-epsilon``, against ε."""
    points = plot_points(runs, args, lrs)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({p[1] for rows in points.values() for p in rows})
    fig, axes = plt.subplots(1, 2 if len(epsilons) > 1 else 1, figsize=(11 if len(epsilons) > 1 else 6.6, 4.6))
    axes = list(axes) if len(epsilons) > 1 else [axes]
    markers = "osD^v<>pPX*h"
    for i, (label, rows) in enumerate(points.items()):
        main = sorted((p for p in rows if p[1] == args.epsilon), key=lambda p: p[0])
        if main:
            axes[0].errorbar(
                [100 * p[0] for p in main],
                [100 * p[2] for p in main],
                yerr=[100 * p[3] for p in main],
                marker=markers[i % len(markers)],
                capsize=4,
                linestyle="-" if len(main) > 1 else "none",
                label=_label(label),
            )
        if len(epsilons) > 1:
            by_eps = {}
            for p in rows:  # the table's fraction (one point per ε)
                by_eps.setdefault(p[1], p)
            if len(by_eps) > 1:
                pts = sorted(by_eps.values(), key=lambda p: p[1])
                axes[1].errorbar(
                    [p[1] for p in pts],
                    [100 * p[2] for p in pts],
                    yerr=[100 * p[3] for p in pts],
                    marker=markers[i % len(markers)],
                    capsize=4,
                    label=_label(label),
                )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable share of the model's parameters, sparse phase (%, log scale)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(
        f"{args.model}, Fashion-MNIST ({'10' if args.model != 'gn_cnn' else '5'} classes), ε = {args.epsilon:g}, "
        f"n = {args.train_subset}, T = {args.epochs}, {len(args.seeds)} seed(s)",
        fontsize=9,
    )
    if len(axes) > 1:
        axes[1].set_xlabel(f"ε (δ = {args.delta:g})")
        axes[1].set_ylabel("test accuracy (%)")
        axes[1].set_title("top methods at each ε (rate chosen at the main ε)", fontsize=9)
        axes[1].legend(fontsize=7)
        axes[1].grid(True, alpha=0.3)
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _task_line(args: argparse.Namespace, first: dict[str, Any]) -> str:
    if args.model == "gn_cnn":
        return (
            f"GroupNorm CNN pretrained without privacy on Fashion-MNIST classes 0-4 ({args.pretrain_epochs} epochs, "
            f"seed {PRETRAIN_SEED}); private fine-tuning on classes 5-9 with a fresh head on {args.train_subset} "
            f"training examples (a fixed subset); test on the {first.get('test_size', '?')} test images of classes 5-9."
        )
    return (
        f"EfficientNet-Lite0 with Google's ImageNet weights (timm `tf_efficientnet_lite0`, BatchNorm with frozen "
        f"statistics), a fresh 10-way head; private fine-tuning on all ten Fashion-MNIST classes, "
        f"{args.train_subset} training examples (a fixed subset), images upsampled to {args.image_size} px and "
        f"replicated to RGB; test on {'a fixed random subset of ' if args.test_subset else ''}"
        f"{first.get('test_size', '?')} official test images."
    )


def markdown_report(payload: dict[str, Any], args: argparse.Namespace, png: Path | None) -> str:
    """The Markdown report: command, machine, settings, the search, the tables and how to read them."""
    runs = payload["runs"]
    lrs = payload.get("chosen_lrs") or {}
    done = [r for r in runs if "error" not in r]
    first = done[0] if done else {}
    main_eps = [r for r in done if r["epsilon_target"] == args.epsilon]
    sigma = f"{main_eps[0]['noise_multiplier']:.3f}" if main_eps and main_eps[0].get("noise_multiplier") else "?"
    steps = f"{first['steps']}" if first else "?"
    mode = " (--quick: a smoke test, not the benchmark's results)" if args.quick else ""
    what = "SPARTA's schedule levers, one at a time" if args.levers else "SPARTA and the competing methods"
    search = len(args.lrs) > 1 and not args.levers
    lines = [
        f"# Accuracy at equal ε: {what}{mode}",
        "",
        f"Command: `{payload['command']}`" + "".join(f"; resumed with `{c}`" for c in payload.get("resumed_with", [])),
        "",
        f"Machine: {machine_line(payload['machine'])}.",
        "",
        f"Started {payload['started']}, finished {payload['updated']}; {len(done)} of {len(runs)} runs "
        "succeeded; wall time of the runs "
        f"{sum(r['wall_time_s'] for r in runs) / 60:.1f} min in all (this invocation: "
        f"{payload.get('elapsed_s', 0.0) / 60:.1f} min).",
        "",
        "## Settings (the same for every method)",
        "",
        f"- Task: {_task_line(args, first)}",
        f"- Privacy: (ε, δ) = ({args.epsilon:g}, {args.delta:g}), C = {args.max_grad_norm:g}, PRV accountant; "
        f"q = {args.batch_size}/{args.train_subset}, {args.epochs} epochs = {steps} private steps (scoring "
        f"included), σ = {sigma} for every method at ε = {args.epsilon:g}.",
        f"- Optimisation: SGD, momentum 0.9, one epoch of linear warm-up then cosine decay; expected batch "
        f"{args.batch_size} (Poisson), micro-batches of {args.physical_batch_size}.",
        f"- Seeds {', '.join(map(str, args.seeds))} (head initialisation, sampling, noise, random mask).",
    ]
    if search:
        lines.append(
            f"- Learning rate: per method, the best of {', '.join(f'{lr:g}' for lr in sorted(args.lrs))} by the "
            f"last-epoch accuracy on a validation split held out of the private training data (10% of the subset "
            f"size, disjoint from it), at seed {args.seeds[0]}. **The privacy cost of this selection is not "
            "accounted** (as in the paper and in Cattan et al. 2022): ε below is that of each training run."
        )
    else:
        lr_text = f"{args.lrs[0]:g}" if len(args.lrs) == 1 else f"{payload.get('levers_lr', '?')}"
        lines.append(f"- Learning rate: {lr_text} for every run ({payload.get('levers_lr_source', 'no search')}).")
    lines += [
        f"- Schedules: the `sparta` variants, `dp_gradient`, `oracle` and `random` train DP-BitFit for T0 = "
        f"{args.mask_epoch} epoch(s), then their mask; `all`, `last`, `bitfit`, `layers` and `magnitude` (MP) "
        "train their set from epoch 0. Scoring epochs are accounted like DP-SGD epochs.",
        "",
    ]
    if args.levers:
        lines += ["## The levers (one change at a time from `sparta`)", "", levers_table(runs, args), ""]
    else:
        if search:
            lines += [
                f"## Learning-rate search (validation accuracy %, seed {args.seeds[0]}; test accuracy in brackets)",
                "",
                search_table(runs, args, lrs),
                "",
            ]
        lines += [
            f"## Test accuracy per method at ε = {args.epsilon:g} (trainable fraction {args.fraction:g})",
            "",
            method_table(runs, args, lrs, args.epsilon, args.methods),
            "",
            "Accuracy: mean ± sample standard deviation over seeds. ε: reached by the run (PRV accountant at δ), "
            "the largest over seeds. Trainable params: after the mask (the sparse phase), biases, norms and head "
            "included. Wall time: the whole run (data, training, test), mean over seeds.",
            "",
        ]
        low = payload.get("low_epsilon_methods") or []
        if args.low_epsilon is not None and low:
            lines += [
                f"## Test accuracy at ε = {args.low_epsilon:g} (the top methods, at the rate chosen at ε = "
                f"{args.epsilon:g})",
                "",
                method_table(runs, args, lrs, args.low_epsilon, low),
                "",
            ]
        points = profile_points(runs, args, lrs)
        if points:
            lines += ["## Test accuracy against the trainable fraction", "", profile_table(points), ""]
    if png is not None:
        lines += [f"![test accuracy against the trainable share]({png.name})", ""]
    failed = [r for r in runs if "error" in r]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['key']}`: {r['error']}" for r in failed] + [""]
    return "\n".join(lines)


def report(payload: dict[str, Any], args: argparse.Namespace, prefix: Path) -> str:
    """Write the PNG and the Markdown next to the JSON; return the Markdown."""
    png = prefix.with_name(prefix.name + "_vs_fraction.png")
    made = plot_results(payload["runs"], args, payload.get("chosen_lrs") or {}, png)
    text = markdown_report(payload, args, png if made else None)
    _write_atomic(prefix.with_suffix(".md"), text)
    return text


# ---------------------------------------------------------------------------------------- driver
@contextlib.contextmanager
def _quiet(enabled: bool = True) -> Iterator[None]:
    """Hide Lightning's per-run info logs and warnings while the benchmark runs, then restore them."""
    if not enabled:
        yield
        return
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import: import it first

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_sparta")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                logging.getLogger(name).setLevel(logging.WARNING)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the JSON payload.

    Args:
        argv: The command line (``sys.argv[1:]`` when None).

    Returns:
        ``{"command", "settings", "machine", "started", "updated", "chosen_lrs", "runs", "elapsed_s", ...}`` as
        written to PREFIX.json (ε = inf stays a float here; the JSON has the string ``"inf"``).
    """
    args = parse_args(argv)
    if args.threads is not None:  # before Lightning's DDP launcher picks a thread count from the CPU count
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    with _quiet(not args.verbose):
        return _benchmark(args, sys.argv[1:] if argv is None else argv)


class _Runner:
    """Runs planned runs one after the other, reusing finished ones, and rewrites the JSON after each."""

    def __init__(self, args: argparse.Namespace, payload: dict[str, Any], previous: dict[str, dict], path: Path):
        self.args, self.payload, self.previous, self.path = args, payload, previous, path
        self.times: list[float] = []
        self.pretrained = False

    def _pretrain(self) -> None:
        if self.pretrained or self.args.model != "gn_cnn":
            return
        from lightning_sparta.demo import pretrain_public
        from lightning_sparta.demo.transfer import TRANSFER_MODEL

        start = time.perf_counter()
        weights = pretrain_public(
            TRANSFER_MODEL,
            data_dir=self.args.data_dir,
            epochs=self.args.pretrain_epochs,
            seed=PRETRAIN_SEED,
            image_size=self.args.image_size,
        )
        print(f"Public pretrained model: {weights} ({time.perf_counter() - start:.0f} s)", flush=True)
        self.pretrained = True

    def run(self, todo: list[dict[str, Any]], phase: str) -> None:
        have = {r["key"] for r in self.payload["runs"]}
        todo = [r for r in todo if r["key"] not in have]
        print(f"== {phase}: {len(todo)} runs", flush=True)
        for i, run in enumerate(todo, 1):
            if run["key"] in self.previous:
                self.payload["runs"].append(self.previous[run["key"]])
                print(f"[{i}/{len(todo)}] {run['key']}: kept from {self.path.name}", flush=True)
                continue
            self._pretrain()
            record = run_one(self.args, run)
            self.payload["runs"].append(record)
            self.payload["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_json(self.path, self.payload)
            self.times.append(record["wall_time_s"])
            left = sum(1 for r in todo[i:] if r["key"] not in self.previous)
            eta = f", about {left * statistics.fmean(self.times) / 60:.0f} min left in this phase" if left else ""
            if "error" in record:
                outcome = f"FAILED {record['error']}"
            else:
                eps = record["epsilon"]
                eps_text = f"ε={eps:.3f}" if math.isfinite(eps) else "ε=inf NON-PRIVATE"
                val = f"val_acc={record['val_acc']:.4f} " if record.get("val_acc") is not None else ""
                outcome = (
                    f"{val}test_acc={record['test_acc']:.4f} {eps_text} trainable={record['trainable_params']:,} "
                    f"({record['trainable_param_fraction']:.1%})"
                )
            print(f"[{i}/{len(todo)}] {run['key']:40s} {outcome}  ({record['wall_time_s']:.0f} s{eta})", flush=True)


def _benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the phases (skipping the runs kept by ``--resume``), write the JSON, the Markdown and the plot."""
    prefix = Path(args.out_prefix)
    json_path = prefix.with_suffix(".json")
    settings = settings_of(args)
    try:
        old = load_previous(json_path, settings) if args.resume or args.report_only else {}
    except ValueError as err:
        build_parser().error(str(err))
    if args.report_only:
        if not old:
            build_parser().error(f"--report-only: no results in {json_path}")
        text = report(old, args, prefix)
        print(text, flush=True)
        return old
    previous = {r["key"]: r for r in old.get("runs", []) if "error" not in r}  # failed runs are run again
    command = shlex.join(["python", "benchmarks/accuracy.py", *argv])
    payload: dict[str, Any] = {
        "command": old.get("command", command),
        "resumed_with": list(old.get("resumed_with", [])),  # the resumes that ran something
        "settings": settings,
        "lrs": args.lrs,
        "lr_selection": (
            f"per method, best validation accuracy at seed {args.seeds[0]} on a split held out of the private "
            "training data; the selection's own privacy cost is NOT accounted"
            if len(args.lrs) > 1 and not args.levers
            else "one learning rate, no selection"
        ),
        "non_private_methods": list(NON_PRIVATE_METHODS),
        "machine": machine_description(),
        "started": old.get("started") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "updated": None,
        "chosen_lrs": {},
        "runs": [],
    }
    print(
        f"{args.model}: ε = {args.epsilon:g}, n = {args.train_subset}, {args.image_size} px, T = {args.epochs}, "
        f"T0 = {args.mask_epoch}, lrs {args.lrs}, seeds {args.seeds}; {len(previous)} runs reusable from "
        f"{json_path}; {machine_line(payload['machine'])}",
        flush=True,
    )
    start = time.perf_counter()
    runner = _Runner(args, payload, previous, json_path)
    if args.levers:
        lr, source = levers_lr(args)
        payload["levers_lr"], payload["levers_lr_source"] = lr, source
        runner.run(levers_plan(args, lr), f"levers at lr {lr:g} ({source})")
    else:
        runner.run(tuning_plan(args), "learning-rate search")
        payload["chosen_lrs"] = chosen = choose_lrs(payload["runs"], args)
        print(f"Chosen learning rates: {chosen}", flush=True)
        runner.run(table_plan(args, chosen), "method table")
        if args.low_epsilon is not None:
            low = args.low_epsilon_methods or top_methods(payload["runs"], args, chosen)
            payload["low_epsilon_methods"] = low
            runner.run(low_epsilon_plan(args, chosen, low), f"ε = {args.low_epsilon:g}")
    kept = {r["key"] for r in payload["runs"]}
    payload["runs"] += [r for key, r in previous.items() if key not in kept]  # other runs are kept, unused
    if runner.times or not old:
        payload["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        payload["elapsed_s"] = time.perf_counter() - start
        if old:
            payload["resumed_with"].append(command)
    else:  # nothing left to run: only the report is rebuilt
        payload["updated"], payload["elapsed_s"] = old.get("updated"), old.get("elapsed_s", 0.0)
    write_json(json_path, payload)
    text = report(payload, args, prefix)
    print("\n" + text, flush=True)
    print(f"Wrote {json_path}, {prefix.with_suffix('.md')} and the plot next to them.", flush=True)
    return payload


if __name__ == "__main__":
    main()
