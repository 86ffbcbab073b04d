"""Gaussian noise for DP-SGD: a reproducible stream keyed by the step, or OS entropy.

Two sources, chosen by ``DPStrategy(secure_mode=...)``:

* :func:`step_noise` (reproducible mode): the noise of accounted step ``t`` is drawn from a generator
  seeded with a hash of ``(seed, t)``. Because ``t`` counts every step of one strategy's accounted
  history, a second ``fit`` or a resumed run continues the stream and never replays a vector the
  accountant has already composed; a run resumed from a checkpoint draws exactly the noise the
  uninterrupted run drew. A strategy sent back to an earlier checkpoint of its own run continues on a
  new stream (:func:`rewound_seed`). Whoever knows the seed can recompute every vector.
* :func:`secure_normal` (secure mode): standard normal draws built from ``os.urandom`` (the kernel's
  cryptographically secure generator) by the Box-Muller transform in float64. Nothing is kept from
  which the noise could be recomputed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

_MANTISSA = 53  # bits of a float64 uniform


def _stream_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of the stream ``seed`` (SeedSequence mixing, no overlap of streams)."""
    state = np.random.SeedSequence([int(seed), 0x6E6F6973, int(step)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def rewound_seed(seed: int, steps: int) -> int:
    """A new stream for a run rewound to an earlier checkpoint after ``steps`` accounted steps.

    Its noise and batches share nothing with the stream ``seed`` (whose later steps were released
    already), and the same script rewound at the same point draws the same new stream.
    """
    state = np.random.SeedSequence([int(seed), 0x72657769, int(steps)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 2


def step_noise(
    numel: int, seed: int, step: int, device: torch.device | str = "cpu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """``numel`` standard normal draws for accounted step ``step`` of the stream ``seed`` (float32).

    ``out``, a float32 tensor of ``numel`` elements on ``device``, receives the draws (the same values):
    a buffer kept across steps saves faulting in a fresh model-sized tensor every step on CPU.

    Example:
        >>> a, b = step_noise(4, seed=1, step=0), step_noise(4, seed=1, step=1)
        >>> torch.equal(a, step_noise(4, seed=1, step=0)), torch.equal(a, b)
        (True, False)
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(_stream_seed(seed, step))
    if out is None:
        return torch.randn(numel, generator=generator, device=device)
    return torch.randn(numel, generator=generator, device=device, out=out)


_SECURE_CHUNK = 1 << 18  # pairs of draws per chunk: the float64 work stays in cache (2 MiB per buffer)


def _secure_uniform(numel: int) -> torch.Tensor:
    """``numel`` uniforms in (0, 1] with 53 random bits each, from the OS CSPRNG (float64, CPU)."""
    raw = np.frombuffer(os.urandom(8 * numel), dtype=np.uint64)  # read-only, no copy
    return (torch.from_numpy((raw >> np.uint64(64 - _MANTISSA)).astype(np.float64)) + 1.0) * 2.0**-_MANTISSA


def secure_normal(
    numel: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``numel`` standard normal draws from the operating system's cryptographically secure generator.

    Box-Muller on pairs of 53-bit uniforms, computed in float64 and then cast to ``dtype``. The work
    runs in chunks of :data:`_SECURE_CHUNK` pairs, so no model-sized float64 tensor is formed; ``out``
    (``numel`` elements of ``dtype`` on ``device``), if given, receives the draws.

    Example:
        >>> secure_normal(5).shape
        torch.Size([5])
    """
    if out is None:
        out = torch.empty(numel, device=device, dtype=dtype)
    for lo in range(0, numel, 2 * _SECURE_CHUNK):
        hi = min(numel, lo + 2 * _SECURE_CHUNK)
        pairs = (hi - lo + 1) // 2
        radius = _secure_uniform(pairs).log_().mul_(-2.0).sqrt_()
        angle = _secure_uniform(pairs).mul_(2.0 * math.pi)
        z = torch.cat([torch.cos(angle).mul_(radius), torch.sin(angle).mul_(radius)])[: hi - lo]
        out[lo:hi].copy_(z)
    return out


__all__ = ["secure_normal", "step_noise"]
