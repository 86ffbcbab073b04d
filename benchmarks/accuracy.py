"""Test accuracy of SPARTA and every competing method at the same (ε, δ), on the main job's transfer task.

The task is the main job's (``examples/fashion_mnist_sparta.py``), run through the same function,
:func:`lightning_sparta.demo.run_transfer`: a GroupNorm CNN pretrained without privacy on the "public"
Fashion-MNIST classes 0-4 (cached under ``~/.cache/lightning_sparta/pretrained``; one public model,
pretraining seed 0, for every run), then fine-tuned with DP-SGD on the "private" classes 5-9 with a
fresh 5-way head, and tested on the official test split of classes 5-9 (5000 images).

Every method runs with the same (ε, δ), epochs ``T``, expected batch size, micro-batch size, learning
rate and schedule (SGD, momentum 0.9, one epoch of linear warm-up then cosine decay), clipping norm
and seeds. σ is calibrated for the whole run (``T`` epochs of Poisson steps, SPARTA's scoring epoch
included), so it is the same for every method at a given ``T``. The seed drives the private run only:
head initialisation, Poisson sampling, noise and the random mask.

Methods (the paper's Sections 5-6; ``T0`` is ``--mask-epoch``):

==============  =====================================================================================
``sparta``      Algorithm 1: DP-BitFit for ``T0`` epochs, one private scoring epoch (Σ|clip(g)| + noise,
                summed per row), the top rows of every conv/linear layer for the remaining epochs.
``dp_gradient`` Algorithm 2: as SPARTA, but the top *entries* of |Σ (clip(g) + noise)| (no grouping).
``oracle``      Algorithm 3: as ``dp_gradient``, but the top entries of Σ|g| over the true (unclipped,
                noiseless) gradients. **NON-PRIVATE**: its ε is ∞; training itself is still DP-SGD.
``random``      DP-BitFit for ``T0`` epochs, then a uniformly random mask of entries from epoch ``T0``
                on (no scoring epoch, so one more sparse epoch): the control that isolates the selection.
``magnitude``   Algorithm 4 (MP, Luo et al.): the top entries of |W_old|, trained from epoch 0.
``all``         Full DP fine-tuning (every weight) from epoch 0.
``last``        The head and the normalisation layers (the paper's "Last") from epoch 0.
``bitfit``      DP-BitFit (biases, normalisation layers, head) from epoch 0.
==============  =====================================================================================

So ``sparta``, ``dp_gradient``, ``oracle`` and ``random`` follow the paper's SPARTA schedule (DP-BitFit
warm-up, then their mask at ``T0``); the fixed sets and MP train their set for all ``T`` epochs
(``mask_epoch=0``), as in Algorithm 4. The mask-based methods keep ``--fraction`` of the rows
(``sparta``) or entries (the others) of every scored layer; the biases, normalisation layers and head
always train with them.

The runs: every method of ``--methods`` at ``--fraction`` for every seed (the method table), then
the accuracy/trainable-fraction profile (the paper's Figure 3) for ``sparta`` and ``magnitude`` at
every ``--fractions`` value and seed (runs already in the method table are reused). They run one
after the other in this process, quietly: no TensorBoard logger, checkpoint, validation pass or
per-step ε logging (each ε costs about half a second with the PRV accountant); ε is read from the
accountant at the end of each run. Training is exactly the main job's.

Sizing of the full mode (the default): 48 runs (8 methods × 3 seeds, plus ``sparta`` and ``magnitude``
at 4 more fractions × 3 seeds). The main job's whole private training set (25,000 images) would take
about 2 minutes per run, close to 2 hours in all, so the full mode uses a fixed subset of 10,000 private
training examples (``--train-subset``) and keeps the main job's schedule and hyper-parameters otherwise
(``T = 8``, ``T0 = 2``, batch 500, micro-batch 250, lr 0.1, ε = 2; q = 0.05, 20 steps per epoch, 160
steps per run against the main job's 400). Measured on the 2-core AMD EPYC machine while it was nearly
idle (2 torch threads): 40-60 s per run (``sparta`` 51 s, ``all`` 55 s, ``oracle`` 49 s, ``sparta`` at
fraction 0.01 40 s and at 1.0 57 s), so about 40 minutes for the 48 runs; the margin up to 60-75 minutes
is for the other jobs that share the two cores (under heavy load runs took 3-5 times longer; ``--resume``
continues an interrupted benchmark).

Outputs, written under ``benchmarks/results/`` (``--out-prefix``): ``accuracy_cpu.md`` (the command,
the machine, the settings, the method table with mean ± std test accuracy, ε reached and mean wall time,
the profile table), ``accuracy_cpu.json`` (every run's raw result, rewritten after each run, so a
crash loses nothing; ``--resume`` skips the runs already there) and ``accuracy_cpu_vs_fraction.png``.
``--quick`` (seed 0, 2,500 examples, 4 epochs, ``T0 = 1``, fractions 0.05 and 0.2: 10 runs in a few
minutes) writes ``accuracy_quick.*`` instead, so it never overwrites the full results.

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

METHODS = ("sparta", "all", "last", "bitfit", "magnitude", "random", "dp_gradient", "oracle")
#: Methods with the SPARTA schedule: DP-BitFit for T0 epochs, then their mask.
WARMUP_METHODS = ("sparta", "dp_gradient", "oracle", "random")
#: Methods whose mask is chosen from a scoring epoch at T0.
SCORING_METHODS = ("sparta", "dp_gradient", "oracle")
#: Methods without a mask (a fixed trainable set): the trainable fraction does not apply.
FIXED_METHODS = ("all", "last", "bitfit")
#: Methods whose mask is not differentially private.
NON_PRIVATE_METHODS = ("oracle",)
SWEEP_METHODS = ("sparta", "magnitude")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRETRAIN_SEED = 0

#: Defaults of the full mode and of ``--quick`` (see the module docstring for the sizing).
FULL = {"seeds": "0,1,2", "train_subset": 10000, "epochs": 8, "mask_epoch": 2, "fractions": "0.01,0.05,0.2,0.5,1.0"}
QUICK = {"seeds": "0", "train_subset": 2500, "epochs": 4, "mask_epoch": 1, "fractions": "0.05,0.2"}

#: Settings that must match for ``--resume`` to reuse earlier runs.
SETTING_KEYS = (
    "epsilon",
    "delta",
    "max_grad_norm",
    "epochs",
    "mask_epoch",
    "train_subset",
    "batch_size",
    "physical_batch_size",
    "lr",
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
    return f"(default {FULL[name]}; --quick {QUICK[name]})"


def build_parser() -> argparse.ArgumentParser:
    """The command line (``None`` defaults are filled in by :func:`parse_args` from the mode)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--quick",
        action="store_true",
        help="smoke test in a few minutes: seeds {seeds}, {train_subset} examples, {epochs} epochs, "
        "fractions {fractions}; writes accuracy_quick.*".format(**QUICK),
    )
    what.add_argument(
        "--methods", type=_csv(str, "--methods"), default=list(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    what.add_argument(
        "--seeds", type=_csv(int, "--seeds"), default=None, help="comma-separated seeds " + _mode_help("seeds")
    )
    what.add_argument(
        "--fraction", type=float, default=0.2, help="trainable fraction of the method table (default: %(default)s)"
    )
    what.add_argument(
        "--fractions",
        type=_csv(float, "--fractions"),
        default=None,
        help="fractions of the profile plot, '' for none " + _mode_help("fractions"),
    )
    what.add_argument(
        "--sweep-methods",
        type=_csv(str, "--sweep-methods"),
        default=list(SWEEP_METHODS),
        help="methods of the profile plot (default: sparta,magnitude)",
    )
    dp = parser.add_argument_group("privacy and training (the same for every method)")
    dp.add_argument("--epsilon", type=float, default=2.0, help="target ε of every run (default: %(default)s)")
    dp.add_argument("--delta", type=float, default=1e-5, help="δ (default: %(default)g)")
    dp.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C (default: %(default)s)")
    dp.add_argument("--epochs", type=int, default=None, help="T, epochs per run " + _mode_help("epochs"))
    dp.add_argument(
        "--mask-epoch", type=int, default=None, help="T0 of the SPARTA schedule " + _mode_help("mask_epoch")
    )
    dp.add_argument(
        "--train-subset", type=int, default=None, help="private training examples " + _mode_help("train_subset")
    )
    dp.add_argument("--batch-size", type=int, default=500, help="expected logical batch (default: %(default)s)")
    dp.add_argument("--physical-batch-size", type=int, default=250, help="micro-batch size (default: %(default)s)")
    dp.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (default: %(default)s)")
    dp.add_argument("--pretrain-epochs", type=int, default=3, help="public pretraining epochs (default: %(default)s)")
    io = parser.add_argument_group("machine, input and output")
    io.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (default: %(default)s)")
    io.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's and Lightning's choice)")
    io.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    io.add_argument(
        "--out-prefix",
        default=None,
        help="output path without extension (default benchmarks/results/accuracy_<accelerator>, "
        "benchmarks/results/accuracy_quick with --quick): writes PREFIX.md, PREFIX.json, PREFIX_vs_fraction.png",
    )
    io.add_argument("--resume", action="store_true", help="keep the runs already in PREFIX.json, run the others")
    io.add_argument("--verbose", action="store_true", help="show Lightning's logs and warnings")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; fill in the defaults of the mode (full or ``--quick``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.seeds is None:
        args.seeds = _csv(int, "--seeds")(mode["seeds"])
    if args.fractions is None:
        args.fractions = _csv(float, "--fractions")(mode["fractions"])
    for name in ("train_subset", "epochs", "mask_epoch"):
        if getattr(args, name) is None:
            setattr(args, name, mode[name])
    for name, values, allowed in (("methods", args.methods, METHODS), ("sweep-methods", args.sweep_methods, METHODS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}, choose from {list(allowed)}")
    fixed = sorted(set(args.sweep_methods) & set(FIXED_METHODS))
    if fixed:
        parser.error(f"--sweep-methods: {fixed} train a fixed set, they have no trainable fraction to sweep")
    if not args.methods and not (args.fractions and args.sweep_methods):
        parser.error("--methods is empty and there is no profile to run: nothing to do")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    for name, value in (("fraction", [args.fraction]), ("fractions", args.fractions)):
        if any(not 0 < f <= 1 for f in value):
            parser.error(f"--{name} must be in (0, 1], got {value}")
    if args.epochs < 1 or not 0 <= args.mask_epoch < args.epochs:
        parser.error(f"need --epochs >= 1 and 0 <= --mask-epoch < --epochs, got {args.epochs} and {args.mask_epoch}")
    scoring = sorted(
        (set(args.methods) | (set(args.sweep_methods) if args.fractions else set())) & set(SCORING_METHODS)
    )
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
        args.out_prefix = str(RESULTS_DIR / ("accuracy_quick" if args.quick else f"accuracy_{args.accelerator}"))
    return args


# ---------------------------------------------------------------------------------------- the runs
def run_key(method: str, fraction: float | None, seed: int) -> str:
    """The identifier of one run in the JSON: ``method|fraction|seed`` (fraction ``-`` for fixed sets).

    Example:
        >>> run_key("sparta", 0.2, 1), run_key("all", 0.2, 0)
        ('sparta|0.2|1', 'all|-|0')
    """
    return f"{method}|{'-' if method in FIXED_METHODS or fraction is None else f'{fraction:g}'}|{seed}"


def method_mask_epoch(method: str, mask_epoch: int) -> int:
    """``T0`` for the methods with the SPARTA schedule, 0 (their set from the start) for the others."""
    return mask_epoch if method in WARMUP_METHODS else 0


def schedule(method: str, epochs: int, mask_epoch: int) -> str:
    """A short description of what trains when, for the tables.

    Example:
        >>> schedule("sparta", 8, 2)
        'DP-BitFit 2 ep → scoring 1 ep → sparse rows 5 ep'
        >>> schedule("magnitude", 8, 2)
        'mask from the magnitude of W_old → sparse entries 8 ep'
    """
    warmup = f"DP-BitFit {mask_epoch} ep → " if mask_epoch else ""
    if method == "sparta":
        return f"{warmup}scoring 1 ep → sparse rows {epochs - mask_epoch - 1} ep"
    if method in SCORING_METHODS:
        return f"{warmup}scoring 1 ep → sparse entries {epochs - mask_epoch - 1} ep"
    if method == "random":
        return f"{warmup}random mask → sparse entries {epochs - mask_epoch} ep"
    if method == "magnitude":
        return f"mask from the magnitude of W_old → sparse entries {epochs} ep"
    return {"all": "all weights", "last": "head + norms", "bitfit": "DP-BitFit"}[method] + f" {epochs} ep"


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run to do, seed by seed: the method table first, then the profile's extra fractions."""
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(method: str, fraction: float, seed: int, part: str) -> None:
        key = run_key(method, fraction, seed)
        if key not in seen:
            seen.add(key)
            runs.append({"key": key, "method": method, "fraction": fraction, "seed": seed, "part": part})

    for seed in args.seeds:
        for method in [m for m in METHODS if m in args.methods]:
            add(method, args.fraction, seed, "table")
    for seed in args.seeds:
        for fraction in args.fractions:
            for method in args.sweep_methods:
                add(method, fraction, seed, "profile")
    return runs


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings shared by every run (what ``--resume`` checks)."""
    return {name: getattr(args, name) for name in SETTING_KEYS}


def transfer_config(args: argparse.Namespace, run: dict[str, Any], output: str) -> TransferConfig:
    """The :class:`~lightning_sparta.demo.TransferConfig` of one run (quiet: no logger, checkpoint or bar)."""
    from lightning_sparta.demo import TransferConfig

    method = run["method"]
    # The shared options are named as the config's fields; the rest is the run's own.
    return TransferConfig.from_namespace(
        args,
        selector=method,
        trainable_fraction=run["fraction"],
        mask_epoch=method_mask_epoch(method, args.mask_epoch),
        pretrain_seed=PRETRAIN_SEED,
        seed=run["seed"],
        output=output,
        progress_bar=False,
        logger=False,
        checkpoint=False,
        save_mask=False,
        validate=False,
        model_summary=False,
        privacy_callback=False,
        allow_non_private=method in NON_PRIVATE_METHODS,
    )


def run_one(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """One run through :func:`~lightning_sparta.demo.run_transfer`; an exception is recorded, not raised."""
    import torch

    from lightning_sparta.demo import run_transfer

    mask_epoch = method_mask_epoch(run["method"], args.mask_epoch)
    non_private = run["method"] in NON_PRIVATE_METHODS
    record = {
        **run,
        "schedule": schedule(run["method"], args.epochs, mask_epoch),
        "mask_epoch": mask_epoch,
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


def method_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Mean ± std test accuracy over seeds, ε reached, trainable parameters and wall time, per method."""
    lines = [
        f"| method | schedule (T0 = {args.mask_epoch}) | test accuracy % (mean ± std) | seeds | "
        "ε reached (max over seeds) | trainable params (% of model) | mean wall time (s) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for method in [m for m in METHODS if m in args.methods]:
        key_of = {run_key(method, args.fraction, s): s for s in args.seeds}
        done = [r for r in runs if r["key"] in key_of and "error" not in r]
        failed = [r for r in runs if r["key"] in key_of and "error" in r]
        sched = schedule(method, args.epochs, method_mask_epoch(method, args.mask_epoch))
        if method not in FIXED_METHODS:
            sched += f", {args.fraction:g} of {'rows' if method == 'sparta' else 'entries'}"
        if not done:
            why = f"failed: {failed[0]['error'][:80]}" if failed else "not run"
            lines.append(f"| {_label(method)} | {sched} | {why} | 0 | | | |")
            continue
        eps = max(_number(r["epsilon"]) for r in done)
        if method in NON_PRIVATE_METHODS or not math.isfinite(eps):
            dp_eps = max(_number(r["epsilon_dp_sgd"]) for r in done)
            eps_text = f"∞, **NON-PRIVATE** mask (DP-SGD steps alone: {dp_eps:.3f})"
        else:
            eps_text = f"{eps:.3f}"
        trainable = statistics.fmean(r["trainable_params"] for r in done)
        share = statistics.fmean(r["trainable_param_fraction"] for r in done)
        seeds = f"{len(done)}" + (f" ({len(failed)} failed)" if failed else "")
        lines.append(
            f"| {_label(method)} | {sched} | {_acc([r['test_acc'] for r in done])} | {seeds} | {eps_text} | "
            f"{trainable:,.0f} ({100 * share:.1f}%) | {statistics.fmean(r['wall_time_s'] for r in done):.0f} |"
        )
    return "\n".join(lines)


def profile_points(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, list[tuple]]:
    """Per sweep method: ``(fraction, mean acc, std acc, n, mean trainable share)`` sorted by fraction."""
    points: dict[str, list[tuple]] = {}
    fractions = sorted(set(args.fractions) | ({args.fraction} if args.methods else set()))
    for method in args.sweep_methods:
        for fraction in fractions:
            keys = {run_key(method, fraction, s) for s in args.seeds}
            done = [r for r in runs if r["key"] in keys and "error" not in r]
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


def plot_profile(
    points: dict[str, list[tuple]], runs: list[dict[str, Any]], args: argparse.Namespace, path: Path
) -> bool:
    """Test accuracy against the trainable fraction (log x, mean ± std), the paper's Figure 3; False if empty.

    The fixed sets of the method table (``all``, ``bitfit``, ``last``) are drawn as horizontal lines.
    """
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, rows in points.items():
        x = [r[0] for r in rows]
        y = [100 * r[1] for r in rows]
        err = [100 * r[2] if math.isfinite(r[2]) else 0.0 for r in rows]
        unit = "rows" if method == "sparta" else "entries"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=f"{_label(method)} (fraction of {unit})")
    styles = {"all": ":", "bitfit": "--", "last": "-."}
    for method, style in styles.items():
        done = [r for r in runs if r["key"] in {run_key(method, None, s) for s in args.seeds} and "error" not in r]
        if done:
            mean = 100 * statistics.fmean(r["test_acc"] for r in done)
            ax.axhline(mean, linestyle=style, color="gray", linewidth=1, label=f"{method} ({mean:.1f}%)")
    ax.set_xscale("log")
    ticks = sorted({r[0] for rows in points.values() for r in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("trainable fraction of every conv layer (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"Fashion-MNIST 5-9, ε = {args.epsilon:g}, δ = {args.delta:g}, n = {args.train_subset}, "
        f"T = {args.epochs}, {len(args.seeds)} seed(s)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def markdown_report(payload: dict[str, Any], args: argparse.Namespace, png: Path | None) -> str:
    """The Markdown report: command, machine, settings, the two tables and how to read them."""
    runs = payload["runs"]
    done = [r for r in runs if "error" not in r]
    first = done[0] if done else {}
    points = profile_points(runs, args)
    sigma = f"{first['noise_multiplier']:.3f}" if first.get("noise_multiplier") is not None else "?"
    steps = f"{first['steps']}" if first else "?"
    mode = " (--quick: a smoke test, not the benchmark's results)" if args.quick else ""
    lines = [
        f"# Accuracy at equal ε: SPARTA and the competing methods{mode}",
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
        f"- Task: the main job's. GroupNorm CNN pretrained without privacy on Fashion-MNIST classes 0-4 "
        f"({args.pretrain_epochs} epochs, seed {PRETRAIN_SEED}, one public model for every run); private "
        f"fine-tuning on classes 5-9 with a fresh head on {args.train_subset} training examples (a fixed "
        f"subset); test on the {first.get('test_size', '?')} test images of classes 5-9.",
        f"- Privacy: (ε, δ) = ({args.epsilon:g}, {args.delta:g}), C = {args.max_grad_norm:g}, PRV accountant; "
        f"q = {args.batch_size}/{args.train_subset}, {args.epochs} epochs = {steps} private steps (scoring "
        f"included), σ = {sigma} for every method.",
        f"- Optimisation: SGD, lr {args.lr:g}, momentum 0.9, one epoch of linear warm-up then cosine decay; "
        f"expected batch {args.batch_size} (Poisson), micro-batches of {args.physical_batch_size}.",
        f"- Seeds {', '.join(map(str, args.seeds))} (head initialisation, sampling, noise, random mask).",
        f"- Schedules: `sparta`, `dp_gradient`, `oracle` and `random` train DP-BitFit for T0 = {args.mask_epoch} "
        f"epoch(s), then their mask (the three data-driven ones after one private scoring epoch, whose steps "
        f"are accounted like DP-SGD steps; `random` has no scoring epoch, so one more sparse epoch). `all`, "
        f"`last`, `bitfit` and `magnitude` (MP, Algorithm 4) train their set from epoch 0 (`mask_epoch=0`).",
        "- `oracle` chooses its mask from true gradients: **NON-PRIVATE** (ε = ∞); it shows the best mask "
        "the formulation could give. Its training steps are DP-SGD with the same σ.",
        "",
        f"## Test accuracy per method (trainable fraction {args.fraction:g})",
        "",
        method_table(runs, args),
        "",
        "Accuracy: mean ± sample standard deviation over seeds. ε: reached by the run (PRV accountant at δ), "
        "the largest over seeds. Trainable params: after the mask (the sparse phase), biases, norms and head "
        "included. Wall time: the whole run (data, training, test), mean over seeds.",
        "",
    ]
    if points:
        lines += [
            "## Test accuracy against the trainable fraction (the paper's Figure 3)",
            "",
            profile_table(points),
            "",
        ]
        if png is not None:
            lines += [f"![accuracy vs trainable fraction]({png.name})", ""]
    failed = [r for r in runs if "error" in r]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['key']}`: {r['error']}" for r in failed] + [""]
    return "\n".join(lines)


def report(payload: dict[str, Any], args: argparse.Namespace, prefix: Path) -> str:
    """Write the PNG and the Markdown next to the JSON; return the Markdown."""
    png = prefix.with_name(prefix.name + "_vs_fraction.png")
    made = plot_profile(profile_points(payload["runs"], args), payload["runs"], args, png)
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
        ``{"command", "settings", "machine", "started", "updated", "runs", "elapsed_s"}`` as written to
        PREFIX.json (ε = inf stays a float here; the JSON has the string ``"inf"``).
    """
    args = parse_args(argv)
    if args.threads is not None:  # before Lightning's DDP launcher picks a thread count from the CPU count
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    with _quiet(not args.verbose):
        return _benchmark(args, sys.argv[1:] if argv is None else argv)


def _benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the planned runs (skipping those kept by ``--resume``), write the JSON, the Markdown and the plot."""
    prefix = Path(args.out_prefix)
    json_path = prefix.with_suffix(".json")
    settings = settings_of(args)
    try:
        old = load_previous(json_path, settings) if args.resume else {}
    except ValueError as err:
        build_parser().error(str(err))
    previous = {r["key"]: r for r in old.get("runs", []) if "error" not in r}  # failed runs are run again
    command = shlex.join(["python", "benchmarks/accuracy.py", *argv])
    payload: dict[str, Any] = {
        "command": old.get("command", command),
        "resumed_with": list(old.get("resumed_with", [])),  # the resumes that ran something
        "settings": settings,
        "non_private_methods": list(NON_PRIVATE_METHODS),
        "machine": machine_description(),
        "started": old.get("started") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "updated": None,
        "runs": [],
    }
    todo = plan(args)
    print(
        f"{len(todo)} runs ({len(previous)} reusable from {json_path}) at ε = {args.epsilon:g}, "
        f"n = {args.train_subset}, T = {args.epochs}, T0 = {args.mask_epoch}; {machine_line(payload['machine'])}",
        flush=True,
    )
    start = time.perf_counter()
    if any(r["key"] not in previous for r in todo):  # pretrain (or find) the public model once, outside the timings
        from lightning_sparta.demo import pretrain_public
        from lightning_sparta.demo.transfer import TRANSFER_MODEL

        weights = pretrain_public(
            TRANSFER_MODEL, data_dir=args.data_dir, epochs=args.pretrain_epochs, seed=PRETRAIN_SEED
        )
        print(f"Public pretrained model: {weights} ({time.perf_counter() - start:.0f} s)", flush=True)
    times: list[float] = []
    for i, run in enumerate(todo, 1):
        if run["key"] in previous:
            payload["runs"].append(previous[run["key"]])
            print(f"[{i}/{len(todo)}] {run['key']}: kept from {json_path.name}", flush=True)
            continue
        record = run_one(args, run)
        payload["runs"].append(record)
        payload["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(json_path, payload)
        times.append(record["wall_time_s"])
        left = sum(1 for r in todo[i:] if r["key"] not in previous)
        eta = f", about {left * statistics.fmean(times) / 60:.0f} min left" if left else ""
        if "error" in record:
            outcome = f"FAILED {record['error']}"
        else:
            eps = record["epsilon"]
            eps_text = f"ε={eps:.3f}" if math.isfinite(eps) else "ε=inf NON-PRIVATE"
            outcome = (
                f"test_acc={record['test_acc']:.4f} {eps_text} trainable={record['trainable_params']:,} "
                f"({record['trainable_param_fraction']:.1%})"
            )
        print(f"[{i}/{len(todo)}] {run['key']:22s} {outcome}  ({record['wall_time_s']:.0f} s{eta})", flush=True)
    planned = {r["key"] for r in todo}
    payload["runs"] += [r for key, r in previous.items() if key not in planned]  # other runs are kept, unused
    if times or not old:
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
