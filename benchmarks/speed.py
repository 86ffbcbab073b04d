"""Throughput and peak memory of DP training steps: non-private, Opacus, DPStrategy, SPARTA's phases.

Every row runs in a fresh subprocess of this script (``--row NAME --model NAME``) so that its peak
memory is its own, and every row is timed by the same harness: a Lightning ``Trainer`` with a
timing callback (``on_train_batch_start`` → ``on_train_batch_end``, ``time.perf_counter``, CUDA
synchronised), warm-up steps excluded. Opacus has no Lightning integration, but its
``GradSampleModule`` and ``DPOptimizer`` drop into an automatic-optimization ``LightningModule``
unchanged (``DPOptimizer.step(closure)`` runs the closure, clips, noises and steps), so it goes
through the same loop as the others.

Run ``python benchmarks/speed.py --help``; see ``benchmarks/README.md`` for the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROWS = (
    "non-private",
    "opacus",
    "dpstrategy",
    "dpstrategy-bk",
    "dpstrategy-ghost",
    "sparta-sparse-20%",
    "sparta-sparse-20%-bk",
    "sparta-sparse-1%",
    "sparta-sparse-1%-bk",
    "scoring-epoch",
    "scoring-epoch-bk",
)
# DPStrategy(clipping=...) of a row, from its suffix: per-sample gradients (no suffix), mixed ghost
# norms + book-keeping ("-bk", clipping="auto"), ghost norms everywhere ("-ghost", clipping="ghost")
CLIPPING_SUFFIXES = {"-bk": "auto", "-ghost": "ghost"}
MODELS = ("deit", "resnet", "effnet", "nfnet", "vit_tv")
DEFAULT_MODELS = ("deit", "resnet", "effnet", "nfnet")
# torchvision's ViT (DeiT-tiny's geometry, nn.MultiheadAttention): only the rows that time its ghost form. SPARTA
# leaves its attention projections dense (the attention reads their weights as arguments), clipping="per_sample"
# replays the attention, and Opacus would need its own DPMultiheadAttention.
MODEL_ROWS = {"vit_tv": ("non-private", "dpstrategy-bk", "dpstrategy-ghost")}
SPARSE_FRACTIONS = {"sparta-sparse-20%": 0.2, "sparta-sparse-1%": 0.01}
SWEEP_BATCHES = (16, 32, 64, 128, 256)
SWEEP_ROWS = ("non-private", "dpstrategy", "dpstrategy-bk")
# per-sample gradients at batch 256 need ~13 GB for ResNet-18 (11.7M parameters) and ~15 GB for NF-ResNet-26
# (14.0M; 6.2 GB peak at batch 64 and 64 px): more than a shared 24 GB machine should give
SWEEP_SKIP = {
    ("resnet", "dpstrategy", 256): "skipped: ~13 GB of per-sample gradients",
    ("nfnet", "dpstrategy", 256): "skipped: ~15 GB of per-sample gradients",
}
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
NUM_CLASSES = 10
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --allocator: the malloc every row's process runs with (LD_PRELOAD), and the Debian package that has it.
# PyTorch's CPU allocator calls malloc; glibc's gives large blocks back to the system and faults them in
# again, which costs a DP step (that holds activations and output gradients until the clip factors are
# known) more than a non-private one. PyTorch's performance tuning guide recommends tcmalloc or jemalloc.
ALLOCATORS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
}
# glibc-tuned: glibc's own malloc, told through its documented environment variables to serve blocks up to
# 32 MB from the heap (no mmap) and to keep up to 1 GB of freed memory instead of trimming it: freed
# activations are then reused without page faults. Nothing to install; set them for your own runs too.
GLIBC_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


# ---------------------------------------------------------------------------------------- arguments
def _help_text(names: tuple[str, ...]) -> str:
    """Row names in an argparse help string, which argparse formats with %: "20%" must be escaped."""
    return str(names).replace("%", "%%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated subset of {MODELS} (default {DEFAULT_MODELS})",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {_help_text(ROWS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 6, 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64, help="(expected) batch size B")
    parser.add_argument("--dataset-size", type=int, default=1024, help="N: DPStrategy samples with q = B/N")
    parser.add_argument("--image-size", type=int, default=32, help="side of the random input images (default 32)")
    parser.add_argument("--depth", type=int, default=None, help="DeiT depth (default 12, 2 with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda if available")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every row")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/speed_<device>.json)")
    parser.add_argument("--quick", action="store_true", help="few steps and a shallow DeiT, for smoke tests")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of each row's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocator",
        choices=("glibc", "glibc-tuned", *ALLOCATORS),
        default="glibc",
        help="the malloc of every row's process, preloaded (default glibc, the system's): PyTorch's CPU tuning "
        "guide recommends tcmalloc or jemalloc (Debian: apt install libtcmalloc-minimal4 / libjemalloc2); "
        f"glibc-tuned is glibc with {' '.join(f'{k}={v}' for k, v in GLIBC_TUNED_ENV.items())}",
    )
    parser.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="DPStrategy(tune_malloc=False): the DP rows leave glibc's malloc as it is (by default the strategy "
        "sets the same two thresholds as glibc-tuned in its own process when training on CPU)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every row this many times, interleaved (all rows of a model, then again), and report the run "
        "with the median CPU-time throughput: ratios then resist the machine's drift between rows",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"also time {_help_text(SWEEP_ROWS)} at batch sizes {SWEEP_BATCHES} (table and plot of cost versus "
        "batch size)",
    )
    parser.add_argument("--sweep-steps", type=int, default=2, help="timed steps per sweep point (after 1 warm-up)")
    parser.add_argument(
        "--sweep-batches", default=",".join(map(str, SWEEP_BATCHES)), help="comma-separated batch sizes of the sweep"
    )
    # Internal: run one row in this process and write its result as JSON.
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sweep_batches = [int(b) for b in args.sweep_batches.split(",")]
    if args.steps is None:
        args.steps = 2 if args.quick else 6
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.depth is None:
        args.depth = 2 if args.quick else 12
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, value, allowed in (("models", args.models, MODELS), ("rows", args.rows, ROWS)):
        unknown = set(value.split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}, choose from {allowed}")
    if args.allocator in ALLOCATORS and args.row is None:
        library, package = ALLOCATORS[args.allocator]
        if not _loadable(library):
            parser.error(f"--allocator {args.allocator}: {library} not found (Debian: apt install {package})")
    if args.image_size < 16 or args.image_size % 4:
        parser.error(f"--image-size must be a multiple of 4 (DeiT's patch size) and at least 16, got {args.image_size}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1 or args.dataset_size < args.batch_size:
        parser.error("need --steps >= 1, --warmup >= 1 and --batch-size <= --dataset-size")
    return args


# ---------------------------------------------------------------------------------------- memory
def _current_rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


# ---------------------------------------------------------------------------------------- one row
def row_kind(row: str) -> tuple[str, str]:
    """``(base row, clipping mode)``: ``"sparta-sparse-20%-bk"`` is ``("sparta-sparse-20%", "auto")``."""
    for suffix, mode in CLIPPING_SUFFIXES.items():
        if row.endswith(suffix):
            return row.removesuffix(suffix), mode
    return row, "per_sample"


def build_model(name: str, depth: int, image_size: int = 32):
    import timm
    from torch import nn

    if name == "deit":
        # inplace=False everywhere by default in timm's ViT; cls_token/pos_embed live on the root.
        return timm.create_model(
            "deit_tiny_patch16_224",
            pretrained=False,
            img_size=image_size,
            patch_size=4,
            num_classes=NUM_CLASSES,
            depth=depth,
        )
    if name == "vit_tv":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            image_size=image_size,
            patch_size=4,
            num_layers=depth,
            num_heads=3,
            hidden_dim=192,
            mlp_dim=768,
            num_classes=NUM_CLASSES,
        )
    if name == "nfnet":
        # NF-ResNet-26 (random init): timm's ScaledStdConv2d everywhere, no normalisation layers, the
        # weight-standardised convs DP-SGD work favours (De et al., 2022, used NF-Nets)
        return timm.create_model("nf_resnet26", pretrained=False, num_classes=NUM_CLASSES)
    if name == "effnet":
        # EfficientNet-Lite0 (random init; the main job's ImageNet weights do not change the cost): BatchNorm
        # with frozen statistics under DPStrategy, depthwise convs, timm's Conv2dSame, in-place ReLU6.
        return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=NUM_CLASSES)
    # ResNet-18 from timm's ResNet class: GroupNorm(8, c) for every norm and out-of-place ReLUs and
    # residual adds. The full backward hooks of both Opacus and DPStrategy refuse an in-place change of a
    # hooked module's output, and timm's BasicBlock adds the shortcut in place to bn2's output.
    from timm.models.resnet import BasicBlock, ResNet

    class OutOfPlaceBasicBlock(BasicBlock):
        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            x = self.act1(self.bn1(self.conv1(x)))
            return self.act2(self.bn2(self.conv2(x)) + shortcut)

    return ResNet(
        block=OutOfPlaceBasicBlock,
        layers=(2, 2, 2, 2),
        num_classes=NUM_CLASSES,
        norm_layer=lambda channels, **_: nn.GroupNorm(8, channels),
        act_layer=lambda inplace=False, **_: nn.ReLU(inplace=False),
    )


def head_name(model) -> str:
    head = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is head)


def scored_layers(model) -> dict[str, Any]:
    """The Linear/Conv2d layers outside the classifier head: SPARTA scores and sparsifies these."""
    from torch import nn

    head = head_name(model)
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not (n == head or n.startswith(head + "."))
    }


def sparsify_randomly(model, fraction: float, seed: int) -> int:
    """SPARTA's sparse phase with random rows: returns the number of trainable parameters.

    Trainable afterwards, as in ``SpartaMaskCallback``'s sparse phase: the selected rows
    (``weight_rows``), the biases of the sparsified layers, every normalisation parameter and the head.
    """
    import torch
    from torch import nn

    from lightning_sparta.sparse import sparsify_

    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, layer in scored_layers(model).items():
        out = layer.weight.shape[0]
        k = max(1, round(fraction * out))
        masks[name] = torch.randperm(out, generator=generator)[:k]
    new = sparsify_(model, masks)
    keep = set()
    for layer in new.values():
        keep.add(id(layer.weight_rows))
        if layer.bias is not None:
            keep.add(id(layer.bias))
    head = model.get_classifier()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or module is head:
            keep.update(id(p) for p in module.parameters(recurse=False))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    """Time one (model, row) in this process; every row goes through the same Lightning loop."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    base_row, clipping = row_kind(args.row)
    dp_row = base_row not in ("non-private", "opacus")
    if dp_row:  # only DPStrategy rows import the package (it registers grad samplers with Opacus)
        from lightning_sparta.strategy import DPStrategy
    if args.row == "opacus":
        from opacus import PrivacyEngine

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cuda = args.device == "cuda"
    baseline_mb = _current_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    model = build_model(args.model, args.depth, args.image_size)
    if base_row in SPARSE_FRACTIONS:
        sparsify_randomly(model, SPARSE_FRACTIONS[base_row], args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    images = torch.randn(args.dataset_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, NUM_CLASSES, (args.dataset_size,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True)

    def sgd(module):
        return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    optimizer = None
    if args.row == "opacus":  # Opacus' default behaviour, fixed-size batches
        engine = PrivacyEngine(accountant="prv")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=sgd(model),
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,
        )

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return optimizer if optimizer is not None else sgd(self)

        def train_dataloader(self):
            return loader

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.step = 0
            self.samples = 0
            self.seconds = 0.0
            self.cpu_seconds = 0.0
            self.step_times: list[tuple[int, float, float]] = []  # (samples, wall s, CPU s) per timed step
            self.paths: list[tuple[str, str, str]] | None = None
            self.profiler = None

        def on_train_start(self, trainer, pl_module):
            if base_row == "scoring-epoch":  # every step from now on is a private scoring step
                trainer.strategy.begin_scoring({f"{n}.weight": m.weight for n, m in scored_layers(model).items()})

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.step == args.warmup and args.profile:
                self.profiler = torch.profiler.profile(record_shapes=False)
                self.profiler.__enter__()
            if cuda:
                torch.cuda.synchronize()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - self._start, time.process_time() - self._cpu_start
            if self.paths is None and dp_row:  # hooks are attached now (the strategy detaches them at teardown)
                self.paths = [(p.module or "<root>", p.type, p.path) for p in trainer.strategy.engine.paths()]
                self.clipping_table = trainer.strategy.engine.summary()
            if self.paths is None and args.row == "opacus":  # Opacus prepares functorch lazily, on first use
                self.paths = [
                    (n.removeprefix("_module").lstrip(".") or "<root>", type(m).__name__, "functorch")
                    for n, m in model.named_modules()
                    if hasattr(m, "ft_compute_sample_grad")
                ]
            self.threads = torch.get_num_threads()
            if self.step >= args.warmup:
                self.seconds += elapsed
                self.cpu_seconds += cpu
                self.samples += int(batch[0].shape[0])
                self.step_times.append((int(batch[0].shape[0]), elapsed, cpu))
            self.step += 1

        def on_train_end(self, trainer, pl_module):
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
                print(f"--- profile {args.model} / {args.row} ---\n{table}", file=sys.stderr)

    timer = Timer()
    strategy: Any = "auto"
    if dp_row:
        strategy = DPStrategy(
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            seed=args.seed,
            clipping=clipping,
            tune_malloc=not args.no_tune_malloc,
        )
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        strategy=strategy,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    trainer.fit(Classifier())
    assert timer.threads == args.threads, f"trained with {timer.threads} threads, not --threads={args.threads}"
    allocator = _mapped_allocator()
    assert allocator == args.allocator, f"ran with malloc={allocator}, not --allocator={args.allocator}"

    if dp_row:
        functorch = [m for m, _, path in timer.paths or [] if path == "functorch"]
        assert not functorch, f"{args.model}/{args.row}: DPStrategy used the functorch fallback for {functorch}"
    memory_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb() - baseline_mb
    return {
        "model": args.model,
        "row": args.row,
        "samples": timer.samples,
        "seconds": timer.seconds,
        "samples_per_s": timer.samples / timer.seconds if timer.seconds else 0.0,
        "cpu_seconds": timer.cpu_seconds,
        "samples_per_cpu_s": timer.samples / timer.cpu_seconds if timer.cpu_seconds else 0.0,
        "steps": timer.step_times,
        "peak_memory_mb": memory_mb,
        "trainable_parameters": trainable,
        "paths": timer.paths,
        "clipping": clipping if dp_row else None,
        "clipping_table": getattr(timer, "clipping_table", None),
        "batch_size": args.batch_size,
        "allocator": allocator,
        "malloc_tuned_by_strategy": dp_row and sys.modules["lightning_sparta._malloc"]._tuned,
    }


# ---------------------------------------------------------------------------------------- driver
def _loadable(library: str) -> bool:
    """Whether the dynamic linker finds ``library`` (looked up, not loaded: jemalloc cannot be dlopen-ed late)."""
    from ctypes.util import find_library

    return find_library(library.split(".so")[0].removeprefix("lib")) == library


def _mapped_allocator() -> str:
    """The preloaded allocator this process runs with, from its memory map ("glibc" when none)."""
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.exists() else ""
    tuned = all(os.environ.get(k) == v for k, v in GLIBC_TUNED_ENV.items())
    default = "glibc-tuned" if tuned else "glibc"
    return next((name for name, (library, _) in ALLOCATORS.items() if library.split(".so")[0] in text), default)


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``): results move between machines of one name, e.g. with or
    without AVX-512, so the header says which one ran."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def _cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _child_env(args: argparse.Namespace) -> dict[str, str]:
    # Lightning's DDP launcher (DPStrategy derives from DDPStrategy) sets torch's thread count to
    # cpu_count/processes unless OMP_NUM_THREADS is set: pin it for every row alike.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for key in GLIBC_TUNED_ENV:
        env.pop(key, None)
    if args.allocator == "glibc-tuned":
        env.update(GLIBC_TUNED_ENV)
    elif args.allocator != "glibc":
        env["LD_PRELOAD"] = " ".join(filter(None, [ALLOCATORS[args.allocator][0], env.get("LD_PRELOAD", "")]))
    return env


def _child_command(args: argparse.Namespace, model: str, row: str, result_file: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve())]
    command += ["--model", model, "--row", row, "--result-file", result_file]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    command += ["--dataset-size", str(args.dataset_size), "--depth", str(args.depth), "--device", args.device]
    command += ["--threads", str(args.threads), "--seed", str(args.seed), "--image-size", str(args.image_size)]
    command += ["--allocator", args.allocator] + (["--no-tune-malloc"] if args.no_tune_malloc else [])
    return command + (["--profile"] if args.profile else [])


def _ratio(value: float, reference: dict[str, Any] | None, key: str) -> str:
    if reference is None or "error" in reference or not reference.get(key):
        return "–"
    return f"{value / reference[key]:.2f}×"


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU-time throughput (the lower middle one for an even count), with every
    run's throughput in ``repeat_samples_per_cpu_s``; the first failure if any run failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["samples_per_cpu_s"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "repeat_samples_per_cpu_s": [r["samples_per_cpu_s"] for r in runs],
        "repeat_steps": [r["steps"] for r in runs],
    }


def pooled_step_ms(result: dict[str, Any]) -> float | None:
    """Median CPU milliseconds per sample over the timed steps of all runs of a row, pooled.

    A second estimate beside the median run: a burst of the machine slows a few steps, and the median
    over every step of every run ignores it, where a run's mean includes it.
    """
    steps = [(n, cpu) for run in result.get("repeat_steps", [result.get("steps", [])]) for n, _, cpu in run if n]
    return statistics.median(1000 * cpu / n for n, cpu in steps) if steps else None


def spread_section(results: list[dict[str, Any]], repeats: int) -> str:
    """Per row, the range of CPU-time throughput over the interleaved runs and the pooled step median
    against non-private's (empty for single runs)."""
    plain = {r["model"]: pooled_step_ms(r) for r in results if r["row"] == "non-private" and "error" not in r}
    lines = []
    for r in results:
        if len(v := r.get("repeat_samples_per_cpu_s", [])) < 2:
            continue
        line = f"- {r['model']} / {r['row']}: {min(v):.1f}-{max(v):.1f} samples/CPU-s"
        line += f" (median {r['samples_per_cpu_s']:.1f})"
        ms, base = pooled_step_ms(r), plain.get(r["model"])
        if ms and base:
            line += f"; pooled step median {ms:.1f} CPU-ms per sample, {base / ms:.2f}× non-private"
        lines.append(line)
    if not lines:
        return ""
    heading = (
        f"\nSpread over the {repeats} interleaved runs of each row (the tables show the median run), and the "
        "median CPU time per sample over every timed step of every run (a second estimate that ignores bursts):\n\n"
    )
    return heading + "\n".join(lines)


def markdown_table(results: list[dict[str, Any]], speed_key: str = "samples_per_s") -> str:
    """The results table; ``speed_key`` picks wall-clock (default) or CPU-time throughput."""
    unit = "samples/s" if speed_key == "samples_per_s" else "samples/CPU-s"
    lines = [
        f"| model | method | {unit} | × non-private | × Opacus | peak memory (MB) | × non-private memory | CPU/wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for model in dict.fromkeys(r["model"] for r in results):
        by_row = {r["row"]: r for r in results if r["model"] == model}
        plain, opacus = by_row.get("non-private"), by_row.get("opacus")
        for row in ROWS:
            r = by_row.get(row)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {model} | {row} | failed: {r['error'][:80]} | | | | | |")
                continue
            speed, memory = r[speed_key], r["peak_memory_mb"]
            lines.append(
                f"| {model} | {row} | {speed:.1f} | {_ratio(speed, plain, speed_key)} | "
                f"{_ratio(speed, opacus, speed_key)} | {memory:.0f} | {_ratio(memory, plain, 'peak_memory_mb')} | "
                f"{r['cpu_seconds'] / r['seconds']:.2f} |"
            )
        for suffix in ("", "-bk"):
            score, dp = by_row.get(f"scoring-epoch{suffix}"), by_row.get(f"dpstrategy{suffix}")
            if score and dp and "error" not in score and "error" not in dp:
                notes.append(
                    f"{model}: scoring-epoch{suffix} vs dpstrategy{suffix} (one DP-SGD step): "
                    f"{_ratio(score[speed_key], dp, speed_key)} the throughput, "
                    f"{_ratio(score['peak_memory_mb'], dp, 'peak_memory_mb')} the peak memory."
                )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def paths_summary(paths: list[list[str]]) -> str:
    """``path:ModuleType ×count`` over the hooked modules of one DPStrategy row."""
    counts: dict[str, int] = {}
    for _, kind, path in paths:
        counts[f"{path}:{kind}"] = counts.get(f"{path}:{kind}", 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def _run_child(args: argparse.Namespace, model: str, row: str, tmp: str, label: str = "") -> dict[str, Any]:
    """Run one row in a fresh process and return its result (or ``{"error": ...}``)."""
    result_file = os.path.join(tmp, f"{model}_{row}_{args.batch_size}.json")
    t0 = time.perf_counter()
    proc = subprocess.run(
        _child_command(args, model, row, result_file),
        capture_output=True,
        text=True,
        check=False,
        env=_child_env(args),
    )
    if args.profile and "--- profile" in proc.stderr:
        print(proc.stderr[proc.stderr.index("--- profile") :], file=sys.stderr)
    name = f"{row} {label}".strip()
    if proc.returncode != 0 or not os.path.exists(result_file):
        message = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{model:6s} {name:24s} FAILED: {message}", flush=True)
        return {"model": model, "row": row, "error": message}
    result = json.loads(Path(result_file).read_text())
    print(
        f"{model:6s} {name:24s} {result['samples_per_s']:7.1f} samples/s "
        f"{result['samples_per_cpu_s']:7.1f} samples/CPU-s {result['peak_memory_mb']:6.0f} MB  "
        f"trainable={result['trainable_parameters']:>10,d}  ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return result


def norm_paths_summary(table: str) -> str:
    """How many weights took a ghost norm and how many a materialised one, from ``engine.summary()``."""
    ghost, materialised = table.count("ghost norm"), table.count("materialised norm")
    return f"{ghost} ghost, {materialised} materialised (the others per-sample)"


def norm_paths_section(results: list[dict[str, Any]]) -> str:
    lines = [
        f"- {r['model']} / {r['row']}: {norm_paths_summary(r['clipping_table'])}"
        for r in results
        if r.get("clipping_table") and r.get("clipping") not in (None, "per_sample")
    ]
    return "\nNorm paths of the weights (clipping engine):\n\n" + "\n".join(lines) + "\n" if lines else ""


def sweep_table(sweep: list[dict[str, Any]], batches: list[int]) -> str:
    lines = [
        "| model | batch | "
        + " | ".join(f"{r} ms/sample" for r in SWEEP_ROWS)
        + " | "
        + " | ".join(f"{r} MB" for r in SWEEP_ROWS)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(SWEEP_ROWS)),
    ]
    for model in dict.fromkeys(r["model"] for r in sweep):
        for batch in batches:
            by_row = {r["row"]: r for r in sweep if r["model"] == model and r["batch_size"] == batch}
            times, memory = [], []
            for row in SWEEP_ROWS:
                r = by_row.get(row)
                if r is None or "error" in r:
                    times.append("–" if r is None else f"({r['error'][:40]})")
                    memory.append("–")
                    continue
                times.append(f"{1000 / r['samples_per_cpu_s']:.1f}")
                memory.append(f"{r['peak_memory_mb']:.0f}")
            lines.append(f"| {model} | {batch} | " + " | ".join(times) + " | " + " | ".join(memory) + " |")
    return "\n".join(lines)


def sweep_plot(sweep: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in sweep))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        for row in SWEEP_ROWS:
            points = [r for r in sweep if r["model"] == model and r["row"] == row and "error" not in r]
            batches = [r["batch_size"] for r in points]
            axes[0][j].plot(batches, [1000 / r["samples_per_cpu_s"] for r in points], marker="o", label=row)
            axes[1][j].plot(batches, [r["peak_memory_mb"] for r in points], marker="o", label=row)
        axes[0][j].set_title(model)
        axes[0][j].set_ylabel("CPU ms per sample")
        axes[1][j].set_ylabel("peak memory (MB)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.row is not None:  # child: one row
        warnings.filterwarnings("ignore")
        result = run_row(args)
        Path(args.result_file).write_text(json.dumps(result))
        return

    import torch

    models, rows = args.models.split(","), [r for r in ROWS if r in args.rows.split(",")]
    machine = f"{_cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs, torch kernels {_cpu_capability()}"
    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    header = (
        f"device={args.device} ({machine}), torch {torch.__version__}, threads={args.threads}, "
        f"batch={args.batch_size}, N={args.dataset_size}, warmup={args.warmup}, steps={args.steps}, "
        f"DeiT depth={args.depth}, images {args.image_size}x{args.image_size}, malloc={args.allocator} "
        f"(DPStrategy rows: tune_malloc={not args.no_tune_malloc})"
        + (f", {args.repeats} interleaved runs per row (median shown)" if args.repeats > 1 else "")
    )
    print(header, flush=True)
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
            for repeat in range(args.repeats):
                for row in rows:
                    if row not in MODEL_ROWS.get(model, ROWS):
                        runs[row].append({"model": model, "row": row, "error": "skipped: not run for this model"})
                        continue
                    label = f"run {repeat + 1}/{args.repeats}" if args.repeats > 1 else ""
                    runs[row].append(_run_child(args, model, row, tmp, label=label))
            for row in rows:
                result = median_run(runs[row])
                results.append(result)
                if "error" in result:
                    continue
                if row == "opacus":
                    fallback = [f"{m} ({kind})" for m, kind, _ in result["paths"]] or "none"
                    print(f"    Opacus functorch fallback: {fallback}", flush=True)
                elif result["paths"]:
                    print(f"    per-sample paths: {paths_summary(result['paths'])}", flush=True)
                    if result.get("clipping_table") and result["clipping"] != "per_sample":
                        print(f"    norms: {norm_paths_summary(result['clipping_table'])}", flush=True)
        sweep = []
        if args.sweep:
            sweep_args = argparse.Namespace(**{**vars(args), "steps": args.sweep_steps, "warmup": 1})
            for model in models:
                for batch in args.sweep_batches:
                    for row in SWEEP_ROWS:
                        if row not in MODEL_ROWS.get(model, ROWS):  # vit_tv: no per-sample row (a replay)
                            continue
                        if (model, row, batch) in SWEEP_SKIP:
                            sweep.append(
                                {
                                    "model": model,
                                    "row": row,
                                    "batch_size": batch,
                                    "error": SWEEP_SKIP[(model, row, batch)],
                                }
                            )
                            continue
                        point = argparse.Namespace(
                            **{
                                **vars(sweep_args),
                                "batch_size": batch,
                                "dataset_size": max(args.dataset_size, 4 * batch),
                            }
                        )
                        sweep.append({**_run_child(point, model, row, tmp, label=f"B={batch}"), "batch_size": batch})
    wall = time.perf_counter() - start

    memory = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS minus the RSS after imports"
    text = (
        f"{header}\n\nPeak memory: {memory}. Wall time of the whole run: {wall:.0f}s.\n\n"
        f"Wall-clock throughput (time.perf_counter per step):\n\n{markdown_table(results)}\n\n"
        f"CPU-time throughput (time.process_time per step; less sensitive to other processes):\n\n"
        f"{markdown_table(results, 'samples_per_cpu_s')}\n"
        f"{norm_paths_section(results)}"
        f"{spread_section(results, args.repeats)}"
    )
    out = Path(args.out) if args.out else RESULTS_DIR / f"speed_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        plot = out.with_name(out.stem + "_vs_batch.png")
        text += (
            f"\nCost versus batch size ({args.sweep_steps} timed steps after 1 warm-up per point; time is CPU time, "
            f"memory as above; plot: {plot.name}):\n\n{sweep_table(sweep, args.sweep_batches)}\n"
        )
        sweep_plot(sweep, plot)
    print("\n" + text)
    out.with_suffix(".md").write_text(text)
    out.write_text(
        json.dumps(
            {"config": vars(args), "machine": machine, "wall_s": wall, "results": results, "sweep": sweep}, indent=1
        )
    )


if __name__ == "__main__":
    main()
