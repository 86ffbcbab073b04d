"""Clipping engines: per-sample norms and clipped sums, with or without per-sample gradient tensors.

A DP-SGD step needs two things from the hooked layers of a micro-batch: the norm ``‖g_i‖`` of every
sample's gradient over *all* trainable parameters, and the clipped sum ``Σ_i c_i g_i`` with
``c_i = min(1, C/‖g_i‖)``. :class:`ClippingEngine` is that interface; two implementations exist.

``"per_sample"`` (:class:`MaterialisingClipping`)
    every hooked parameter gets ``p.grad_sample`` of shape ``[B, *p.shape]`` from its grad sampler
    (:class:`~lightning_sparta.privacy.per_sample.PerSampleGradients`); norms and sums are taken from
    those tensors. Memory grows as ``B × (trainable parameters)``.

``"ghost"`` / ``"auto"`` (:class:`GhostClipping`, ghost norms + book-keeping)
    layers with a *ghost form* (Linear, Conv2d, timm's Conv2dSame, our row-sparse layers, Embedding,
    ``nn.MultiheadAttention`` as two Linear maps around its recomputed attention core)
    keep only their input ``a`` and output gradient ``b`` from the one backward pass. A layer that
    multiplies per-sample activations ``a_i`` (``[T, d_in]``; Conv2d: unfolded patches, ``T = H'·W'``)
    by its weight has the per-sample weight gradient ``g_i = b_iᵀ a_i``, whose squared norm is

    .. math:: \\|g_i\\|^2 = \\langle a_i a_i^\\top,\\ b_i b_i^\\top \\rangle \\qquad (T = 1:\\ \\|a_i\\|^2 \\|b_i\\|^2)

    at ``O(T²(d_in + d_out))`` instead of ``O(T·d_in·d_out)`` (Li et al. 2022, "ghost norm"). Once the
    clip factors are known from the total norms over all layers, the clipped sum is one weight-gradient
    product with per-sample scaled inputs, ``Σ_i c_i b_iᵀ a_i = bᵀ (c ⊙ a)`` (Bu et al. 2023,
    "book-keeping"): no second backward pass and no per-sample tensor. ``"auto"`` picks per layer the
    cheaper of the ghost norm and a materialised norm (Bu et al. 2022, "mixed ghost clipping"),
    comparing ``T²(d_in + d_out)`` with ``T·d_in·d_out`` per group (:data:`GHOST_ADVANTAGE`,
    measured by ``benchmarks/norm_paths.py``). A materialised norm is computed in cache-sized chunks of
    samples (:data:`CACHE_ELEMENTS`) and dropped, except that layers are kept whole, for the clipped
    sum too, while the kept per-sample gradients stay within :data:`KEEP_ELEMENTS` in all
    (:data:`KEEP_GROUPED_ELEMENTS` for grouped convs). A convolution with many output positions is
    materialised as one convolution with the samples as groups (:data:`GROUPED_CONV_MIN_T`), otherwise
    as the product of unfolded patches and output gradients. ``"ghost"`` takes the ghost norm wherever
    a ghost form exists. Biases (``Σ_t b_i``), normalisation layers, ViT's broadcast
    ``cls_token``/``pos_embed`` and every layer without a ghost form keep their (cheap) per-sample
    gradients.

The row-sparse layers' ghost forms restrict ``b`` to the k selected rows (a grouped conv's selected
filter reads its own group's channels only), so their cost falls with k like their grad samplers'.

SPARTA's scoring needs ``Σ_i c_i |g_i|``, which has no product form when a layer sees more than one
position: :meth:`ClippingEngine.accumulate` materialises the scored parameters' per-sample gradients
there, in cache-sized chunks of samples, with the clip factors from the ghost norms. With one position
(a Linear on ``[B, d]``, a conv with a 1×1 output) ``|b_iᵀ a_i| = |b_i|ᵀ |a_i|``, and the sum is one
product like the book-keeping one.

The hooks record each layer's output gradient as autograd computed it for the (mean-reduced) loss; the
loss scale that turns it into the per-sample gradient is applied to the norms and the clip factors.

Norms, clip factors and sums are computed in at least float32 whatever the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn

from lightning_sparta.privacy.per_sample import PerSampleGradients, has_grad_sample
from lightning_sparta.sparse.layers import select_channels

ClippingMode = Literal["auto", "per_sample", "ghost"]
CLIPPING_MODES: tuple[str, ...] = ("auto", "per_sample", "ghost")

# Elements of one temporary (unfolded patches, Gram matrices, per-sample gradients) before a
# computation is split into chunks of samples: 2**24 float32 values = 64 MiB.
CHUNK_ELEMENTS = 2**24

# Materialised per-sample gradients kept from the norm for the clipped sum, instead of a book-keeping
# product, while they hold at most these many elements in all. Grouped convs (depthwise filters) have a
# budget of their own: their book-keeping product, a grouped conv's weight gradient, is 2-4x slower than
# materialising them on CPU, so keeping EfficientNet-Lite0's (12M elements at 32 px) took its DP step from
# 0.64x to 0.83x of non-private. For the other layers keeping saves little time and costs memory:
# ResNet-18-GN's peak was 1.75x non-private keeping 10M elements, 1.41x keeping 2M (speed.py --repeats 3).
KEEP_ELEMENTS = 2**21
KEEP_GROUPED_ELEMENTS = 2**24

# Per-sample gradients that are only reduced (a norm not kept for the sum, SPARTA's Σ c_i |g_i|) are
# materialised in chunks of about 2 MiB, which stay in the CPU's cache between the product that writes
# them and the reduction that reads them: 2.3-3.8x faster than one chunk of the whole batch on ResNet's
# and DeiT's layer shapes (T = 4-65, batch 64, one thread).
CACHE_ELEMENTS = 2**19

# A convolution with at least this many output positions materialises its per-sample weight gradients
# as one convolution with the samples as groups, instead of unfolding the input into patches: faster
# on every measured layer with T >= 64 (1.6x for ResNet's 7x7 stem, 5-9x for depthwise convs) and
# slower with few positions (benchmarks/norm_paths.py).
GROUPED_CONV_MIN_T = 64

# Mixed ghost clipping compares multiply-adds: the ghost norm is taken while it needs at most
# GHOST_ADVANTAGE times the multiply-adds of a materialised norm. Measured by benchmarks/norm_paths.py
# on one CPU thread (batch 64, Linear and Conv2d layers of DeiT-tiny, ResNet-18, EfficientNet-Lite0 and
# row-sparse forms), with the materialised norm in cache-sized chunks and convs with many positions as
# grouped convolutions: the ghost norm was faster up to a ratio of about 0.9 and slower from about 1.1.
# (When the materialised norm was one whole-batch product, the crossover was at about 1.5-2.)
GHOST_ADVANTAGE = 1.0

GhostForm = Callable[[nn.Module, list, torch.Tensor], list["_Term"]]
_GHOST_FORMS: dict[type[nn.Module], tuple[GhostForm, Callable[[nn.Module], bool]]] = {}


def register_ghost_form(
    module_type: type[nn.Module], supports: Callable[[nn.Module], bool] | None = None
) -> Callable[[GhostForm], GhostForm]:
    """Register the ghost form of ``module_type`` (exact type, like Opacus' grad samplers).

    The decorated function ``form(module, inputs, grad_output)`` returns one term per trainable
    parameter of ``module`` for one forward call (see :class:`GemmTerm`, :class:`DenseTerm`).
    ``supports(module)`` may decline a particular instance (e.g. a conv with circular padding), which
    then keeps its materialised per-sample gradients.
    """

    def decorator(form: GhostForm) -> GhostForm:
        _GHOST_FORMS[module_type] = (form, supports or (lambda _module: True))
        return form

    return decorator


def has_ghost_form(module: nn.Module) -> bool:
    """Whether ``module`` (exact type) has a registered ghost form that supports it."""
    entry = _GHOST_FORMS.get(type(module))
    return entry is not None and entry[1](module)


# ------------------------------------------------------------------------------------------ terms
def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _chunks(batch: int, per_sample: int, limit: int | None = None) -> Iterable[tuple[int, int]]:
    """``(lo, hi)`` ranges of samples with at most ``limit`` (default :data:`CHUNK_ELEMENTS`) elements each."""
    size = max(1, (CHUNK_ELEMENTS if limit is None else limit) // max(1, per_sample))
    for lo in range(0, batch, size):
        yield lo, min(batch, lo + size)


class _Term:
    """The contribution of one forward call of a module to one trainable parameter's gradient."""

    param: nn.Parameter
    batch_size: int

    def materialise(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample gradients of samples ``lo:hi``, ``[hi - lo, *param.shape]``, float32 or wider.

        ``out``, if given, is a buffer of that shape and dtype the term may write the result into
        (and return); a term may also ignore it and return a fresh tensor or a view of its own storage.
        """
        raise NotImplementedError


class DenseTerm(_Term):
    """An explicit per-sample gradient ``[B, *param.shape]`` (biases, and anything cheap)."""

    def __init__(self, param: nn.Parameter, per_sample: torch.Tensor) -> None:
        self.param = param
        self.per_sample = per_sample
        self.batch_size = per_sample.shape[0]

    def materialise(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return _wide(self.per_sample[lo:hi])

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        per_sample = _wide(self.per_sample)
        return torch.einsum("i,i...->...", factors.to(per_sample.dtype), per_sample)


class GemmTerm(_Term):
    """A weight whose per-sample gradient is ``g_i = Σ_g b_{i,g}ᵀ a_{i,g}`` over ``G`` groups.

    Args:
        param: the weight.
        patches: ``patches(lo, hi)`` gives ``a`` for samples ``lo:hi`` as ``[b, G, T, P]``.
        grads: ``grads(lo, hi)`` gives ``b`` for samples ``lo:hi`` as ``[b, G, T, O]``.
        shape: ``(B, G, T, P, O)``.
        clipped_sum: ``clipped_sum(c)`` gives ``Σ_i c_i g_i`` in the weight's shape (book-keeping).
        materialise: optionally, a faster ``materialise(lo, hi)`` than the product of patches and
            gradients (a convolution with the samples as groups).
    """

    def __init__(
        self,
        param: nn.Parameter,
        patches: Callable[[int, int], torch.Tensor],
        grads: Callable[[int, int], torch.Tensor],
        shape: tuple[int, int, int, int, int],
        clipped_sum: Callable[[torch.Tensor], torch.Tensor],
        materialise: Callable[[int, int], torch.Tensor] | None = None,
    ) -> None:
        self.param = param
        self.patches, self.grads, self.shape = patches, grads, shape
        self.batch_size = shape[0]
        self._clipped_sum = clipped_sum
        self._materialise = materialise

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return self._clipped_sum(factors)

    def materialise(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._materialise is not None:
            return self._materialise(lo, hi)
        grads, patches = _wide(self.grads(lo, hi)), _wide(self.patches(lo, hi))  # [b, G, T, O], [b, G, T, P]
        _, groups, _, _, o = self.shape
        if out is None:  # [b, G, O, P]: the weight's own layout
            return torch.matmul(grads.transpose(-1, -2), patches).reshape(hi - lo, *self.param.shape)
        torch.matmul(grads.transpose(-1, -2), patches, out=out.view(hi - lo, groups, o, -1))
        return out

    def norm_correction(self, terms: list[GemmTerm], lo: int, hi: int) -> torch.Tensor | None:
        """What the ghost norm of ``terms`` (this one first) leaves out of ``‖g_i‖²`` for samples ``lo:hi``.

        ``None``: nothing, the per-sample gradient is the product of patches and gradients alone.
        """
        return None

    def absolute_sum(self, factors: torch.Tensor) -> torch.Tensor | None:
        """``Σ_i c_i |g_i|`` without per-sample tensors when ``T = 1``, else ``None``.

        With one position the per-sample gradient is an outer product, ``g_i = b_iᵀ a_i``, so
        ``|g_i| = |b_i|ᵀ |a_i|`` elementwise and ``Σ_i c_i |g_i| = (c ⊙ |b|)ᵀ |a|``: one product, like
        the book-keeping sum (a Linear on ``[B, d]``, a conv whose output is 1×1).
        """
        if self.shape[2] != 1:
            return None
        a = _wide(self.patches(0, self.batch_size)).abs()  # [B, G, 1, P]
        b = _wide(self.grads(0, self.batch_size)).abs()  # [B, G, 1, O]
        b = b * factors.to(b.dtype)[:, None, None, None]
        return torch.matmul(b[:, :, 0].permute(1, 2, 0), a[:, :, 0].transpose(0, 1)).reshape(self.param.shape)


class StandardisedTerm(GemmTerm):
    """A weight-standardised conv's raw weight (timm's ``StdConv2d``/``ScaledStdConv2d``).

    The conv runs with ``Ŵ_o = w_o s_o x̂_o`` for each filter ``o`` (``x̂_o`` the filter standardised over
    its ``n`` fan-in entries, ``s_o`` its standard deviation with ``eps``, ``w_o = a_o / s_o`` with ``a_o``
    the gain times the scale, or 1). The gradient of the raw filter is the normalisation's backward of
    the standardised one's, ``∂W_{i,o} = w_o (G_{i,o} - μ_{i,o} 1 - c_{i,o} x̂_o)`` with ``G_i`` the plain
    conv gradient, ``μ_{i,o}`` its mean and ``c_{i,o} = mean(G_{i,o} ⊙ x̂_o)``. The parent's patches and
    gradients are those of ``diag(w) G_i`` (the output gradient scaled per filter), so its ghost norm,
    book-keeping product and materialisation give that part; this class adds the rank-two correction
    ``R_i``: to the norm ``Σ_o w_o² (-n μ_{i,o}² - c_{i,o}² (2n - ‖x̂_o‖²))``, and to the sums and the
    materialised gradients ``R_i`` itself.
    """

    def __init__(self, base: GemmTerm, x_hat: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, c: torch.Tensor):
        super().__init__(base.param, base.patches, base.grads, base.shape, base._clipped_sum, base._materialise)
        self.x_hat, self.w = x_hat, w  # [out, n], [out]
        self.mean, self.c = mean, c  # [B, out] each

    def correction(self, lo: int, hi: int) -> torch.Tensor:
        """``R_i`` of samples ``lo:hi``, ``[hi - lo, out, n]``."""
        return -self.w[:, None] * (self.mean[lo:hi, :, None] + self.c[lo:hi, :, None] * self.x_hat)

    def materialise(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        g = super().materialise(lo, hi, out)
        g.view(hi - lo, *self.x_hat.shape).add_(self.correction(lo, hi))
        return g

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        f = factors.to(self.c.dtype)
        r = -self.w[:, None] * ((f @ self.mean)[:, None] + (f @ self.c)[:, None] * self.x_hat)
        return super().clipped_sum(factors) + r.view(self.param.shape)

    def absolute_sum(self, factors: torch.Tensor) -> torch.Tensor | None:
        return None  # |∂W_i| has no product form: materialised

    def norm_correction(self, terms: list[GemmTerm], lo: int, hi: int) -> torch.Tensor | None:
        """The rank-two part of ``‖∂W_i‖²`` over all the conv's calls (the means and ``c`` add up over calls)."""
        mean = sum(t.mean[lo:hi] for t in terms)  # type: ignore[attr-defined]
        c = sum(t.c[lo:hi] for t in terms)  # type: ignore[attr-defined]
        n = self.x_hat.shape[1]
        spread = 2 * n - self.x_hat.square().sum(1)  # [out]
        return -(self.w.square() * (n * mean.square() + c.square() * spread)).sum(1)


class EmbeddingTerm(_Term):
    """``nn.Embedding``: ``g_i = Σ_t e_{idx_it} ⊗ b_it``; ghost norm ``Σ_{t,t'} [idx_it = idx_it'] ⟨b_it, b_it'⟩``."""

    def __init__(self, param: nn.Parameter, indices: torch.Tensor, grads: torch.Tensor) -> None:
        self.param = param
        self.indices, self.grads = indices, grads  # [B, T], [B, T, d] (padding positions zeroed)
        self.batch_size = indices.shape[0]

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        grads = _wide(self.grads)
        out = torch.zeros(self.param.shape, dtype=grads.dtype, device=grads.device)
        scaled = grads * factors.to(grads.dtype)[:, None, None]
        return out.index_add_(0, self.indices.reshape(-1), scaled.reshape(-1, scaled.shape[-1]))

    def materialise(self, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        n, (rows, dim) = hi - lo, self.param.shape
        out = torch.zeros(n * rows, dim, dtype=_wide(self.grads).dtype, device=self.grads.device)
        offsets = torch.arange(n, device=self.indices.device)[:, None] * rows
        index = (self.indices[lo:hi] + offsets).reshape(-1)
        return out.index_add_(0, index, _wide(self.grads[lo:hi]).reshape(-1, dim)).view(n, rows, dim)


def _grouped_term(term: _Term, views: int, module: str) -> _Term:
    """``term`` with each sample's ``views`` consecutive rows (its augmented views) as one sample.

    A weight's gradient over a sample's views is the sum over their positions: the views become more
    positions (``T → views·T``) of one sample, so ghost norms, book-keeping and materialisation apply
    unchanged; a clip factor is shared by the rows of its sample.
    """
    if term.batch_size % views:
        return term  # the batch-dimension check refuses it
    samples = term.batch_size // views
    if isinstance(term, DenseTerm):
        rows = term.per_sample
        return DenseTerm(term.param, rows.view(samples, views, *rows.shape[1:]).sum(1))
    if isinstance(term, EmbeddingTerm):
        return EmbeddingTerm(
            term.param, term.indices.reshape(samples, -1), term.grads.reshape(samples, -1, term.grads.shape[-1])
        )
    if type(term) is GemmTerm:
        _, groups, t, p, o = term.shape

        def fold(rows: torch.Tensor, n: int) -> torch.Tensor:  # [n·views, G, T, D] -> [n, G, views·T, D]
            return rows.reshape(n, views, groups, t, -1).transpose(1, 2).reshape(n, groups, views * t, -1)

        return GemmTerm(
            term.param,
            lambda lo, hi: fold(term.patches(lo * views, hi * views), hi - lo),
            lambda lo, hi: fold(term.grads(lo * views, hi * views), hi - lo),
            (samples, groups, views * t, p, o),
            lambda c: term.clipped_sum(c.repeat_interleave(views)),
        )
    raise ValueError(
        f"DPStrategy(augmentation_multiplicity={views}): `{module}` ({type(term).__name__}) has no per-view "
        "form; weight-standardised convs are not supported with several views per sample."
    )


# ------------------------------------------------------------------------------------------ norms
def _gemm_prefers_ghost(terms: list[GemmTerm]) -> bool:
    """Mixed ghost clipping: the ghost norm costs ``G·T²·(P+O)``, a materialised one ``G·T·P·O``.

    The ghost norm is taken up to :data:`GHOST_ADVANTAGE` times the materialised multiply-adds.
    """
    _, _, _, p, o = terms[0].shape
    t = sum(term.shape[2] for term in terms)
    return t * (p + o) <= GHOST_ADVANTAGE * p * o


def _gemm_squared_norms(terms: list[GemmTerm], ghost: bool) -> torch.Tensor:
    """``‖g_i‖²`` of a weight over all its calls: the calls' patches and gradients concatenate along T."""
    batch, groups, _, p, o = terms[0].shape
    t = sum(term.shape[2] for term in terms)
    out = []
    # a materialised per-sample gradient is only reduced here: cache-sized chunks
    if not ghost:
        return torch.cat([_materialised_squared_norms(g) for _, _, g in _materialised_chunks(terms)])
    for lo, hi in _chunks(batch, groups * t * (2 * t + p + o)):
        a = _cat([_wide(term.patches(lo, hi)) for term in terms])  # [b, G, T, P]
        b = _cat([_wide(term.grads(lo, hi)) for term in terms])  # [b, G, T, O]
        if t == 1:
            norms = (a.square().sum(-1) * b.square().sum(-1)).sum((1, 2))
        else:
            gram = a @ a.transpose(-1, -2)  # [b, G, T, T]
            norms = gram.mul_(b @ b.transpose(-1, -2)).sum((1, 2, 3))
        correction = terms[0].norm_correction(terms, lo, hi)
        out.append(norms if correction is None else norms + correction.to(norms.dtype))
    return torch.cat(out)


def _materialised(terms: list[_Term], lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The per-sample gradient of samples ``lo:hi`` over all calls, ``[hi - lo, *param.shape]``.

    A single :class:`DenseTerm` returns (a view of) its own storage; anything else is a fresh tensor
    or ``out``, a buffer the first call may write into.
    """
    total = terms[0].materialise(lo, hi, out)
    for term in terms[1:]:
        total = total + term.materialise(lo, hi)
    return total


def _materialised_chunks(terms: list[_Term]) -> Iterable[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, per-sample gradients)`` over the batch in cache-sized chunks (:data:`CACHE_ELEMENTS`).

    The gradients are fresh tensors the caller may change in place, and are overwritten by the next
    chunk: the first chunk's tensor is the buffer of all the others. (With a fresh multi-MB tensor per
    chunk and a separate product and add per chunk, ResNet-18's layer3 scoring sums took twice as long.)
    """
    buffer: torch.Tensor | None = None
    own = len(terms) > 1 or not isinstance(terms[0], DenseTerm)  # see _materialised
    for lo, hi in _chunks(terms[0].batch_size, terms[0].param.numel(), CACHE_ELEMENTS):
        g = _materialised(terms, lo, hi, None if buffer is None else buffer[: hi - lo])
        if not own:
            g = g.clone()
        elif buffer is None:
            buffer = g
        yield lo, hi, g


def _materialised_squared_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """``‖g_i‖²`` of per-sample gradients ``[B, ...]``."""
    return torch.linalg.vector_norm(per_sample.flatten(1), dim=1).square()


def _zero_rows(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``t`` (rows sample-major: ``[B·k, ...]``) with the rows of the ``dropped`` samples set to zero, NaN included."""
    rows = dropped.to(t.device).repeat_interleave(t.shape[0] // dropped.numel())
    return torch.where(rows.view(-1, *[1] * (t.dim() - 1)), torch.zeros((), dtype=t.dtype, device=t.device), t)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _embedding_squared_norms(terms: list[EmbeddingTerm]) -> torch.Tensor:
    idx = torch.cat([term.indices for term in terms], dim=1)
    grads = torch.cat([_wide(term.grads) for term in terms], dim=1)
    batch, t = idx.shape
    out = []
    for lo, hi in _chunks(batch, 2 * t * t):
        same = (idx[lo:hi, :, None] == idx[lo:hi, None, :]).to(grads.dtype)
        out.append((same * (grads[lo:hi] @ grads[lo:hi].transpose(1, 2))).sum((1, 2)))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ engines
@dataclass
class _Group:
    """All terms of one parameter in the current micro-batch, and how its norm is computed."""

    terms: list[_Term]
    module: str
    norm: str = ""
    # the per-sample gradient ``[B, *param.shape]`` when its norm was materialised in one piece: kept
    # for the clipped sum (cheaper than the book-keeping product for small weights such as depthwise
    # filters) and for SPARTA's Σ c_i |g_i|, which would otherwise materialise it a second time
    per_sample: torch.Tensor | None = None


class ClippingEngine:
    """Per-sample norms and clipped sums of the hooked parameters of one micro-batch.

    Use: :meth:`attach` the model; run forward and backward inside ``hooks.capturing()``; then
    :meth:`check_batch_dimension`, optionally :meth:`unclipped_sums` (the first-step sum check),
    :meth:`squared_norms`, :meth:`accumulate` with the clip factors, and :meth:`clear`.

    Args:
        hooks: the hook engine that records the layers' inputs and output gradients.
    """

    mode: str = "per_sample"

    def __init__(self, hooks: PerSampleGradients) -> None:
        self.hooks = hooks

    @property
    def parameters(self) -> list[nn.Parameter]:
        return self.hooks.parameters

    def attach(self, model: nn.Module) -> None:
        """Hook ``model``'s modules that own parameters trainable now."""
        self.hooks.attach(model)

    def batch_sizes(self) -> list[tuple[nn.Parameter, int]]:
        """The leading (sample) dimension each hooked parameter's gradient was computed with."""
        return [(p, p.grad_sample.shape[0]) for p in self.parameters if has_grad_sample(p)]

    def check_batch_dimension(self, batch_size: int) -> None:
        """Refuse per-sample gradients whose leading dimension is not the micro-batch size.

        A model that folds other dimensions into the batch (``[B, T, D] -> [B·T, D]`` before a Linear)
        would be clipped per token, not per sample: one sample could then contribute ``T·C``.
        """
        for p, found in self.batch_sizes():
            if found != batch_size:
                name = self.hooks.parameter_names.get(p, "?")
                module = name.rpartition(".")[0] or "<root>"
                self.clear()
                raise ValueError(
                    f"DPStrategy: module `{module}` produced per-sample gradients for {found} samples "
                    f"(parameter `{name}`), but the micro-batch has {batch_size}: the model reshapes the batch "
                    "dimension (e.g. [B, T, D] -> [B·T, D]) before this layer, which would clip each token "
                    "instead of each sample. Keep the batch as the leading dimension of every layer's input "
                    "(Linear accepts [B, T, D])."
                )

    def group_views(self, views: int) -> None:
        """Make each sample's ``views`` consecutive rows one sample (augmentation multiplicity).

        The micro-batch ran through the model as ``B·views`` rows, sample-major; a sample's gradient is
        the sum of its rows' contributions (of its own loss). Call after the backward pass and before
        :meth:`check_batch_dimension`, which then expects ``B``. Rows that do not divide by ``views`` are
        left as they are, for that check to refuse.
        """
        for p in self.parameters:
            if has_grad_sample(p) and p.grad_sample.shape[0] % views == 0:
                rows = p.grad_sample
                p.grad_sample = rows.view(rows.shape[0] // views, views, *rows.shape[1:]).sum(1)

    def squared_norms(self) -> torch.Tensor:
        """``‖g_i‖²`` over all hooked parameters, ``[B]``, in at least float32."""
        norms = self.hooks.per_sample_norms()
        return norms.square() if norms.numel() else norms

    def unclipped_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        """``Σ_i g_i`` per parameter (for the first-step check that per-sample gradients add up)."""
        return {p: _wide(p.grad_sample).sum(0) for p in self.parameters if has_grad_sample(p)}

    def sums_not_adding_up(self, loss_scale: float, tolerance: float) -> list[str]:
        """Names of hooked parameters whose per-sample gradients do not add up to their batch gradient.

        Compares ``Σ_i g_i`` with ``p.grad · loss_scale`` (autograd's gradient of the same pass, kept for
        this check) by the relative error of the norms, above a floor of float32 rounding at the scale
        of the whole gradient: a gradient that cancels to nearly zero (a bias before InstanceNorm, which
        removes each channel's mean) is rounding on both sides, and its relative error means nothing.
        """
        sums = self.unclipped_sums()
        grads = {p: torch.zeros_like(p) if p.grad is None else p.grad.float() * loss_scale for p in self.parameters}
        scale = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])) if grads else 0.0
        floor = 1e-5 * float(scale) + 1e-8
        wrong = []
        for p, batch_grad in grads.items():
            error = (sums.get(p, torch.zeros_like(p)).float() - batch_grad).norm()
            if error > tolerance * batch_grad.norm() + floor:
                wrong.append(self.hooks.parameter_names[p])
        return wrong

    def without_gradient(self) -> list[str]:
        """Names of hooked parameters that got neither a per-sample nor a batch gradient in this pass."""
        reached = {p for p, _ in self.batch_sizes()}  # no sums formed: the first-step check formed them already
        return [self.hooks.parameter_names[p] for p in self.parameters if p not in reached and p.grad is None]

    def accumulate(
        self,
        sums: dict[nn.Parameter, torch.Tensor],
        factors: torch.Tensor,
        absolute: Iterable[nn.Parameter] = (),
        unclipped: Iterable[nn.Parameter] = (),
        only: Iterable[nn.Parameter] | None = None,
    ) -> None:
        """Add ``Σ_i c_i g_i`` of every hooked parameter to ``sums`` (float32 or wider).

        Args:
            sums: running sums, updated in place.
            factors: clip factors ``c_i``, ``[B]``.
            absolute: parameters whose sum is ``Σ_i c_i |g_i|`` (SPARTA's scores).
            unclipped: parameters summed with ``c_i = 1`` (the oracle mask's true gradients).
            only: when given, the other parameters are skipped.
        """
        absolute, unclipped = {id(p) for p in absolute}, {id(p) for p in unclipped}
        wanted = None if only is None else {id(p) for p in only}
        ones = torch.ones_like(factors)
        for p in self.parameters:
            if not has_grad_sample(p) or (wanted is not None and id(p) not in wanted):
                continue
            grad_sample = p.grad_sample
            if id(p) in absolute:
                # in place when the engine owns the storage (cleared afterwards): no second copy of g_i
                grad_sample = grad_sample.abs_() if grad_sample.is_contiguous() else grad_sample.abs()
            c = ones if id(p) in unclipped else factors
            grad_sample = _wide(grad_sample)
            _add(sums, p, torch.einsum("i,i...->...", c.to(grad_sample.dtype), grad_sample))

    def leave_out(self, dropped: torch.Tensor) -> None:
        """Zero every recorded contribution of the samples where ``dropped`` (``[B]``, bool) is true.

        For samples whose gradient is not finite: a NaN or an infinity has no clipped form, and in a sum
        it would turn the whole release into NaN, which tells whether such a sample was drawn (an unbounded
        privacy loss). With everything of theirs zeroed, their norms are zero and they add nothing.
        Call after :meth:`squared_norms`, then take the norms again.
        """
        for p in self.parameters:
            if has_grad_sample(p):
                p.grad_sample = _zero_rows(p.grad_sample, dropped)

    def clear(self) -> None:
        """Drop everything recorded for the current micro-batch and the parameters' ``.grad``."""
        self.hooks.clear()
        for p in self.parameters:
            p.grad = None


class MaterialisingClipping(ClippingEngine):
    """Today's engine: every hooked parameter gets ``grad_sample``; norms and sums come from it."""

    mode = "per_sample"


class GhostClipping(ClippingEngine):
    """Ghost norms and book-keeping sums for layers with a ghost form, per-sample tensors for the rest.

    Args:
        hooks: the hook engine.
        mixed: per layer, take the cheaper of ghost and materialised norms (``"auto"``); ``False``
            takes the ghost norm wherever a ghost form exists (``"ghost"``).
    """

    def __init__(self, hooks: PerSampleGradients, mixed: bool = True) -> None:
        super().__init__(hooks)
        self.mixed = mixed
        self.mode = "auto" if mixed else "ghost"
        self._groups: dict[nn.Parameter, _Group] | None = None
        self._scale = 1.0  # the loss scale of the recorded output gradients
        self._dropped: torch.Tensor | None = None  # samples left out of this micro-batch (see leave_out)
        self._views = 1  # rows per sample (augmentation multiplicity), set by group_views

    def attach(self, model: nn.Module) -> None:
        self.hooks.attach(model, ghost=has_ghost_form)
        self._groups = None

    def _terms(self) -> dict[nn.Parameter, _Group]:
        """The recorded calls as terms, grouped by parameter (built once per micro-batch)."""
        if self._groups is None:
            groups: dict[nn.Parameter, _Group] = {}
            records = self.hooks.ghost_records()
            # the output gradients are recorded unscaled: the loss scale multiplies the norms and the clip
            # factors instead (one scale per micro-batch; a call recorded with another one is rescaled)
            self._scale = next((scale for _, _, calls in records for _, _, scale in calls), 1.0)
            for module, name, calls in records:
                form = _GHOST_FORMS[type(module)][0]
                for inputs, grad_output, scale in calls:
                    if self._dropped is not None:  # samples left out: zero their rows of the call's batch tensors
                        rows = grad_output.shape[0]
                        inputs = [
                            _zero_rows(x, self._dropped)
                            if torch.is_tensor(x) and x.is_floating_point() and x.dim() and x.shape[0] == rows
                            else x
                            for x in inputs
                        ]
                        grad_output = _zero_rows(grad_output, self._dropped)
                    if scale != self._scale:
                        grad_output = grad_output * (scale / self._scale)
                    for term in form(module, inputs, grad_output):
                        if self._views > 1:
                            term = _grouped_term(term, self._views, name)
                        groups.setdefault(term.param, _Group([], name)).terms.append(term)
            self._groups = groups
        return self._groups

    def batch_sizes(self) -> list[tuple[nn.Parameter, int]]:
        sizes = super().batch_sizes()
        for p, group in self._terms().items():
            sizes += [(p, term.batch_size) for term in group.terms]
        return sizes

    def _kept(self, groups: Iterable[_Group]) -> set[int]:
        """The materialised weights (by group id) whose per-sample gradients are kept for the sums.

        In the model's order, within :data:`KEEP_GROUPED_ELEMENTS` in all for grouped convs (depthwise
        filters, whose book-keeping product is slow) and :data:`KEEP_ELEMENTS` for the other layers.
        """
        kept, totals = set(), {True: 0, False: 0}
        for g in groups:
            if not (isinstance(g.terms[0], GemmTerm) and self.mixed and not _gemm_prefers_ghost(g.terms)):  # type: ignore[arg-type]
                continue
            grouped = g.terms[0].shape[1] > 1
            size = g.terms[0].batch_size * g.terms[0].param.numel()
            if totals[grouped] + size <= (KEEP_GROUPED_ELEMENTS if grouped else KEEP_ELEMENTS):
                kept.add(id(g))
                totals[grouped] += size
        return kept

    def squared_norms(self) -> torch.Tensor:
        total = super().squared_norms()
        kept = self._kept(self._terms().values())
        for group in self._terms().values():
            terms = group.terms
            if isinstance(terms[0], GemmTerm):
                ghost = not self.mixed or _gemm_prefers_ghost(terms)  # type: ignore[arg-type]
                if id(group) in kept:  # materialised in one piece and kept for the sums
                    group.per_sample = _materialised(terms, 0, terms[0].batch_size)  # type: ignore[arg-type]
                    norms = _materialised_squared_norms(group.per_sample)
                else:
                    norms = _gemm_squared_norms(terms, ghost)  # type: ignore[arg-type]
                _, groups_, _, p, o = terms[0].shape  # type: ignore[attr-defined]
                t = sum(term.shape[2] for term in terms)  # type: ignore[attr-defined]
                group.norm = f"{'ghost' if ghost else 'materialised'} norm (T={t}, d_in={p}, d_out={o}"
                group.norm += f", groups={groups_})" if groups_ > 1 else ")"
            elif isinstance(terms[0], EmbeddingTerm):
                norms, group.norm = _embedding_squared_norms(terms), "ghost norm"  # type: ignore[arg-type]
            else:
                norms = _dense_squared_norms(terms)
                group.norm = "per-sample"
            if self._scale != 1:
                norms = norms * self._scale**2
            total = norms if total.numel() == 0 else total + norms.to(total.dtype)
        self.hooks.set_clipping_notes(
            {self.hooks.parameter_names.get(p, "?"): g.norm for p, g in self._terms().items()}
        )
        return total

    def unclipped_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        sums = super().unclipped_sums()
        for p, group in self._terms().items():
            scale = torch.full((group.terms[0].batch_size,), self._scale, device=p.device)
            sums[p] = sum(term.clipped_sum(scale) for term in group.terms)
        return sums

    def accumulate(
        self,
        sums: dict[nn.Parameter, torch.Tensor],
        factors: torch.Tensor,
        absolute: Iterable[nn.Parameter] = (),
        unclipped: Iterable[nn.Parameter] = (),
        only: Iterable[nn.Parameter] | None = None,
    ) -> None:
        absolute, unclipped = list(absolute), list(unclipped)
        super().accumulate(sums, factors, absolute, unclipped, only)
        absolute_ids, unclipped_ids = {id(p) for p in absolute}, {id(p) for p in unclipped}
        wanted = None if only is None else {id(p) for p in only}
        for p, group in self._terms().items():
            if wanted is not None and id(p) not in wanted:
                continue
            c = torch.ones_like(factors) if id(p) in unclipped_ids else factors
            if self._scale != 1:  # the recorded output gradients are unscaled (positive scale: |s·g| = s·|g|)
                c = c * self._scale
            if group.per_sample is not None:  # materialised for the norm already
                per_sample = group.per_sample.abs_() if id(p) in absolute_ids else group.per_sample
                _add(sums, p, torch.einsum("i,i...->...", c.to(per_sample.dtype), per_sample))
            elif id(p) in absolute_ids:
                _add(sums, p, _absolute_sum(group.terms, p, c))
            else:
                _add(sums, p, sum(term.clipped_sum(c) for term in group.terms))

    def group_views(self, views: int) -> None:
        super().group_views(views)
        self._views, self._groups = views, None

    def leave_out(self, dropped: torch.Tensor) -> None:
        super().leave_out(dropped)
        self._dropped, self._groups = dropped, None  # the terms are built again from the zeroed records

    def clear(self) -> None:
        self._groups = None
        self._views = 1
        self._dropped = None
        super().clear()


def _absolute_sum(terms: list[_Term], p: nn.Parameter, factors: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i |g_i|`` of one parameter over all its calls (SPARTA's scores).

    A single call with one position has a product form (:meth:`GemmTerm.absolute_sum`); otherwise
    ``|g_i|`` has none, and the per-sample gradients are materialised in cache-sized chunks of samples.
    """
    if len(terms) == 1 and isinstance(terms[0], GemmTerm):
        product = terms[0].absolute_sum(factors)
        if product is not None:
            return product
    total: torch.Tensor | None = None
    for lo, hi, g in _materialised_chunks(terms):
        g = g.view(hi - lo, -1).abs_()
        if total is None:
            total = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
        total.addmv_(g.T, factors[lo:hi].to(g.dtype))  # += Σ_i c_i |g_i|, with no temporary
    assert total is not None
    return total.view(p.shape)


def _dense_squared_norms(terms: list[_Term]) -> torch.Tensor:
    return _materialised_squared_norms(_materialised(terms, 0, terms[0].batch_size))


def _add(sums: dict[nn.Parameter, torch.Tensor], p: nn.Parameter, value: torch.Tensor) -> None:
    if p in sums:
        sums[p].add_(value)  # the engine's own tensor, created by the first add of this step
    else:
        sums[p] = value


def create_clipping_engine(mode: ClippingMode, hooks: PerSampleGradients) -> ClippingEngine:
    """The engine for ``DPStrategy(clipping=mode)``."""
    if mode == "per_sample":
        return MaterialisingClipping(hooks)
    if mode in ("auto", "ghost"):
        return GhostClipping(hooks, mixed=mode == "auto")
    raise ValueError(f"`clipping` must be one of {list(CLIPPING_MODES)}, got {mode!r}.")


# ------------------------------------------------------------------------------------------ forms
def _trainable(param: nn.Parameter | None) -> bool:
    return param is not None and param.requires_grad


def _linear_terms(
    weight: nn.Parameter | None, bias: nn.Parameter | None, x: torch.Tensor, g: torch.Tensor, rows=None
) -> list[_Term]:
    """Terms of ``y = x Wᵀ + b`` on inputs ``[B, ..., P]``; ``rows``: W holds only those output rows."""
    batch = g.shape[0]
    a = x.reshape(batch, -1, x.shape[-1])  # [B, T, P]  (reshape errors on a folded batch: checked below)
    b = g.reshape(batch, -1, g.shape[-1])  # [B, T, O]
    terms: list[_Term] = []
    if _trainable(bias):
        terms.append(DenseTerm(bias, _wide(b).sum(1)))
    if _trainable(weight):
        bw = b if rows is None else select_channels(b, -1, rows)
        t, p, o = a.shape[1], a.shape[2], bw.shape[2]

        def clipped_sum(c: torch.Tensor, a=a, bw=bw) -> torch.Tensor:
            a2, b2 = _wide(a), _wide(bw)
            if p <= o:
                a2 = a2 * c.to(a2.dtype)[:, None, None]
            else:
                b2 = b2 * c.to(b2.dtype)[:, None, None]
            return b2.reshape(-1, o).T @ a2.reshape(-1, p)

        terms.append(
            GemmTerm(
                weight,
                lambda lo, hi, a=a: a[lo:hi, None],
                lambda lo, hi, bw=bw: bw[lo:hi, None],
                (batch, 1, t, p, o),
                clipped_sum,
            )
        )
    return terms


@register_ghost_form(nn.Linear)
def linear_ghost_form(module: nn.Linear, inputs: list, grad_output: torch.Tensor) -> list[_Term]:
    """``nn.Linear`` on ``[B, in]`` or ``[B, ..., in]``."""
    return _linear_terms(module.weight, module.bias, inputs[0], grad_output)


def _conv_padding(module: nn.Module) -> tuple[int, int] | None:
    padding = module.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(total % 2 for total in totals):
            return None
        return tuple(total // 2 for total in totals)  # type: ignore[return-value]
    return tuple(padding)  # type: ignore[return-value]


def _supports_conv(module: nn.Module) -> bool:
    return getattr(module, "padding_mode", "zeros") == "zeros" and _conv_padding(module) is not None


def _conv_terms(
    module: nn.Module,
    weight: nn.Parameter | None,
    bias: nn.Parameter | None,
    x: torch.Tensor,
    g: torch.Tensor,
    padding: tuple[int, int],
    groups: int,
) -> list[_Term]:
    """Terms of a 2-D convolution with input ``x`` (as the conv sees it) and output gradient ``g``."""
    batch = g.shape[0]
    terms: list[_Term] = []
    if _trainable(bias):
        terms.append(DenseTerm(bias, _wide(g).sum((2, 3))))
    if _trainable(weight):
        assert weight is not None
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        t = g.shape[2] * g.shape[3]
        o = g.shape[1] // groups
        p = x.shape[1] // groups * kernel[0] * kernel[1]

        def patches(lo: int, hi: int, x=x) -> torch.Tensor:
            cols = F.unfold(x[lo:hi], kernel, dilation=dilation, padding=padding, stride=stride)
            return cols.view(hi - lo, groups, p, t).transpose(2, 3)

        def grads(lo: int, hi: int, g=g) -> torch.Tensor:
            return g[lo:hi].reshape(hi - lo, groups, o, t).transpose(2, 3)

        def clipped_sum(c: torch.Tensor, x=x, g=g) -> torch.Tensor:
            xs, gs = _wide(x), _wide(g)
            if xs[0].numel() <= gs[0].numel():
                xs = xs * c.to(xs.dtype)[:, None, None, None]
            else:
                gs = gs * c.to(gs.dtype)[:, None, None, None]
            return torch.nn.grad.conv2d_weight(xs, weight.shape, gs, stride, padding, dilation, groups)

        def grouped(lo: int, hi: int, x=x, g=g) -> torch.Tensor:
            # the samples as groups of one convolution: weight gradient [n·C_out, C_in/groups, kH, kW]
            n = hi - lo
            xs = _wide(x[lo:hi]).reshape(1, n * x.shape[1], *x.shape[2:])
            gs = _wide(g[lo:hi]).reshape(1, n * g.shape[1], *g.shape[2:])
            shape = (n * g.shape[1], x.shape[1] // groups, *kernel)
            return torch.nn.grad.conv2d_weight(xs, shape, gs, stride, padding, dilation, n * groups).view(
                n, *weight.shape
            )

        materialise = grouped if t >= GROUPED_CONV_MIN_T else None
        terms.append(GemmTerm(weight, patches, grads, (batch, groups, t, p, o), clipped_sum, materialise))
    return terms


@register_ghost_form(nn.Conv2d, _supports_conv)
def conv2d_ghost_form(module: nn.Conv2d, inputs: list, grad_output: torch.Tensor) -> list[_Term]:
    """``nn.Conv2d`` (any stride, dilation, groups; zero padding): a Linear over unfolded patches."""
    return _conv_terms(module, module.weight, module.bias, inputs[0], grad_output, _conv_padding(module), module.groups)


def _register_sparse_and_timm() -> None:
    from lightning_sparta.sparse.layers import RowSparseConv2d, RowSparseLinear

    @register_ghost_form(RowSparseLinear)
    def row_sparse_linear_ghost_form(module: RowSparseLinear, inputs: list, grad_output: torch.Tensor):
        """``RowSparseLinear``: ``b`` restricted to the k selected rows; the dense bias sees all of ``b``."""
        return _linear_terms(module.weight_rows, module.bias, inputs[0], grad_output, rows=module.rows)

    @register_ghost_form(RowSparseConv2d)
    def row_sparse_conv2d_ghost_form(module: RowSparseConv2d, inputs: list, grad_output: torch.Tensor):
        """``RowSparseConv2d``: the k selected filters; a grouped conv's filter reads its group's channels."""
        x = module._prepare_input(inputs[0])
        terms: list[_Term] = []
        if _trainable(module.bias):
            terms.append(DenseTerm(module.bias, _wide(grad_output).sum((2, 3))))
        selected = select_channels(grad_output, 1, module.rows)
        if module.groups == 1:
            rows_input, groups = x, 1
        else:  # the selected filters' own channels, so that a conv with groups=k gives them
            rows_input, groups = module._row_inputs(x), module.num_rows
        return terms + _conv_terms(module, module.weight_rows, None, rows_input, selected, module.padding, groups)

    # Opacus' own fast gradient clipping (``grad_sample_mode="ghost"``) looks norm samplers up by exact
    # type too: give it the row-sparse layers' ghost norms (O(k), no per-sample gradient).
    register_norm_sampler([RowSparseLinear, RowSparseConv2d])(opacus_norm_sampler)

    try:
        from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
        from timm.layers.padding import pad_same

        from lightning_sparta.sparse.grad_samplers import weight_standardisation
    except ImportError:  # pragma: no cover
        return

    standardised = (StdConv2d, ScaledStdConv2d, StdConv2dSame, ScaledStdConv2dSame)

    def standardised_conv_ghost_form(module: nn.Conv2d, inputs: list, grad_output: torch.Tensor) -> list[_Term]:
        """timm's weight-standardised convs: the plain conv's terms for ``diag(w) G``, plus the correction
        of the filters' normalisation backward (:class:`StandardisedTerm`); ``gain`` per sample in closed form."""
        x = inputs[0]
        if getattr(module, "same_pad", False):
            x = pad_same(x, module.kernel_size, module.stride, module.dilation)
        padding, groups = _conv_padding(module), module.groups
        g = _wide(grad_output)
        terms: list[_Term] = []
        if _trainable(module.bias):
            terms.append(DenseTerm(module.bias, g.sum((2, 3))))
        gain = getattr(module, "gain", None)
        if not (_trainable(module.weight) or _trainable(gain)):
            return terms
        xs = _wide(x)
        x_hat, inv_std, a = weight_standardisation(module, xs.dtype)
        n, shape = x_hat.shape[1], module.weight.shape
        # per sample and filter: Σ_t g_t (x̂_o · patch_t) and Σ_t g_t Σ(patch_t), one conv of the input each
        along = F.conv2d(xs, x_hat.view(shape), None, module.stride, padding, module.dilation, groups)
        c = (g * along).sum((2, 3)) / n  # [B, out]: mean(G_o ⊙ x̂_o)
        if _trainable(gain):
            assert gain is not None
            terms.append(DenseTerm(gain, (c * (n * module.scale)).view(len(g), *gain.shape)))
        if _trainable(module.weight):
            ones = torch.ones((groups, *shape[1:]), dtype=xs.dtype, device=xs.device)
            sums = F.conv2d(xs, ones, None, module.stride, padding, module.dilation, groups)  # [B, groups, H', W']
            sums = sums.repeat_interleave(module.out_channels // groups, dim=1)
            mean = (g * sums).sum((2, 3)) / n  # [B, out]: mean(G_o)
            w = a * inv_std
            base = _conv_terms(module, module.weight, None, x, g * w[None, :, None, None], padding, groups)
            terms.append(StandardisedTerm(base[0], x_hat, w, mean, c))  # type: ignore[arg-type]
        return terms

    for kind in standardised:
        register_ghost_form(kind, _supports_conv)(standardised_conv_ghost_form)

    def supports_same(module: nn.Module) -> bool:
        return type(module).forward is Conv2dSame.forward and _supports_conv(module)

    @register_ghost_form(Conv2dSame, supports_same)
    def conv2d_same_ghost_form(module: Conv2dSame, inputs: list, grad_output: torch.Tensor):
        """timm's ``Conv2dSame``: the input padded with ``pad_same``, then a conv without padding."""
        x = pad_same(inputs[0], module.kernel_size, module.stride, module.dilation)
        return _conv_terms(module, module.weight, module.bias, x, grad_output, (0, 0), module.groups)


def opacus_norm_sampler(
    module: nn.Module, activations: list, backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms ``[B]`` of ``module``'s trainable parameters from its ghost form.

    Opacus' norm-sampler signature (``opacus.grad_sample.register_norm_sampler``), registered for the
    row-sparse layers so that Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``,
    ``PrivacyEngine.make_private(..., grad_sample_mode="ghost")``) handles them without per-sample
    gradients. Each weight takes the cheaper of the ghost and the materialised norm, as under
    ``DPStrategy(clipping="auto")``.
    """
    norms: dict[nn.Parameter, torch.Tensor] = {}
    for term in _GHOST_FORMS[type(module)][0](module, activations, backprops):  # weight and bias terms
        if isinstance(term, GemmTerm):
            squared = _gemm_squared_norms([term], _gemm_prefers_ghost([term]))
        else:
            squared = _dense_squared_norms([term])
        norms[term.param] = squared.sqrt()
    return norms


def _supports_embedding(module: nn.Embedding) -> bool:
    return module.max_norm is None and not module.sparse and not module.scale_grad_by_freq


@register_ghost_form(nn.Embedding, _supports_embedding)
def embedding_ghost_form(module: nn.Embedding, inputs: list, grad_output: torch.Tensor) -> list[_Term]:
    """``nn.Embedding`` (no ``max_norm``, ``sparse`` or ``scale_grad_by_freq``); ``padding_idx`` gets no gradient."""
    if not _trainable(module.weight):
        return []
    batch = grad_output.shape[0]
    indices = inputs[0].reshape(batch, -1)
    grads = grad_output.reshape(batch, -1, grad_output.shape[-1])
    if module.padding_idx is not None:
        grads = grads * (indices != module.padding_idx).unsqueeze(-1).to(grads.dtype)
    return [EmbeddingTerm(module.weight, indices, grads)]


def _supports_attention(module: nn.MultiheadAttention) -> bool:
    # attention dropout could not be redrawn by the recomputation below (the replay refuses it instead)
    return (
        module.batch_first
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and module.dropout == 0.0
    )


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


@register_ghost_form(nn.MultiheadAttention, _supports_attention)
def attention_ghost_form(module: nn.MultiheadAttention, inputs: list, grad_output: torch.Tensor) -> list[_Term]:
    """``nn.MultiheadAttention`` (batch first, no attention dropout): two Linear maps around the attention.

    The forward passes its projections' weights to ``F.multi_head_attention_forward`` instead of calling
    them, so the hooks see only the attention's inputs and the gradient ``g`` of its output. The attention
    core is recomputed once for the whole batch (it treats each sample on its own): from the projected
    ``q, k, v`` as leaves, with identity projections, it gives the out-projection's input ``o``, and one
    backward of ``o`` with its gradient ``g W_out`` gives the gradients of ``q, k, v``. The in-projection
    is then a Linear with input ``x`` and output gradient ``[g_q, g_k, g_v]`` (self-attention; separate
    query, key and value inputs give materialised blocks), the out-projection a Linear with input ``o``
    and output gradient ``g``. Keyword inputs (masks, ``is_causal``) are passed to the recomputation.
    """
    *args, kwargs = inputs if inputs and isinstance(inputs[-1], dict) else (*inputs, {})
    names = ("query", "key", "value")
    query, key, value = (*args, *(kwargs[n] for n in names[len(args) :]))
    options = {n: kwargs.get(n) for n in ("key_padding_mask", "attn_mask")}
    is_causal = bool(kwargs.get("is_causal", False))
    embed, heads = module.embed_dim, module.num_heads
    wide = torch.promote_types(query.dtype, torch.float32)  # recomputed in float32 at least (bf16 forwards)
    weight = module.in_proj_weight.detach().to(wide)
    bias = module.in_proj_bias.detach().to(wide) if module.in_proj_bias is not None else None
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    options = {n: m.to(wide) if torch.is_tensor(m) and m.is_floating_point() else m for n, m in options.items()}
    with torch.enable_grad():
        projected = [
            F.linear(x.to(wide), w, b).detach().requires_grad_(True)
            for x, w, b in zip((query, key, value), weight.chunk(3), biases, strict=True)
        ]
        if all(m is None for m in options.values()) and not is_causal:  # ViT: the core alone, batched by head
            q, k, v = (t.unflatten(-1, (heads, embed // heads)).transpose(1, 2) for t in projected)
            attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, T, E]
        else:  # masks: PyTorch's own function (identity projections), so that they mean what they meant
            eye = torch.eye(embed, dtype=wide, device=query.device)
            out, _ = F.multi_head_attention_forward(
                *(t.transpose(0, 1) for t in projected),
                embed,
                heads,
                None,
                None,
                None,
                None,
                False,
                0.0,
                eye,
                None,
                training=False,
                need_weights=False,
                use_separate_proj_weight=True,
                q_proj_weight=eye,
                k_proj_weight=eye,
                v_proj_weight=eye,
                is_causal=is_causal,
                **options,
            )
            attended = out.transpose(0, 1)  # [B, T, E]: the out-projection's input
        back = grad_output.to(wide) @ module.out_proj.weight.detach().to(wide)
        grads = torch.autograd.grad(attended, projected, back)
    terms = _linear_terms(module.out_proj.weight, module.out_proj.bias, attended.detach(), grad_output)
    if _same_tensor(query, key) and _same_tensor(key, value):  # self-attention: one Linear [x] -> [q, k, v]
        return terms + _linear_terms(module.in_proj_weight, module.in_proj_bias, query, torch.cat(grads, -1))
    batch = grad_output.shape[0]
    if _trainable(module.in_proj_bias):
        sums = [_wide(g).reshape(batch, -1, embed).sum(1) for g in grads]
        terms.append(DenseTerm(module.in_proj_bias, torch.cat(sums, 1)))
    if _trainable(module.in_proj_weight):
        blocks = [
            torch.einsum("bto,bti->boi", _wide(g).reshape(batch, -1, embed), _wide(x).reshape(batch, -1, embed))
            for g, x in zip(grads, (query, key, value), strict=True)
        ]
        terms.append(DenseTerm(module.in_proj_weight, torch.cat(blocks, 1)))
    return terms


_register_sparse_and_timm()

__all__ = [
    "CACHE_ELEMENTS",
    "CHUNK_ELEMENTS",
    "CLIPPING_MODES",
    "GROUPED_CONV_MIN_T",
    "KEEP_ELEMENTS",
    "KEEP_GROUPED_ELEMENTS",
    "ClippingEngine",
    "ClippingMode",
    "DenseTerm",
    "EmbeddingTerm",
    "GemmTerm",
    "GhostClipping",
    "MaterialisingClipping",
    "create_clipping_engine",
    "has_ghost_form",
    "opacus_norm_sampler",
    "register_ghost_form",
]
