"""SPARTA's schedule as a callback: warm-up, private mask selection at epoch ``T0``, sparse training.

The callback decides which parameters train in every phase (by toggling ``requires_grad``), asks
:class:`~lightning_sparta.DPStrategy` for the private scores of the scored weights during the
scoring epoch, turns them into a mask with a selector of :mod:`lightning_sparta.sparse.selectors`
and swaps the selected layers for row-stacked (or element-masked) sparse layers whose frozen part
can never change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from timm.layers import LayerScale, LayerScale2d
from torch import nn
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from lightning_sparta._logging import debug, get_logger, info, rank_zero_user_warn, shorten
from lightning_sparta.privacy.per_sample import functional_children
from lightning_sparta.privacy.validation import validate_model
from lightning_sparta.sparse import MaskedConv2d, MaskedLinear, RowSparseConv2d, RowSparseLinear, sparsify_
from lightning_sparta.sparse.layers import UnsupportedForwardError, check_dense
from lightning_sparta.sparse.selectors import FixedSelector, MaskSelector, get_selector
from lightning_sparta.strategy import DPStrategy

Phase = Literal["warmup", "scoring", "masked"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,  # includes timm's LayerNorm / LayerNorm2d subclasses
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._BatchNorm,  # BatchNorm*d, SyncBatchNorm, timm's BatchNormAct2d (frozen statistics)
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_SCORED_TYPES = (nn.Linear, nn.Conv2d)
# Modules whose parameters have a known role (scored, always trainable, or deliberately frozen by SPARTA
# like embeddings and timm's LayerScale). With `respect_frozen`, trainable parameters of any other module
# (e.g. a user's adapter) are "extra": they train densely in every phase, with a warning.
_KNOWN_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.modules.batchnorm._BatchNorm,
    *_NORM_TYPES,
    LayerScale,
    LayerScale2d,
    RowSparseLinear,
    RowSparseConv2d,
    MaskedLinear,
    MaskedConv2d,
)
_ROW_TYPES = {nn.Linear: RowSparseLinear, nn.Conv2d: RowSparseConv2d}
_SPARSE_TYPES = (RowSparseLinear, RowSparseConv2d, MaskedLinear, MaskedConv2d)
_log = get_logger("sparta_mask")
_MASK_FILE = "sparta_mask.pt"
_TABLE_FILE = "sparta_mask_table.txt"  # the full per-layer table, in the log directory
_IMAGE_SIDE = 384  # the longer side of a mask image, in pixels (aspect ratio kept)
_MIN_IMAGE_SIDE = 24  # the shorter side is at least this long


class SpartaMaskCallback(Callback):
    """Sparse private fine-tuning with SPARTA (Algorithm 1 of the paper) or one of its baselines.

    Roles are found from module types and the model's API, never from parameter names:

    * **scored** weights: the ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` (narrowed by
      ``layer_filter``), except those of the classifier head. A row is one output neuron (Linear) or
      one output filter (Conv2d, its weight read as ``[out, in·kH·kW]``).
    * **always trainable** (in every training phase): the biases of the scored layers, every parameter
      of normalisation layers (``nn.LayerNorm`` and subclasses such as timm's, ``nn.GroupNorm``,
      instance norms, ``nn.RMSNorm``) and every parameter of the head.
    * the **head**: ``head`` if given, else ``get_classifier()`` of the LightningModule or of its
      first submodule that has that method (timm models, the demo's ``GroupNormCNN``), else the last
      ``nn.Linear`` the LightningModule registers (torchvision's ``fc``, ``classifier[-1]``, ``heads.head``),
      named in an info message.
    * everything else of known module types (a ViT's ``cls_token``/``pos_embed`` owned by the model
      that has ``get_classifier()``, embeddings, timm's ``LayerScale``, Linear/Conv layers that are not
      scored) stays frozen.
    * with ``respect_frozen=True`` (the default), the trainable set the user chose is kept: every
      parameter with ``requires_grad=False`` when fitting first starts stays frozen in every phase
      (a layer whose weight is frozen is not scored; its bias, if left trainable, trains like the
      scored layers' biases), and trainable parameters of modules of other types (e.g. a LoRA-style
      adapter with its own ``nn.Parameter``) train densely in every phase, listed in a warning.

    Grouped and depthwise Conv2d layers are scored and made row-sparse like the others (a row is one
    filter, ``[C_in/groups·kH·kW]``), and so is timm's ``Conv2dSame`` (its 'same' padding is kept).
    Scored Conv2d subclasses with another ``forward`` of their own (timm's ``StdConv2d``, ...) stay
    dense and frozen, like layers that ``layer_filter`` rejects, with a warning that names them.

    Schedule (``T0 = mask_epoch``):

    1. epochs ``0 .. T0-1``: warm-up; ``warmup="bitfit"`` trains the always-trainable set (the paper's
       practice), ``"full"`` every parameter of the module.
    2. epoch ``T0``, for selectors that need data (``sparta``, ``dp_gradient``, ``oracle``): a scoring
       epoch without optimizer steps. The scored weights are made trainable together with the
       always-trainable set, so each sample's gradient is clipped over exactly the vector a DP-SGD
       step would clip; :meth:`DPStrategy.begin_scoring` then accumulates ``Σ_i |clip(g_i)| + N(0,
       σ²C²)`` per coordinate and batch, and accounts each batch as one DP-SGD step (Prop. 4.1-4.2:
       T epochs of SPARTA cost what T epochs of DP-SGD cost). At the end of the epoch the selector
       turns the sums into a mask. Data-free selectors (``magnitude``, ``random``) and fixed sets
       (``all``, ``last``, ``bitfit``) spend no scoring epoch: their mask applies from epoch ``T0``
       on, which is an ordinary training epoch (``mask_epoch=0`` trains sparse from the start, as
       the paper's MP does).
    3. the rest: the selected rows (``weight_rows`` of :class:`~lightning_sparta.sparse.RowSparseLinear`
       / ``RowSparseConv2d``) or entries (``weight_values`` of ``MaskedLinear``/``MaskedConv2d``) train
       together with the always-trainable set; the unselected part of every scored weight is a
       frozen buffer and keeps its value bit for bit.

    Fixed sets train, from ``T0`` on: ``all`` the scored weights densely plus the always-trainable
    set; ``last`` the head and the normalisation layers (the paper's "Last"); ``bitfit`` the
    always-trainable set (DP-BitFit).

    The optimizer returned by ``configure_optimizers`` must hold every parameter that may train
    (passing ``self.parameters()`` is enough: torch optimizers skip parameters without gradient).
    At the swap the new sparse parameter takes the place of the dense weight in its param group
    (same hyper-parameters) and the dense weight's optimizer state is dropped; every other parameter
    keeps its state, and LR schedulers go on unchanged. The callback owns ``requires_grad`` of every
    parameter of the LightningModule during fitting. After fitting the module holds the sparse
    layers; its ``state_dict`` holds dense ``weight``/``bias`` keys and loads into the dense model,
    and :func:`~lightning_sparta.sparse.densify_` turns it back into a dense model.

    The mask is saved with ``torch.save`` as ``sparta_mask.pt`` in ``trainer.log_dir`` (and in the
    checkpoint directory when a ``ModelCheckpoint`` has one) and logged: ``sparta/kept_fraction/<layer>``
    scalars, and with a TensorBoard logger a histogram of the (row) scores and an image of the mask
    per layer. It is also part of the callback's checkpoint state, so ``trainer.fit(ckpt_path=...)``
    rebuilds the sparse layers before the optimizer state is restored.

    Args:
        mask_epoch: ``T0``, the epoch at which the mask is chosen (scored, for data-driven selectors).
        trainable_fraction: fraction of the rows (row selectors) or entries (element selectors) of
            every scored layer that trains; each layer keeps ``ceil(fraction · groups)``, at least one.
        selector: a registered selector name, built in: ``sparta``, ``dp_gradient``, ``oracle``,
            ``magnitude``, ``random``, ``all``, ``last``, ``bitfit``, ``layers`` (the last block densely; see
            :func:`~lightning_sparta.sparse.selectors.get_selector`), or a
            :class:`~lightning_sparta.sparse.selectors.MaskSelector` instance such as
            ``LayersSelector(layers=["blocks.6.*"])``.
        warmup: what trains before ``T0``: ``"bitfit"`` or ``"full"``.
        layer_filter: ``(module, name) -> bool``; only Linear/Conv2d layers for which it returns True
            are scored (the others, and their biases, stay frozen).
        head: the classifier head (module or qualified name); found with ``get_classifier()`` (else the
            last Linear layer) when ``None``.
        allow_non_private: opt in to selectors whose mask is not differentially private (``oracle``).
            The run's ε is then reported as ``inf``.
        save_mask: save the mask to ``sparta_mask.pt``.
        seed: seed of randomised selectors (``random``); rank 0's ``torch.initial_seed()`` if None.
        respect_frozen: keep the user's trainable set (see above); ``False`` lets the callback decide
            ``requires_grad`` of every parameter, unfreezing what its phases train and freezing
            parameters of unknown modules.
        train_while_scoring: train the always-trainable set (biases, norms, head) during the scoring
            epochs from the same private release that gives the scores, so no epoch is spent without
            updates, at no extra privacy cost: each sample's gradient is clipped over the whole
            scoring-time trainable set, the released vector (|clipped g| on the scored weights, the
            signed clipped sum on the rest) has sensitivity ``C`` and gets one Gaussian noise vector,
            which is exactly the mechanism a DP-SGD step is accounted as; the optimizer step on the
            rest is post-processing (see :meth:`DPStrategy.begin_scoring`). Beyond the paper; off by
            default. Needs a private scoring selector.
        scoring_epochs: accumulate the scores over this many epochs ending at ``mask_epoch`` (epochs
            ``mask_epoch - scoring_epochs + 1 .. mask_epoch``), each releasing its score increments
            with its own noise and accounted like DP-SGD epochs. ``mask_epoch + 1`` scores over the
            whole warm-up; combine with ``train_while_scoring=True`` so those epochs still train.

    Raises:
        ValueError: for a bad argument (the message names it); at ``setup`` for a ``mask_epoch`` not
            below ``max_epochs`` or a BatchNorm model that the strategy refuses; when fitting starts
            for a model without scorable layer, without head, or with scored layers the sparse layers
            cannot replace.
        TypeError: at ``setup`` if a selector that scores private data runs without :class:`DPStrategy`.

    Example:
        >>> callback = SpartaMaskCallback(mask_epoch=2, trainable_fraction=0.1)
        >>> callback.selector.name, callback.phase, callback.mask
        ('sparta', None, None)
    """

    def __init__(
        self,
        mask_epoch: int = 10,
        trainable_fraction: float = 0.2,
        selector: str | MaskSelector = "sparta",
        warmup: Literal["bitfit", "full"] = "bitfit",
        layer_filter: Callable[[nn.Module, str], bool] | None = None,
        head: nn.Module | str | None = None,
        allow_non_private: bool = False,
        save_mask: bool = True,
        seed: int | None = None,
        respect_frozen: bool = True,
        train_while_scoring: bool = False,
        scoring_epochs: int = 1,
    ) -> None:
        if not isinstance(mask_epoch, int) or isinstance(mask_epoch, bool) or mask_epoch < 0:
            raise ValueError(f"`mask_epoch` must be an integer >= 0, got {mask_epoch!r}.")
        if (
            not isinstance(trainable_fraction, (int, float))
            or isinstance(trainable_fraction, bool)
            or not 0.0 < trainable_fraction <= 1.0
        ):
            raise ValueError(f"`trainable_fraction` must be a number in (0, 1], got {trainable_fraction!r}.")
        if isinstance(selector, str):
            selector = get_selector(selector)
        elif not isinstance(selector, MaskSelector):
            raise ValueError(
                f"`selector` must be a registered selector name or a MaskSelector, got {type(selector).__name__}."
            )
        if warmup not in ("bitfit", "full"):
            raise ValueError(f"`warmup` must be 'bitfit' or 'full', got {warmup!r}.")
        if layer_filter is not None and not callable(layer_filter):
            raise ValueError(f"`layer_filter` must be a callable (module, name) -> bool or None, got {layer_filter!r}.")
        if head is not None and not isinstance(head, (nn.Module, str)):
            raise ValueError(f"`head` must be an nn.Module, a qualified module name or None, got {head!r}.")
        if not selector.private and not allow_non_private:  # `private` is derived from `selector.scoring`
            raise ValueError(
                f"The {selector.name!r} selector (scoring={selector.scoring!r}) chooses the mask from non-private "
                "(unclipped, noiseless) gradients, so the run is NOT differentially private. Pass "
                "`allow_non_private=True` to run it anyway (for ablations only)."
            )
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative integer or None, got {seed!r}.")
        if not isinstance(respect_frozen, bool):
            raise ValueError(f"`respect_frozen` must be a bool, got {respect_frozen!r}.")
        if not isinstance(train_while_scoring, bool):
            raise ValueError(f"`train_while_scoring` must be a bool, got {train_while_scoring!r}.")
        if train_while_scoring and not (selector.needs_scoring and selector.private):
            raise ValueError(
                f"`train_while_scoring=True` needs a selector with a private scoring epoch, got {selector.name!r}."
            )
        if isinstance(scoring_epochs, bool) or not isinstance(scoring_epochs, int) or scoring_epochs < 1:
            raise ValueError(f"`scoring_epochs` must be a positive integer, got {scoring_epochs!r}.")
        if scoring_epochs > 1 and not selector.needs_scoring:
            raise ValueError(f"`scoring_epochs={scoring_epochs}` needs a scoring selector, got {selector.name!r}.")
        if scoring_epochs > mask_epoch + 1:
            raise ValueError(
                f"`scoring_epochs={scoring_epochs}` needs `mask_epoch >= {scoring_epochs - 1}` (scoring ends at "
                f"mask_epoch={mask_epoch} and cannot start before epoch 0)."
            )
        self.mask_epoch = mask_epoch
        self.trainable_fraction = float(trainable_fraction)
        self.selector: MaskSelector = selector
        self.warmup = warmup
        self.layer_filter = layer_filter
        self.head = head
        self.allow_non_private = allow_non_private
        self.save_mask = save_mask
        self.seed = seed
        self.respect_frozen = respect_frozen
        self.train_while_scoring = train_while_scoring
        self.scoring_epochs = scoring_epochs

        #: The selection after ``T0``: layer name -> sorted row indices or bool element mask (empty
        #: for fixed sets); ``None`` before.
        self.mask: dict[str, torch.Tensor] | None = None
        #: The scoring epoch's sums by layer name, as returned by ``DPStrategy.end_scoring()``: CPU
        #: copies as large as the scored weights; ``None`` without a scoring epoch in this fit.
        self.scores: dict[str, torch.Tensor] | None = None
        self._phase: Phase | None = None
        self._seed: int | None = seed
        self._partial_scores: dict[str, torch.Tensor] | None = None  # scoring sums saved mid-epoch
        self._scoring_active = False
        self._strategy: pl.strategies.Strategy | None = None
        # Resolved when fitting starts (module roles by identity).
        self._head_ids: set[int] = set()
        self._scored: dict[str, nn.Module] = {}
        self._always: dict[str, nn.Parameter] = {}
        self._swapped: set[str] = set()
        # The user's choice (respect_frozen): names of the parameters frozen when fitting first started,
        # and, per fit, those parameters and the extra (unknown-module) parameters by identity.
        self._user_frozen: set[str] | None = None
        self._frozen_ids: set[int] = set()
        self._extra: dict[str, nn.Parameter] = {}
        self._skipped = False  # Trainer(fast_dev_run=...): the schedule does not run

    # ------------------------------------------------------------------------------------ info
    @property
    def phase(self) -> Phase | None:
        """``"warmup"``, ``"scoring"`` or ``"masked"`` (mask chosen); ``None`` before fitting."""
        return self._phase

    @property
    def scored_layers(self) -> list[str]:
        """Qualified names of the scored Linear/Conv2d layers (known once fitting has started)."""
        return list(self._scored)

    @property
    def extra_parameters(self) -> list[str]:
        """Parameters of unknown modules that train densely in every phase (``respect_frozen``)."""
        return list(self._extra)

    # ------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._skipped = bool(trainer.fast_dev_run)
        if self._skipped:  # one batch to check the code runs: no schedule fits in it
            info(
                _log,
                f"SpartaMaskCallback: Trainer(fast_dev_run={trainer.fast_dev_run!r}) runs "
                f"{'one batch' if trainer.fast_dev_run is True else f'{trainer.fast_dev_run} batches'}; the SPARTA "
                "schedule (warm-up, scoring, mask) is skipped and the module trains with its own trainable set.",
            )
            return
        strategy = trainer.strategy
        self._strategy = strategy
        if self.selector.needs_scoring and not isinstance(strategy, DPStrategy):
            raise TypeError(
                f"The {self.selector.name!r} selector scores the private data during epoch `mask_epoch`, which "
                f"needs `Trainer(strategy=DPStrategy(...))`, found {type(strategy).__name__}."
            )
        if not isinstance(strategy, DPStrategy) and trainer.world_size > 1:
            raise TypeError(
                "SpartaMaskCallback swaps layers during training, which a multi-process strategy other than "
                f"DPStrategy does not support; found {type(strategy).__name__} with {trainer.world_size} processes."
            )
        max_epochs = trainer.max_epochs
        if self._phase not in (None, "warmup"):  # another fit after the mask was chosen
            max_epochs = None
        if max_epochs is not None and max_epochs >= 0 and self.mask_epoch >= max_epochs:
            raise ValueError(
                f"`mask_epoch` must be below `Trainer(max_epochs=...)`: mask_epoch={self.mask_epoch}, "
                f"max_epochs={max_epochs}."
            )
        if (
            self.selector.needs_scoring
            and max_epochs is not None
            and max_epochs >= 0
            and self.mask_epoch == max_epochs - 1
        ):
            rank_zero_user_warn(
                f"mask_epoch={self.mask_epoch} is the last epoch (max_epochs={max_epochs}): the mask is scored "
                "but never trained."
            )
        validate_model(pl_module, batchnorm=getattr(strategy, "batchnorm", "refuse"))  # DPStrategy freezes BN
        if self._seed is None:  # torch's seed (set by seed_everything) without consuming its random stream
            self._seed = int(strategy.broadcast(torch.initial_seed() % 2**62))
        # A second fit of the same module: start from the dense model, as the optimizer will.
        for name in sorted(self._swapped):
            module = _get(pl_module, name)
            if isinstance(module, (RowSparseLinear, RowSparseConv2d, MaskedLinear, MaskedConv2d)):
                _replace(pl_module, name, module.to_dense())
        self._swapped.clear()
        foreign = [n for n, m in pl_module.named_modules() if isinstance(m, _SPARSE_TYPES)]
        if foreign:
            raise ValueError(
                f"SpartaMaskCallback: the LightningModule already holds {len(foreign)} sparse layer(s) from an earlier "
                f"SPARTA fit ({shorten(foreign)}), whose mask this callback does not have, so it cannot score or "
                "select them again. To keep training the selected rows, pass the earlier fit's SpartaMaskCallback "
                "again (it keeps its mask) or resume with `trainer.fit(..., ckpt_path=...)`, or fit without "
                "SpartaMaskCallback (the rows stay trainable, the rest frozen). To choose a new mask from the "
                "fine-tuned weights, make the model dense first: `lightning_sparta.sparse.densify_(module)`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after `configure_optimizers` and after this callback's state was loaded from a
        # checkpoint, but before the optimizer state is restored: the swap is re-applied here, exactly
        # as in the original run, so the optimizer's param groups match the saved optimizer state.
        if self._skipped:
            return
        self._resolve_roles(pl_module)
        if self._phase is None:
            self._phase = "warmup"
            needed = dict(self._warmup_set(pl_module))
            if not (isinstance(self.selector, FixedSelector) and self.selector.trainable in ("last", "bitfit")):
                needed.update({f"{n}.weight": m.weight for n, m in self._scored.items()})
            self._check_optimizer(trainer, self._respecting(needed))
        if self._phase == "warmup":
            self._apply(pl_module, self._warmup_set(pl_module))
        elif self._phase == "scoring":
            self._begin_scoring(trainer, pl_module, initial=self._partial_scores)
        else:
            if self.mask:
                self._swap(trainer, pl_module, self.mask)
            self._apply(pl_module, self._final_set(pl_module))
        self._partial_scores = None

    # ------------------------------------------------------------------------------------ schedule
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skipped:
            self._advance(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning skips `on_train_epoch_start` of the epoch that follows a checkpoint written at the
        # last batch of an epoch; checking before every batch keeps the schedule right after such a resume.
        if not self._skipped:
            self._advance(trainer, pl_module)

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move to the phase of the current epoch (does nothing when already there)."""
        epoch = trainer.current_epoch
        if self._phase == "scoring" and epoch > self.mask_epoch:  # resumed from a checkpoint written
            self._finish_scoring(trainer, pl_module)  # after the scoring epoch's last batch
        first_scoring = self.mask_epoch - self.scoring_epochs + 1 if self.selector.needs_scoring else self.mask_epoch
        if self._phase != "warmup" or epoch < first_scoring:
            return
        if self.selector.needs_scoring:
            self._begin_scoring(trainer, pl_module)
            return
        weights = {name: module.weight.detach() for name, module in self._scored.items()}
        mask = self.selector.select(weights, None, self.trainable_fraction, self._generator())
        self._finish(trainer, pl_module, mask, scores=None)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skipped and self._phase == "scoring" and trainer.current_epoch >= self.mask_epoch:
            self._finish_scoring(trainer, pl_module)

    def _begin_scoring(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, initial: dict[str, torch.Tensor] | None = None
    ) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, DPStrategy)
        self._phase = "scoring"
        scored = {name: module.weight for name, module in self._scored.items()}
        self._apply(pl_module, {**self._always, **{f"{n}.weight": p for n, p in scored.items()}})
        # One value decides both the mechanism (clip + noise) and what is reported (ε finite or inf).
        private = self.selector.private
        if not private:
            reason = f"the {self.selector.name!r} mask is selected from non-private (unclipped, noiseless) gradients"
            strategy.mark_not_private(reason)
            rank_zero_user_warn(f"SpartaMaskCallback: {reason}; this run is NOT differentially private (ε = inf).")
        strategy.begin_scoring(
            scored,
            absolute=self.selector.scoring != "clipped",
            private=private,
            initial=initial,
            train=self.train_while_scoring,
        )
        self._scoring_active = True
        if not self.train_while_scoring:
            # The scoring epoch takes no optimizer step but counts in the LR schedule (by design: the paper's
            # T epochs include it). torch checks the first `lr_scheduler.step()` for an earlier optimizer
            # step and would warn "Detected call of `lr_scheduler.step()` before `optimizer.step()`" when the
            # scoring epoch comes first (mask_epoch=0): record that the schedule may advance.
            for optimizer in trainer.optimizers:
                optimizer._opt_called = True  # type: ignore[attr-defined]

    def _finish_scoring(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, DPStrategy)
        scores = {name: s.detach().cpu() for name, s in strategy.end_scoring().items()}
        self._scoring_active = False
        self.scores = scores
        weights = {name: module.weight.detach() for name, module in self._scored.items()}
        mask = self.selector.select(weights, scores, self.trainable_fraction, self._generator())
        self._finish(trainer, pl_module, mask, scores)

    def _finish(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        mask: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor] | None,
    ) -> None:
        self.mask = {name: m.detach().cpu() for name, m in mask.items()}
        if self.mask:
            self._swap(trainer, pl_module, self.mask)
        self._phase = "masked"
        self._apply(pl_module, self._final_set(pl_module))
        self._report(trainer, pl_module, scores)

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(self._seed if self._seed is not None else 0)
        return generator

    # ------------------------------------------------------------------------------------ roles
    def _resolve_roles(self, pl_module: pl.LightningModule) -> None:
        names = {id(m): n for n, m in pl_module.named_modules()}
        head = self._find_head(pl_module, names)
        head_ids = self._head_ids = {id(m) for m in head.modules()}
        parameters = list(pl_module.named_parameters(remove_duplicate=False))
        if self.respect_frozen and self._user_frozen is None:  # the user's choice, when fitting first starts
            self._user_frozen = {n for n, p in parameters if not p.requires_grad}
        frozen = self._frozen_ids = {id(p) for n, p in parameters if n in (self._user_frozen or ())}

        self._scored = {}
        frozen_weight_biases: dict[str, nn.Parameter] = {}
        for name, module in pl_module.named_modules():
            if id(module) in head_ids or not isinstance(module, _SCORED_TYPES):
                continue
            if self.layer_filter is not None and not self.layer_filter(module, name):
                continue
            if id(module.weight) in frozen:  # the user froze this weight: never scored, never trained
                if module.bias is not None:
                    frozen_weight_biases[f"{name}.bias"] = module.bias
                continue
            self._scored[name] = module
        if self.selector.granularity != "fixed":
            self._drop_unsupported_forward(pl_module)
        if not self._scored:
            raise ValueError(
                "SpartaMaskCallback found no layer to score: it scores the weights of nn.Linear and nn.Conv2d "
                "layers outside the classifier head"
                + (" that `layer_filter` accepts" if self.layer_filter is not None else "")
                + (" and whose weight is trainable (respect_frozen=True)" if frozen else "")
                + " (Conv2d subclasses with their own forward are not scored)."
            )
        if self.selector.granularity != "fixed":
            self._check_swappable(pl_module)

        always: dict[str, nn.Parameter] = {}
        for name, module in self._scored.items():
            if module.bias is not None:
                always[f"{name}.bias"] = module.bias
        always.update(frozen_weight_biases)  # dropped below if the user froze them too
        for name, module in pl_module.named_modules():
            if isinstance(module, _NORM_TYPES) or id(module) in head_ids:
                for pname, p in module.named_parameters(prefix=name, recurse=False):
                    always[pname] = p
        self._always = _unique({n: p for n, p in always.items() if id(p) not in frozen})
        self._extra = self._find_extra(pl_module, head) if self.respect_frozen else {}

    def _find_extra(self, pl_module: pl.LightningModule, head: nn.Module) -> dict[str, nn.Parameter]:
        """Trainable parameters of modules of no known type (e.g. a user's adapter); warn about them."""
        roots = {id(m) for m in pl_module.modules() if callable(getattr(m, "get_classifier", None))}
        head_ids = {id(m) for m in head.modules()}
        extra: dict[str, nn.Parameter] = {}
        for name, module in pl_module.named_modules():
            # A backbone's own parameters (ViT's cls_token/pos_embed) are deliberately frozen, as before.
            if isinstance(module, _KNOWN_TYPES) or id(module) in roots or id(module) in head_ids:
                continue
            for pname, p in module.named_parameters(prefix=name, recurse=False):
                if id(p) not in self._frozen_ids:
                    extra[pname] = p
        extra = _unique(extra)
        if extra:
            rank_zero_user_warn(
                f"SpartaMaskCallback: {len(extra)} trainable parameter(s) of modules it does not recognise train "
                f"densely in every phase: {shorten(list(extra))}. Freeze them (`requires_grad_(False)`) before `fit` "
                "to keep them fixed."
            )
        return extra

    def _respecting(self, trainable: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """A phase's set with the user's choice applied: plus the extra parameters, minus the user's frozen ones."""
        merged = _unique({**trainable, **self._extra})
        return {name: p for name, p in merged.items() if id(p) not in self._frozen_ids}

    def _find_head(self, pl_module: pl.LightningModule, names: dict[int, str]) -> nn.Module:
        if isinstance(self.head, str):
            try:
                return pl_module.get_submodule(self.head)
            except AttributeError:
                raise ValueError(f"`head`={self.head!r} is not a submodule of the LightningModule.") from None
        if isinstance(self.head, nn.Module):
            if id(self.head) not in names:
                raise ValueError(f"`head` ({type(self.head).__name__}) is not a submodule of the LightningModule.")
            return self.head
        for module in pl_module.modules():
            get_classifier = getattr(module, "get_classifier", None)
            if callable(get_classifier):
                head = get_classifier()
                if not isinstance(head, nn.Module) or id(head) not in names:
                    raise ValueError(
                        f"{type(module).__name__}.get_classifier() returned {type(head).__name__}, not a submodule "
                        "of the LightningModule: pass the classifier head with `head=`."
                    )
                return head
        # torchvision's classifiers (`fc`, `classifier[-1]`, `heads.head`, `head`) have no `get_classifier()`;
        # each is the last Linear layer its model registers
        last = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, nn.Linear)][-1:]
        if last:
            name, head = last[0]
            info(
                _log,
                f"SpartaMaskCallback: no `get_classifier()` in the model; the classifier head is `{name}`, its last "
                "Linear layer (pass `head=` to choose another).",
            )
            return head
        raise ValueError(
            "SpartaMaskCallback could not find the classifier head: neither the LightningModule nor a submodule "
            "has `get_classifier()`, and it has no Linear layer. Pass it with `SpartaMaskCallback(head=...)` (a "
            "module or its qualified name)."
        )

    def _drop_unsupported_forward(self, pl_module: pl.LightningModule) -> None:
        """Leave dense (unscored, frozen) the scored layers a sparse layer cannot stand in for.

        Convs whose own forward the sparse layers do not reproduce, and layers whose parent reads their
        weight instead of calling them (``nn.MultiheadAttention.out_proj``, torchvision Swin's ``qkv`` and
        ``proj``): a sparse layer's merged weight carries no gradient to its rows.
        """
        dropped, functional = [], []
        for name, module in list(self._scored.items()):
            parent_name, _, child = name.rpartition(".")
            if child in functional_children(_get(pl_module, parent_name)):
                functional.append(name)
                del self._scored[name]
                continue
            try:
                check_dense(module, nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d)
            except UnsupportedForwardError:
                dropped.append(f"{name} ({type(module).__name__})")
                del self._scored[name]
        if dropped:
            rank_zero_user_warn(
                f"SpartaMaskCallback: {len(dropped)} layer(s) override forward with a function the sparse layers do "
                f"not reproduce; they stay dense, frozen and unscored: {shorten(dropped)}."
            )
        if functional:
            rank_zero_user_warn(
                f"SpartaMaskCallback: {len(functional)} layer(s) are not called by their parent, which passes their "
                "weights to a function (nn.MultiheadAttention, torchvision's Swin attention), so a sparse layer "
                f"cannot stand in for them; they stay dense, frozen and unscored: {shorten(functional)}."
            )

    def _check_swappable(self, pl_module: pl.LightningModule) -> None:
        """Refuse scored layers that the sparse layers cannot replace, before anything changes."""
        for name, module in self._scored.items():
            try:  # the sparse layer's own validation: padding mode, 'same' padding
                _ROW_TYPES[nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d].from_dense(
                    module, torch.zeros(1, dtype=torch.long, device=module.weight.device)
                )
                continue
            except ValueError as err:
                problem = str(err)
            raise ValueError(
                f"Scored layer {name!r} ({type(module).__name__}) cannot be replaced by a sparse layer: {problem}. "
                "Exclude it with `SpartaMaskCallback(layer_filter=lambda module, name: ...)`."
            )

    def _warmup_set(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        if self.warmup == "full":
            return self._respecting(_unique(dict(pl_module.named_parameters())))
        return self._respecting(self._always)

    def _final_set(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        if isinstance(self.selector, FixedSelector):
            if self.selector.trainable in ("all", "layers"):
                dense = self.selector.dense_layers(list(self._scored))
                return {**self._always, **{f"{n}.weight": self._scored[n].weight for n in dense}}
            if self.selector.trainable == "last":
                return _unique(
                    {
                        pname: p
                        for name, module in pl_module.named_modules()
                        if isinstance(module, _NORM_TYPES) or id(module) in self._head_ids
                        for pname, p in module.named_parameters(prefix=name, recurse=False)
                    }
                )
            return self._always
        selected = {}
        for name in self._scored:
            module = _get(pl_module, name)
            if isinstance(module, (RowSparseLinear, RowSparseConv2d)):
                selected[f"{name}.weight_rows"] = module.weight_rows
            elif isinstance(module, (MaskedLinear, MaskedConv2d)):
                selected[f"{name}.weight_values"] = module.weight_values
        return {**self._always, **selected}

    # ------------------------------------------------------------------------------------ apply
    def _apply(self, pl_module: pl.LightningModule, trainable: dict[str, nn.Parameter]) -> None:
        keep = {id(p) for p in self._respecting(trainable).values()}
        for p in pl_module.parameters():
            p.requires_grad_(id(p) in keep)
            if id(p) not in keep:
                p.grad = None  # a stale gradient would let a torch optimizer move a frozen parameter

    @staticmethod
    def _check_optimizer(trainer: pl.Trainer, needed: dict[str, nn.Parameter]) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            return
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for name, p in needed.items() if id(p) not in held]
        if missing:
            raise ValueError(
                f"The optimizer from `configure_optimizers` does not hold parameters that SpartaMaskCallback "
                f"trains: {shorten(missing)}. Give it every parameter (e.g. `self.parameters()`); parameters without a "
                "gradient are not updated."
            )

    def _swap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, mask: dict[str, torch.Tensor]) -> None:
        """Replace the masked layers by sparse layers and their dense weight by the new parameter in the optimizer."""
        old = {name: _get(pl_module, name).weight for name in mask}
        places: dict[str, tuple[torch.optim.Optimizer, dict[str, Any], int]] = {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for i, p in enumerate(group["params"]):
                    for name, weight in old.items():
                        if p is weight:
                            places[name] = (optimizer, group, i)
        if trainer.optimizers:
            missing = [f"{name}.weight" for name in old if name not in places]
            if missing:
                raise ValueError(
                    "The optimizer from `configure_optimizers` does not hold the weights to sparsify: "
                    f"{shorten(missing)}. Give it every parameter of the module (e.g. `self.parameters()`)."
                )
        new_modules = sparsify_(pl_module, mask)
        for copy in _averaged_copies(trainer):
            for name in mask:  # a copy taken after an earlier swap (a second fit) holds sparse layers
                layer = _get(copy, name)
                if isinstance(layer, _SPARSE_TYPES):
                    _replace(copy, name, layer.to_dense())
            sparsify_(copy, mask)
        self._swapped.update(new_modules)
        self._scored.update(new_modules)  # drop the references to the dense layers (and their weights)
        for name, module in new_modules.items():
            attr = "weight_rows" if isinstance(module, (RowSparseLinear, RowSparseConv2d)) else "weight_values"
            if name not in places:
                continue
            optimizer, group, i = places[name]
            group["params"][i] = getattr(module, attr)
            if "param_names" in group:
                group["param_names"][i] = f"{name}.{attr}"
            optimizer.state.pop(old[name], None)

    # ------------------------------------------------------------------------------------ report
    def _kept_fractions(self) -> dict[str, float]:
        result = {}
        fixed = isinstance(self.selector, FixedSelector)
        dense = set(self.selector.dense_layers(list(self._scored))) if fixed else set()
        for name, module in self._scored.items():
            weight = module.weight
            selection = (self.mask or {}).get(name)
            if selection is None:
                result[name] = 1.0 if name in dense else 0.0
            elif selection.dtype == torch.bool:
                result[name] = selection.sum().item() / selection.numel()
            else:
                result[name] = selection.numel() / weight.shape[0]
        return result

    def _report(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: dict[str, torch.Tensor] | None
    ) -> None:
        fractions = self._kept_fractions()
        # trainer.log_dir is a collective: every rank calls it, rank 0 writes.
        log_dir = trainer.log_dir if self.save_mask else None
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        metrics = {f"sparta/kept_fraction/{name}": value for name, value in fractions.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                self._log_tensorboard(logger, pl_module, scores, step)
        table = self.mask_table()
        where = " (full table: set the `lightning_sparta` logger to DEBUG)"
        if trainer.loggers and log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, _TABLE_FILE)
            with open(path, "w", encoding="utf-8") as file:
                file.write(table + "\n")
            where = f" (full table: {path})"
        info(
            _log,
            f"SpartaMaskCallback: {self.selector.name!r} mask at epoch {trainer.current_epoch}{where}: "
            + self.mask_summary(),
        )
        debug(_log, f"SpartaMaskCallback: {self.selector.name!r} mask, every layer:\n{table}")
        if self.save_mask:
            self._save(trainer, log_dir)

    def mask_table(self) -> str:
        """One row per scored layer: name, type, weight shape, selection kind and the fraction that trains."""
        fractions = self._kept_fractions()
        rows = [("layer", "type", "weight", "selection", "kept")]
        for name, module in self._scored.items():
            shape = "x".join(str(s) for s in module.weight.shape)
            selection = (self.mask or {}).get(name)
            kind = "-" if selection is None else ("element" if selection.dtype == torch.bool else "rows")
            rows.append((name, type(module).__name__, shape, kind, f"{fractions[name]:.1%}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def mask_summary(self) -> str:
        """A few lines: how many layers and weights train, by layer type and, weighted by size, per block."""
        fractions = self._kept_fractions()
        total = kept = 0
        by_type: dict[str, int] = {}
        blocks: dict[str, list[float]] = {}
        for name, module in self._scored.items():
            size = module.weight.numel()
            total += size
            kept += fractions[name] * size
            kind = type(module).__name__.removeprefix("RowSparse").removeprefix("Masked")  # the dense type
            by_type[kind] = by_type.get(kind, 0) + 1
            block = blocks.setdefault(_block_of(name), [0.0, 0.0])
            block[0] += fractions[name] * size
            block[1] += size
        types = ", ".join(f"{kind} {count}" for kind, count in sorted(by_type.items(), key=lambda kv: -kv[1]))
        lines = [
            f"{len(self._scored)} scored layers ({types}); {kept / max(total, 1):.1%} of their weights train "
            f"({round(kept):,} of {total:,})"
        ]
        split = [block.split(".") for block in blocks]
        common = 0  # dotted components every block name starts with (e.g. "model"), shown once
        while all(len(parts) > common + 1 and parts[common] == split[0][common] for parts in split):
            common += 1
        prefix = ".".join(split[0][:common]) if split else ""
        cut = len(prefix) + 1 if prefix and len(blocks) > 1 else 0
        per_block = [f"{block[cut:] or block} {k / max(n, 1):.0%}" for block, (k, n) in blocks.items()]
        if len(per_block) > 1:
            shown = per_block if len(per_block) <= 16 else [*per_block[:12], f"... {len(per_block) - 12} more"]
            lines.append(f"  kept per block{f' of {prefix}' if cut else ''}: " + ", ".join(shown))
        return "\n".join(lines)

    def _log_tensorboard(
        self,
        logger: TensorBoardLogger,
        pl_module: pl.LightningModule,
        scores: dict[str, torch.Tensor] | None,
        step: int,
    ) -> None:
        experiment = logger.experiment
        for name, module in self._scored.items():
            selection = (self.mask or {}).get(name)
            if selection is None:
                continue
            out = module.weight.shape[0]
            values = None
            if scores is not None:
                values = scores[name].reshape(out, -1)
                values = values.sum(1) if selection.dtype != torch.bool else values.reshape(-1)
            elif self.selector.name == "magnitude":
                values = module.weight.detach().abs().reshape(-1)
            if values is not None:
                experiment.add_histogram(f"sparta/scores/{name}", values.float().cpu(), step)
            if selection.dtype == torch.bool:
                grid = selection.reshape(out, -1).float()
            else:  # the weight read as [out, rest]: a selected row is a full white line
                grid = torch.zeros(out, module.weight[0].numel())
                grid[selection] = 1.0
            experiment.add_image(f"sparta/mask/{name}", _mask_image(grid), step, dataformats="HW")
        figure = self._fraction_figure()
        if figure is not None:
            experiment.add_figure("sparta/kept_fraction", figure, step, close=True)

    def _fraction_figure(self) -> Any:
        """A horizontal bar chart of the fraction of each scored layer's weights that trains (``None`` if empty)."""
        fractions = self._kept_fractions()
        if not fractions:
            return None
        from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

        names = list(fractions)
        height = min(0.22 * len(names) + 1.2, 40.0)
        figure = Figure(figsize=(7.0, height), dpi=100)
        axes = figure.subplots()
        positions = range(len(names))
        axes.barh(positions, [fractions[n] for n in names], color="#3a7bd5", height=0.8)
        axes.set_yticks(list(positions), names, fontsize=7 if len(names) > 30 else 9)
        axes.invert_yaxis()  # the first layer on top, in model order
        axes.set_xlim(0.0, 1.0)
        axes.set_xlabel("fraction of the weight that trains")
        axes.axvline(self.trainable_fraction, color="#d62728", linestyle="--", linewidth=1)
        axes.set_title(f"{self.selector.name!r} mask: trainable_fraction = {self.trainable_fraction:g}", fontsize=10)
        axes.grid(axis="x", alpha=0.3)
        figure.tight_layout()
        return figure

    def _save(self, trainer: pl.Trainer, log_dir: str | None) -> None:
        payload = {
            "mask": self.mask,
            "selector": self.selector.name,
            "trainable_fraction": self.trainable_fraction,
            "mask_epoch": self.mask_epoch,
            "private": self.selector.private,
        }
        directories = [log_dir or trainer.default_root_dir]
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        if dirpath:
            directories.append(str(dirpath))
        for directory in dict.fromkeys(os.fspath(d) for d in directories):
            os.makedirs(directory, exist_ok=True)
            torch.save(payload, os.path.join(directory, _MASK_FILE))

    # ------------------------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        partial = None
        if self._phase == "scoring" and isinstance(self._strategy, DPStrategy):
            partial = {name: s.detach().cpu() for name, s in self._strategy.scoring_sums.items()}
        return {
            "phase": self._phase,
            "selector": self.selector.name,
            "trainable_fraction": self.trainable_fraction,
            "mask_epoch": self.mask_epoch,
            "seed": self._seed,
            "mask": None if self.mask is None else {name: m.cpu() for name, m in self.mask.items()},
            "scoring_sums": partial,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("selector") != self.selector.name:
            raise ValueError(
                f"The checkpoint was written with `selector`={state_dict.get('selector')!r}, this callback uses "
                f"{self.selector.name!r}: resume with the same selector."
            )
        for name in ("mask_epoch", "trainable_fraction"):
            if state_dict.get(name) != getattr(self, name):
                rank_zero_user_warn(
                    f"SpartaMaskCallback: the checkpoint was written with `{name}`={state_dict.get(name)!r}, this "
                    f"callback has {getattr(self, name)!r}; the checkpoint's phase and mask are kept."
                )
        self._phase = state_dict["phase"]
        self._seed = state_dict.get("seed", self._seed)
        mask = state_dict.get("mask")
        self.mask = None if mask is None else {name: m.clone() for name, m in mask.items()}
        partial = state_dict.get("scoring_sums")
        self._partial_scores = None if partial is None else {name: s.clone() for name, s in partial.items()}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._scoring_active and isinstance(trainer.strategy, DPStrategy):
            # Interrupted during the scoring epoch: keep the sums so that another fit can go on.
            self._partial_scores = {name: s.detach().cpu() for name, s in trainer.strategy.scoring_sums.items()}
            trainer.strategy.end_scoring()
            self._scoring_active = False


def _averaged_copies(trainer: pl.Trainer) -> list[nn.Module]:
    """The copies of the module that weight-averaging callbacks average the training weights into.

    Lightning's ``WeightAveraging``/``EMAWeightAveraging`` keep an ``AveragedModel`` of the module and
    ``StochasticWeightAveraging`` a deep copy; both pair the copy's parameters and buffers with the
    module's by position, so the copy must be swapped exactly like the module (the same rows), or the
    pairs no longer line up: a shape error, or a silently wrong average where shapes happen to agree.
    """
    copies = []
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None)
        if isinstance(average, AveragedModel):
            average = average.module
        if isinstance(average, nn.Module):
            copies.append(average)
    return copies


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(_get(model, parent), child, new)


def _unique(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    seen: set[int] = set()
    result = {}
    for name, p in params.items():
        if id(p) not in seen:
            seen.add(id(p))
            result[name] = p
    return result


def _block_of(name: str) -> str:
    """The block a layer belongs to: its name up to the first numbered part (``blocks.3.attn.qkv`` -> ``blocks.3``),
    else its parent (``model.patch_embed.proj`` -> ``model.patch_embed``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name.rpartition(".")[0] or name


def _mask_image(grid: torch.Tensor) -> torch.Tensor:
    """A ``[H, W]`` uint8 image (0-255) of a ``[out, cols]`` 0/1 grid, its aspect ratio kept.

    The longer side is scaled to ``_IMAGE_SIDE`` pixels: small layers are enlarged (nearest neighbour, each entry
    a sharp block) and large ones averaged down (grey = partly kept). The shorter side is at least
    ``_MIN_IMAGE_SIDE`` pixels, so a very elongated layer stays visible.
    """
    rows, cols = grid.shape
    scale = _IMAGE_SIDE / max(rows, cols)
    height = max(_MIN_IMAGE_SIDE, round(rows * scale))
    width = max(_MIN_IMAGE_SIDE, round(cols * scale))
    image = grid[None, None].float()
    # average down each axis that is longer than its target, then repeat up to the exact size
    pooled = F.adaptive_avg_pool2d(image, (min(rows, height), min(cols, width)))
    image = F.interpolate(pooled, size=(height, width), mode="nearest")[0, 0]
    return (image * 255).round().to(torch.uint8)


__all__ = ["SpartaMaskCallback"]
