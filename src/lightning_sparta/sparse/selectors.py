"""Mask selectors: which weights of each scored layer SPARTA (or a baseline) fine-tunes.

A selector turns the scored layers' weights (``W_old``) and, for the data-driven ones, the scores
accumulated during the scoring epoch into a per-layer selection:

* ``granularity="row"``: a sorted 1-D ``LongTensor`` of output rows (a Linear's output neurons, a
  Conv2d's output filters), trained as a row-stacked ``weight_rows`` (paper, section 7);
* ``granularity="element"``: a bool mask of the weight's shape (unstructured baselines);
* ``granularity="fixed"``: no mask; a fixed set of parameters is trained (All, Last, DP-BitFit).

Registered selectors (see :func:`get_selector`):

============== =========== =================== ======= ==============================================
name           granularity scoring             private what
============== =========== =================== ======= ==============================================
``sparta``     row         ``abs_clipped``     yes     Algorithm 1: top rows of ``Σ_t Σ_i |clip(g_i)| + noise``
``dp_gradient`` element    ``clipped``         yes     Algorithm 2: top ``|Σ_t (Σ_i clip(g_i) + noise)|``
``oracle``     element     ``true_abs``        **no**  Algorithm 3: top ``Σ_t Σ_i |g_i|`` (true gradients)
``magnitude``  element     ``None``            yes     Algorithm 4 (MP, Luo et al.): top ``|W_old|``
``random``     element     ``None``            yes     a uniformly random mask ("Random-Groups")
``all``        fixed       ``None``            yes     every scored weight (full DP fine-tuning)
``last``       fixed       ``None``            yes     the classifier head and normalisation layers
``bitfit``     fixed       ``None``            yes     biases, normalisation layers and the head
``layers``     fixed       ``None``            yes     chosen layers densely (the last block by default)
============== =========== =================== ======= ==============================================

The "private" column is not a setting: :attr:`MaskSelector.private` is derived from ``scoring``
(only ``"true_abs"`` scoring, which skips clipping and noise, is not private), so a selector cannot
claim a guarantee its scoring does not give. :class:`~lightning_sparta.SpartaMaskCallback` refuses a
non-private selector unless ``allow_non_private=True``, and the run's ε is then reported as ``inf``.

Per-layer budgets follow section 4.2 of the paper: every layer keeps ``ceil(fraction · groups)``
groups (rows or entries), at least one. Ties are broken deterministically, lower index first.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Generator, Tensor
from typing_extensions import override

__all__ = [
    "AllSelector",
    "BitFitSelector",
    "DPGradientSelector",
    "FixedSelector",
    "LastSelector",
    "LayersSelector",
    "MagnitudeSelector",
    "MaskSelector",
    "OracleSelector",
    "RandomSelector",
    "SpartaSelector",
    "get_selector",
    "num_kept",
    "register_selector",
    "registered_selectors",
    "top_elements",
    "top_rows",
]

Scoring = Literal["abs_clipped", "clipped", "true_abs"]
Granularity = Literal["row", "element", "fixed"]


class MaskSelector:
    """How a mask is chosen: subclass it and implement :meth:`select_layer` (or :meth:`select`).

    Attributes:
        name: registry name (for logs and the saved mask).
        needs_scoring: whether the selector needs a scoring epoch over the private data.
        scoring: what the scoring epoch accumulates per coordinate of a scored weight:
            ``"abs_clipped"`` (``Σ_i |g_i|·min(1, C/‖g_i‖)`` + noise, SPARTA), ``"clipped"``
            (``Σ_i g_i·min(1, C/‖g_i‖)`` + noise, DP-SGD gradients) or ``"true_abs"`` (``Σ_i |g_i|``,
            unclipped and noiseless: not private); ``None`` if no scoring is needed.
        private: read-only, derived from ``scoring`` (see :attr:`private`).
        granularity: ``"row"``, ``"element"`` or ``"fixed"`` (see the module docstring).

    Example:
        >>> class NormRows(MaskSelector):  # rows of largest L2 norm of W_old; data-free
        ...     name, granularity = "norm_rows", "row"
        ...     def select_layer(self, weight, score, fraction, generator):
        ...         return top_rows(weight.reshape(weight.shape[0], -1).norm(dim=1), fraction)
        >>> NormRows().select({"fc": torch.tensor([[3.0, 4.0], [1.0, 0.0]])}, None, 0.5)
        {'fc': tensor([0])}
    """

    name: ClassVar[str] = ""
    needs_scoring: ClassVar[bool] = False
    scoring: ClassVar[Scoring | None] = None
    granularity: ClassVar[Granularity] = "element"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check a subclass's ``scoring`` and keep ``private`` derived from it.

        Raises:
            TypeError: for a ``scoring`` outside ``"abs_clipped"``, ``"clipped"``, ``"true_abs"`` and
                ``None``; for a ``private`` defined other than as a plain bool; or for a ``private``
                class attribute that contradicts ``scoring`` (e.g. ``private = True`` with
                ``scoring = "true_abs"``). A ``private`` that agrees with ``scoring`` is accepted and
                removed, so that the derived property stays the only source of truth.
        """
        super().__init_subclass__(**kwargs)
        if cls.scoring is not None and cls.scoring not in get_args(Scoring):
            raise TypeError(
                f"{cls.__name__}.scoring must be one of {list(get_args(Scoring))} or None, got {cls.scoring!r}."
            )
        if "private" not in cls.__dict__:
            return
        declared = cls.__dict__["private"]
        derived = _scoring_is_private(cls.needs_scoring, cls.scoring)
        if not isinstance(declared, bool):
            raise TypeError(
                f"{cls.__name__} must not redefine `private`: whether a selector is private follows from its "
                "`scoring` (only 'true_abs' scoring, unclipped and noiseless, is not private)."
            )
        if declared != derived:
            raise TypeError(
                f"{cls.__name__} sets `private = {declared}` but has `scoring = {cls.scoring!r}` (needs_scoring="
                f"{cls.needs_scoring}), whose mask is {'' if derived else 'NOT '}differentially private. Privacy "
                "follows from the scoring: remove `private`"
                + ("." if derived else ", or use a clipped and noised scoring ('abs_clipped' or 'clipped').")
            )
        delattr(cls, "private")

    @property
    def private(self) -> bool:
        """Whether the mask keeps the run differentially private, derived from ``scoring``.

        ``False`` exactly when the selector scores the private data (``needs_scoring``) with
        ``scoring="true_abs"``: such scores are neither clipped nor noised. :class:`SpartaMaskCallback
        <lightning_sparta.SpartaMaskCallback>` uses this one value both for the mechanism (it asks
        :meth:`~lightning_sparta.DPStrategy.begin_scoring` to clip and add noise iff it is True) and for
        the guarantee (when False it refuses the selector unless ``allow_non_private=True``, and then
        marks the run not private, so ε is reported as ``inf``): the two cannot disagree. Read-only.
        """
        return _scoring_is_private(self.needs_scoring, self.scoring)

    def select(
        self,
        weights: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor] | None,
        fraction: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Choose the trainable part of every scored layer (:meth:`select_layer` on each).

        Args:
            weights: ``W_old`` of every scored layer, by layer name.
            scores: the scoring epoch's sums by layer name (same shapes as the weights), or ``None``
                for a selector with ``needs_scoring=False``.
            fraction: fraction of rows (or entries) to keep per layer, in ``(0, 1]``.
            generator: CPU random generator, for randomised selectors.

        Returns:
            Layer name to a sorted ``LongTensor`` of rows (row granularity) or a bool mask of the
            weight's shape (element granularity); an empty dict for fixed sets.

        Raises:
            ValueError: if the selector needs scores and some layer has none.
        """
        if self.needs_scoring:
            if scores is None:
                raise ValueError(f"Selector {self.name!r} needs the scores of the scoring epoch, got None.")
            missing = [n for n in weights if n not in scores]
            if missing:
                raise ValueError(f"Selector {self.name!r} got no scores for layers {missing}.")
        return {
            name: self.select_layer(w, None if scores is None else scores.get(name), fraction, generator)
            for name, w in weights.items()
        }

    def select_layer(
        self,
        weight: torch.Tensor,
        score: torch.Tensor | None,
        fraction: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The selection of one layer: sorted row indices or a bool mask of ``weight``'s shape."""
        raise NotImplementedError(f"{type(self).__name__} must implement `select_layer` or `select`.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _scoring_is_private(needs_scoring: bool, scoring: str | None) -> bool:
    """Only a scoring epoch on true (unclipped, noiseless) gradients breaks differential privacy."""
    return not (needs_scoring and scoring == "true_abs")


def num_kept(fraction: float, total: int) -> int:
    """``ceil(fraction · total)``, at least 1 and at most ``total``.

    Example:
        >>> num_kept(0.2, 10), num_kept(0.01, 10), num_kept(0.21, 10)
        (2, 1, 3)
    """
    # round() first so that 0.2 * 10 = 2.0000000000000004 does not become 3.
    return max(1, min(total, math.ceil(round(fraction * total, 9))))


def _top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D tensor, ties to the lower index, sorted ascending."""
    order = torch.sort(-values.double(), stable=True).indices[:k]
    return order.sort().values


def top_rows(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Rows with the largest summed score: row ``j`` scores ``score.reshape(out, -1)[j].sum()``.

    Args:
        score: a tensor whose first dimension indexes rows (a weight-shaped score).
        fraction: fraction of rows to keep.

    Returns:
        Sorted ``LongTensor`` of ``num_kept(fraction, out)`` row indices (on the CPU).

    Example:
        >>> top_rows(torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 2.0]]), 0.5)  # rows sum to 2, 3, 2: tie to row 0
        tensor([0, 1])
    """
    rows = score.detach().reshape(score.shape[0], -1).double().sum(1).cpu()
    return _top_indices(rows, num_kept(fraction, rows.numel()))


def top_elements(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``num_kept(fraction, numel)`` largest entries of ``score``.

    Example:
        >>> top_elements(torch.tensor([[1.0, 4.0], [3.0, 2.0]]), 0.5)
        tensor([[False,  True],
                [ True, False]])
    """
    flat = score.detach().reshape(-1).cpu()
    return _index_mask(_top_indices(flat, num_kept(fraction, flat.numel())), score.shape)


def _index_mask(indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape.numel(), dtype=torch.bool)
    mask[indices] = True
    return mask.view(shape)


class SpartaSelector(MaskSelector):
    """SPARTA (Algorithm 1): per layer, the rows with the largest sum of private ``|g|`` scores."""

    name = "sparta"
    needs_scoring = True
    scoring = "abs_clipped"
    granularity = "row"

    @override
    def select_layer(
        self, weight: Tensor, score: Tensor | None, fraction: float, generator: Generator | None
    ) -> Tensor:
        assert score is not None  # checked by select()
        return top_rows(score, fraction)


class DPGradientSelector(MaskSelector):
    """DP-SGD gradients (Algorithm 2): top entries of ``|Σ noisy clipped gradient|``, no grouping."""

    name = "dp_gradient"
    needs_scoring = True
    scoring = "clipped"

    @override
    def select_layer(
        self, weight: Tensor, score: Tensor | None, fraction: float, generator: Generator | None
    ) -> Tensor:
        assert score is not None
        return top_elements(score.abs(), fraction)


class OracleSelector(MaskSelector):
    """Oracle mask (Algorithm 3): top entries of the true ``Σ_i |g_i|``. NOT differentially private."""

    name = "oracle"
    needs_scoring = True
    scoring = "true_abs"  # hence `private` is False

    @override
    def select_layer(
        self, weight: Tensor, score: Tensor | None, fraction: float, generator: Generator | None
    ) -> Tensor:
        assert score is not None
        return top_elements(score, fraction)


class MagnitudeSelector(MaskSelector):
    """MP (Algorithm 4, Luo et al.): top entries of ``|W_old|``; uses no private data."""

    name = "magnitude"

    @override
    def select_layer(
        self, weight: Tensor, score: Tensor | None, fraction: float, generator: Generator | None
    ) -> Tensor:
        return top_elements(weight.abs(), fraction)


class RandomSelector(MaskSelector):
    """A uniformly random element mask per layer (the paper's "Random-Groups" baseline); no data used."""

    name = "random"

    @override
    def select_layer(
        self, weight: Tensor, score: Tensor | None, fraction: float, generator: Generator | None
    ) -> Tensor:
        keep = torch.randperm(weight.numel(), generator=generator)[: num_kept(fraction, weight.numel())]
        return _index_mask(keep, weight.shape)


class FixedSelector(MaskSelector):
    """A fixed trainable set, chosen without data; :attr:`trainable` names it."""

    granularity = "fixed"
    trainable: ClassVar[Literal["all", "last", "bitfit", "layers"]]

    def dense_layers(self, names: list[str]) -> list[str]:
        """Which of the scored layers ``names`` (in module order) train their whole weight densely."""
        return list(names) if self.trainable == "all" else []

    @override
    def select(
        self,
        weights: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor] | None,
        fraction: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        return {}


class AllSelector(FixedSelector):
    """All: every scored weight trains densely (plus biases, normalisation layers and the head)."""

    name = "all"
    trainable = "all"


class LastSelector(FixedSelector):
    """Last: only the classifier head and the normalisation layers train (the paper's "Last")."""

    name = "last"
    trainable = "last"


class BitFitSelector(FixedSelector):
    """DP-BitFit: biases of the scored layers, normalisation layers and the head train."""

    name = "bitfit"
    trainable = "bitfit"


def block_of(layer: str) -> str:
    """The block a layer belongs to: its name up to the first numeric component, else the name itself.

    Example:
        >>> block_of("blocks.5.2.conv_pw"), block_of("layer4.1.conv2"), block_of("head.fc")
        ('blocks.5', 'layer4.1', 'head.fc')
    """
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


class LayersSelector(FixedSelector):
    """Layer selection (Cattan et al. 2022): chosen layers train densely, plus biases, norms and the head.

    Fine-tuning a few chosen layers of a pretrained model is the seeds' strong baseline for DP
    transfer learning. Choose the layers by name pattern or as the last ``last_blocks`` blocks of the
    model, a block being a layer's name up to its first numeric component (``blocks.11`` of a ViT,
    ``layer4.1`` of a ResNet, ``blocks.6`` of an EfficientNet); layers outside numbered containers are
    blocks of their own. It uses no private data.

    Args:
        layers: ``fnmatch`` patterns matched against scored layer names (``"blocks.11.*"``); a layer
            matching any pattern trains densely. ``None`` uses ``last_blocks``.
        last_blocks: train the scored layers of the last ``last_blocks`` blocks (in module order).

    Raises:
        ValueError: for a bad argument, or (at selection) for patterns that match no scored layer.

    Example:
        >>> LayersSelector(last_blocks=1).dense_layers(["blocks.0.fc1", "blocks.1.fc1", "blocks.1.fc2"])
        ['blocks.1.fc1', 'blocks.1.fc2']
        >>> LayersSelector(layers=["*.fc2"]).dense_layers(["blocks.0.fc2", "blocks.1.fc1"])
        ['blocks.0.fc2']
    """

    name = "layers"
    trainable = "layers"

    def __init__(self, layers: list[str] | tuple[str, ...] | None = None, last_blocks: int = 1) -> None:
        if layers is not None and (
            isinstance(layers, str) or not all(isinstance(p, str) and p for p in layers) or not layers
        ):
            raise ValueError(f"`layers` must be a non-empty list of name patterns or None, got {layers!r}.")
        if isinstance(last_blocks, bool) or not isinstance(last_blocks, int) or last_blocks < 1:
            raise ValueError(f"`last_blocks` must be a positive integer, got {last_blocks!r}.")
        self.layers = None if layers is None else tuple(layers)
        self.last_blocks = last_blocks

    @override
    def dense_layers(self, names: list[str]) -> list[str]:
        if self.layers is not None:
            chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.layers)]
            if not chosen:
                raise ValueError(f"`layers` patterns {list(self.layers)} match no scored layer; scored: {names[:8]}.")
            return chosen
        blocks = list(dict.fromkeys(block_of(n) for n in names))
        kept = set(blocks[-self.last_blocks :])
        return [n for n in names if block_of(n) in kept]

    def __repr__(self) -> str:
        what = f"layers={list(self.layers)}" if self.layers is not None else f"last_blocks={self.last_blocks}"
        return f"LayersSelector({what})"


_REGISTRY: dict[str, MaskSelector] = {}


def register_selector(name: str, selector: MaskSelector, force: bool = False) -> None:
    """Register ``selector`` under ``name`` for ``SpartaMaskCallback(selector=name)``.

    Args:
        name: the registry key.
        selector: a :class:`MaskSelector` instance.
        force: replace an existing registration instead of raising.

    Raises:
        ValueError: if ``name`` is taken (and ``force`` is False) or ``selector`` is not a MaskSelector.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if not isinstance(selector, MaskSelector):
        raise ValueError(f"`selector` must be a MaskSelector instance, got {type(selector).__name__}.")
    if name in _REGISTRY and not force:
        raise ValueError(f"A selector named {name!r} is already registered; pass `force=True` to replace it.")
    _REGISTRY[name] = selector


def registered_selectors() -> list[str]:
    """Names of the registered selectors, sorted."""
    return sorted(_REGISTRY)


def get_selector(name: str) -> MaskSelector:
    """The selector registered under ``name``.

    Raises:
        ValueError: if no selector has that name; the message lists the registered ones.

    Example:
        >>> get_selector("sparta").granularity
        'row'
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown `selector` {name!r}; registered selectors: {registered_selectors()}.")
    return _REGISTRY[name]


for _selector in (
    SpartaSelector(),
    DPGradientSelector(),
    OracleSelector(),
    MagnitudeSelector(),
    RandomSelector(),
    AllSelector(),
    LastSelector(),
    BitFitSelector(),
    LayersSelector(),
):
    register_selector(_selector.name, _selector)
del _selector
