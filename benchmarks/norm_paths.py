"""CPU time of the two per-sample norm paths of the clipping engine, layer by layer.

``DPStrategy(clipping="auto")`` takes, per layer, either the ghost norm ``⟨a aᵀ, b bᵀ⟩`` or a
materialised per-sample gradient ``bᵀ a`` (then its norm). It chooses by comparing multiply-adds
with a factor :data:`lightning_sparta.privacy.clipping.GHOST_ADVANTAGE`; this script measures both
paths on the layer shapes of the benchmark models (DeiT-tiny at 32 px with patch 4, ResNet-18 at
32 px, and the row-sparse forms of DeiT's layers at 20% of the rows) and says which one the rule
picks, so the factor can be checked on another machine. The materialised path is the engine's own: a
convolution with at least ``GROUPED_CONV_MIN_T`` output positions is materialised as one grouped
convolution over the samples, anything else as a product of unfolded patches and output gradients,
in cache-sized chunks of samples (``CACHE_ELEMENTS``). A last column times SPARTA's scoring sum of the
same layer, ``Σ_i c_i |g_i|`` (materialised in the same chunks, or one product when T = 1).

Run ``python benchmarks/norm_paths.py [--threads 1] [--batch-size 64]``; the table goes to stdout and
to ``benchmarks/results/norm_paths_cpu.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lightning_sparta.privacy import clipping

RESULTS = Path(__file__).resolve().parent / "results" / "norm_paths_cpu.md"

# (label, kind, shape): Linear (tokens T, d_in, d_out) or Conv2d (C_in, H, C_out, kernel, stride, padding[, groups])
LAYERS: list[tuple[str, str, tuple[int, ...]]] = [
    ("DeiT qkv", "linear", (65, 192, 576)),
    ("DeiT fc1", "linear", (65, 192, 768)),
    ("DeiT fc2", "linear", (65, 768, 192)),
    ("DeiT proj, 20% rows", "linear", (65, 192, 38)),
    ("DeiT qkv, 20% rows", "linear", (65, 192, 115)),
    ("DeiT fc1, 20% rows", "linear", (65, 192, 154)),
    ("DeiT fc2, 20% rows", "linear", (65, 768, 38)),
    ("head", "linear", (1, 512, 10)),
    ("ResNet stem 7x7/2", "conv", (3, 32, 64, 7, 2, 3)),
    ("ResNet layer1 3x3", "conv", (64, 8, 64, 3, 1, 1)),
    ("ResNet layer2 3x3/2", "conv", (64, 8, 128, 3, 2, 1)),
    ("ResNet layer2 3x3", "conv", (128, 4, 128, 3, 1, 1)),
    ("ResNet layer3 3x3", "conv", (256, 2, 256, 3, 1, 1)),
    ("conv 3x3 at 16x16, 64 ch", "conv", (64, 16, 64, 3, 1, 1)),
    ("conv 3x3 at 16x16, 32 ch", "conv", (32, 16, 32, 3, 1, 1)),
    ("EfficientNet depthwise 3x3 at 16x16", "conv", (32, 16, 32, 3, 1, 1, 32)),
    ("EfficientNet depthwise 5x5 at 4x4", "conv", (144, 4, 144, 5, 1, 2, 144)),
    ("EfficientNet pointwise 1x1 at 16x16", "conv", (16, 16, 96, 1, 1, 0)),
]


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    """Mean CPU milliseconds of ``fn`` over ``repeats`` calls, after one untimed call."""
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1000


def terms_of(kind: str, shape: tuple[int, ...], batch: int) -> list[clipping.GemmTerm]:
    """The clipping engine's weight term of one forward call with random inputs and output gradients."""
    if kind == "linear":
        t, d_in, d_out = shape
        layer: nn.Module = nn.Linear(d_in, d_out, bias=False)
        x, g = torch.randn(batch, t, d_in), torch.randn(batch, t, d_out)
        return clipping.linear_ghost_form(layer, [x], g)  # type: ignore[return-value]
    c_in, size, c_out, kernel, stride, padding, *groups = shape
    layer = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups[0] if groups else 1, bias=False)
    x = torch.randn(batch, c_in, size, size)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    return clipping.conv2d_ghost_form(layer, [x], g)  # type: ignore[return-value,arg-type]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        f"Per-sample squared norms of one layer's weight, batch {args.batch_size}, {args.threads} thread(s), "
        f"CPU ms per call (mean of {args.repeats}); torch {torch.__version__}, {platform.machine()}.",
        "",
        f'Rule of `clipping="auto"`: ghost when T²(d_in+d_out) ≤ {clipping.GHOST_ADVANTAGE:g} · T·d_in·d_out.',
        "",
        "| layer | T | d_in | d_out | ghost/materialised multiply-adds | ghost ms | materialised ms | faster "
        "| rule picks | scoring Σ c·abs(g) ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    agree = 0
    for label, kind, shape in LAYERS:
        terms = terms_of(kind, shape, args.batch_size)
        _, groups, t, d_in, d_out = terms[0].shape
        ghost_ms = cpu_ms(lambda terms=terms: clipping._gemm_squared_norms(terms, True), args.repeats)
        mat_ms = cpu_ms(lambda terms=terms: clipping._gemm_squared_norms(terms, False), args.repeats)
        factors = torch.rand(args.batch_size)
        score_ms = cpu_ms(
            lambda terms=terms, factors=factors: clipping._absolute_sum(terms, terms[0].param, factors),
            args.repeats,
        )
        faster = "ghost" if ghost_ms <= mat_ms else "materialised"
        picked = "ghost" if clipping._gemm_prefers_ghost(terms) else "materialised"
        agree += faster == picked
        ratio = t * (d_in + d_out) / (d_in * d_out)
        grouped = f" (×{groups} groups)" if groups > 1 else ""
        lines.append(
            f"| {label} | {t} | {d_in} | {d_out}{grouped} | {ratio:.2f} | {ghost_ms:.1f} | {mat_ms:.1f} "
            f"| {faster} | {picked} | {score_ms:.1f} |"
        )
    lines += ["", f"The rule picks the faster path for {agree} of {len(LAYERS)} layers."]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
