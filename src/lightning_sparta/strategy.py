"""DP-SGD as a Lightning strategy: per-sample clipping, Gaussian noise, Poisson sampling, accounting.

One step of :class:`DPStrategy` is eq. (1) of the SPARTA paper (Abadi et al.'s DP-SGD):

.. math::

    \\tilde g = \\frac{1}{qn}\\Big(\\sum_{i\\in B} g_i \\min\\big(1, \\tfrac{C}{\\|g_i\\|_2}\\big)
              + \\mathcal N(0, \\sigma^2 C^2 I)\\Big)

where ``B`` is a Poisson sample of the training set with rate ``q``, ``g_i`` is the gradient of
sample ``i``'s own loss over *all* trainable parameters, ``C`` is ``max_grad_norm`` and ``σ`` the
noise multiplier. The strategy owns the training loader's sampling, clips and noises the gradient
and steps the accountant; the user's optimizer and LR schedulers are used unchanged.

In DDP every rank draws the same global Poisson batch and keeps its slice, the clipped sums are
all-reduced, and the noise is drawn once, on rank 0, before the reduction: every rank then applies
the identical update, so the parameters stay identical without DDP's gradient all-reduce.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from opacus.accountants import IAccountant
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_sparta._logging import debug, get_logger, info, rank_zero_user_warn, shorten, warn
from lightning_sparta._malloc import keep_freed_memory, release_freed_memory, why_not_tuned
from lightning_sparta._run_length import lift_unmet_minimums, note_max_epochs, planned_steps, restore_minimums
from lightning_sparta.privacy.accountant import (
    ACCOUNTANT_NAMES,
    AccountantName,
    calibrate_noise_multiplier,
    create_accountant,
    epsilon_for,
    is_prefix,
    read_privacy_state,
    validate_delta,
    validate_epsilon_tolerance,
    validate_target_epsilon,
    warn_if_delta_too_large,
)
from lightning_sparta.privacy.batchnorm import FrozenBatchNorm
from lightning_sparta.privacy.clipping import ClippingMode, create_clipping_engine
from lightning_sparta.privacy.guards import (
    StateWatch,
    check_callbacks,
    check_no_accumulation,
    check_no_batch_mixing,
    check_one_training_loader,
    check_optimizer,
    check_trainer,
    refuse_unclipped_gradients,
    warn_if_compiled,
    warn_private_monitors,
)
from lightning_sparta.privacy.noise import rewound_seed, secure_normal, step_noise
from lightning_sparta.privacy.per_sample import PerSampleGradients, sum_of_losses
from lightning_sparta.privacy.sampler import (
    SUMMARY_EXAMPLES,
    DPDataLoader,
    PoissonBatchSampler,
    batch_size_of,
    example_summaries,
    expand_views,
    split_batch,
    training_data,
    training_set_fingerprint,
)
from lightning_sparta.privacy.scoring import Scoring
from lightning_sparta.privacy.validation import BATCHNORM_MODES, BatchNormMode, prepare_model
from lightning_sparta.sparse.swap import SPARSE_LAYER_TYPES

_CHECKPOINT_KEY = "lightning_sparta.dp_strategy"
_PATHS_FILE = "per_sample_paths.txt"  # the full table of per-sample gradient paths, in the log directory
_log = get_logger("strategy")


class DPStrategy(DDPStrategy):
    """Train any automatic-optimization LightningModule with DP-SGD, on one device or with DDP.

    Args:
        noise_multiplier: σ, the noise std in units of ``max_grad_norm``. Give this or
            ``target_epsilon``. ``0`` disables noise (debugging only: the run is then not private).
        target_epsilon: calibrate σ so that the whole run (``max_epochs``/``max_steps`` of Poisson
            steps, SPARTA's scoring epoch included) ends at this ε.
        target_delta: the δ of the guarantee; also the δ at which ε is reported.
        max_grad_norm: clipping threshold ``C`` of each sample's gradient (flat, over all trainable
            parameters).
        accountant: ``"prv"`` (Gopi et al., Opacus' default), ``"rdp"`` or ``"gdp"``.
        physical_batch_size: split each logical Poisson batch into micro-batches of at most this many
            samples per device: clipped gradients accumulate and one noisy step is taken per logical
            batch. ``None`` processes the logical batch in one pass.
        loss_reduction: how ``training_step``'s scalar loss reduces over the batch: ``"mean"`` (the
            default of torch losses) or ``"sum"``. A ``training_step`` that returns one loss per
            sample (shape ``[batch]``) is summed and needs no declaration.
        seed: seed of the Poisson sampler and of the noise in the default, reproducible mode; drawn
            from torch's RNG (so fixed by ``seed_everything``) when ``None``. The noise of step ``t`` is
            derived from ``(seed, t)``, so it never repeats within one strategy's accounted history
            (second ``fit`` calls and resumes included), but anyone holding the seed (it is saved in
            checkpoints) can recompute it. Not a cryptographically secure source of randomness. Two
            runs with the same seed on the same data share their batches and noise: publishing two of
            them (a sweep under one ``seed_everything``) lets the noise cancel; see the README.
        secure_mode: draw the noise from the operating system's cryptographically secure generator
            (``os.urandom``, Box-Muller in float64) and the sampling seed from OS entropy, and keep
            neither in checkpoints or logs: nothing saved allows recomputing the noise. Runs are then
            not reproducible; a resumed run keeps its ε and sampler position but draws fresh
            randomness. Must be given with ``seed=None``.
        epsilon_tolerance: how far below ``target_epsilon`` calibration may land; ``None`` (default):
            ``min(0.01, target_epsilon / 100)``. Must be smaller than 10% of ``target_epsilon``.
        start_method: DDP launch method (``"popen"``, ``"spawn"``, ``"fork"``); see Lightning's DDP.
        process_group_backend: ``"gloo"`` or ``"nccl"``; chosen from the device when ``None``.
        timeout: DDP collective timeout.
        batchnorm: what to do with BatchNorm layers (``nn.BatchNorm*d``, ``nn.SyncBatchNorm``, timm's
            ``BatchNormAct2d``). ``"freeze"`` (default): during fitting they always normalise with their
            running statistics, as in ``eval()``, even in ``train()`` mode, and never update them
            (``num_batches_tracked`` included); each sample is then normalised on its own, which is
            private, and the affine ``weight``/``bias`` stay trainable with exact per-sample gradients.
            Modules and state-dict keys are unchanged (a pretrained checkpoint loads as is), and the
            ordinary behaviour returns at teardown. ``"refuse"``: raise ``IncompatibleModelError``
            naming the BatchNorm layers. Layers without running statistics are refused either way.
        clipping: how per-sample norms and clipped sums are computed
            (:mod:`lightning_sparta.privacy.clipping`). ``"auto"`` (default): Linear, Conv2d (grouped
            included), timm's ``Conv2dSame``, Embedding and the row-sparse layers never form per-sample
            weight gradients: each takes the cheaper of a ghost norm and a norm materialised one chunk
            of samples at a time, and its clipped sum is one book-keeping product; the other layers
            (norms, biases, ``cls_token``/``pos_embed``) keep exact per-sample gradients. ``"ghost"``:
            the ghost norm wherever a layer has one. ``"per_sample"``: every trainable parameter gets a
            ``[B, *shape]`` per-sample gradient (the reference; slower, B times the trainable size in
            memory). All three compute the same update; the path of every layer is in
            ``strategy.engine.summary()``.

        privacy_state: continue the accountant history of earlier runs on the same private data: a dict
            from :meth:`privacy_state` (e.g. ``DPStrategy(..., privacy_state=old.privacy_state())``), or the
            path of a file holding one (``torch.save``) or of a Lightning checkpoint written with
            ``DPStrategy``. See :meth:`load_privacy_state`.
        augmentation_multiplicity: ``K`` augmented views of every sample, clipped together (De et al.
            2022). The training batch is a tuple or list whose first tensor holds the views,
            ``[B, K, ...]``; the strategy hands ``training_step`` the views as ``B·K`` rows, sample by
            sample, with every other tensor of ``B`` rows (the labels) repeated for each view, so the
            ``training_step`` is the usual one. A sample's gradient is the gradient of its own loss
            over its views (their mean with ``loss_reduction="mean"``), clipped once: the views cost no
            privacy. Poisson sampling and ε are those of the ``B`` samples; ``physical_batch_size``
            counts samples too (a micro-batch runs ``K`` times as many rows). ``1`` (default): no views.
        tune_malloc: when training on CPU under glibc, keep freed memory in the process between steps
            (``mallopt``: blocks up to 32 MB from the heap, up to 1 GB of freed heap kept; given back
            with ``malloc_trim`` at the end of the fit). A book-keeping step holds every layer's
            activations and output gradients until the clip factors are known; glibc would return them
            to the system after each step and fault them in again at the next (a tenth of DeiT-tiny's
            DP step on one CPU thread). The setting is process-wide and stays after the fit; it is
            skipped when a ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` is set or another ``malloc`` is
            preloaded. ``False`` leaves ``malloc`` as it is. No effect on GPU.

    Raises:
        ValueError: for a bad argument; the message names it and the value found.

    Example:
        >>> strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0)
        >>> strategy.noise_multiplier
        1.0
    """

    strategy_name = "dp"

    def __init__(
        self,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: AccountantName = "prv",
        physical_batch_size: int | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        seed: int | None = None,
        secure_mode: bool = False,
        epsilon_tolerance: float | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
        batchnorm: BatchNormMode = "freeze",
        clipping: ClippingMode = "auto",
        privacy_state: dict[str, Any] | str | os.PathLike | None = None,
        augmentation_multiplicity: int = 1,
        tune_malloc: bool = True,
    ) -> None:
        kwargs: dict[str, Any] = {
            "start_method": start_method,
            "process_group_backend": process_group_backend,
        }
        if timeout is not None:
            kwargs["timeout"] = timeout
        super().__init__(**kwargs)
        epsilon_tolerance = _validate_arguments(
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            max_grad_norm=max_grad_norm,
            epsilon_tolerance=epsilon_tolerance,
            accountant=accountant,
            physical_batch_size=physical_batch_size,
            augmentation_multiplicity=augmentation_multiplicity,
            loss_reduction=loss_reduction,
            batchnorm=batchnorm,
            seed=seed,
            secure_mode=secure_mode,
            tune_malloc=tune_malloc,
        )

        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.target_delta = validate_delta(target_delta)
        self.max_grad_norm = float(max_grad_norm)
        self.accountant_name: str = accountant
        self.physical_batch_size = physical_batch_size
        self.loss_reduction = loss_reduction
        self.augmentation_multiplicity = augmentation_multiplicity
        self.epsilon_tolerance = float(epsilon_tolerance)
        self._noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self._seed = seed
        self.secure_mode = secure_mode
        self.tune_malloc = tune_malloc
        self._malloc_tuned = False  # this strategy set glibc's thresholds: give the kept memory back at teardown
        self.accountant: IAccountant = create_accountant(accountant)
        self.sample_rate: float | None = None
        self.num_samples: int | None = None
        self.steps_per_epoch: int | None = None
        self.engine = PerSampleGradients()  # the hooks: inputs and output gradients of the trainable layers
        self.engine.refuse_other_backward_passes = True  # see `lightning_sparta.privacy.input_gradients`
        self.clipping: str = clipping
        self.clipping_engine = create_clipping_engine(clipping, self.engine)  # norms and clipped sums
        self.batchnorm: BatchNormMode = batchnorm
        self._frozen_batchnorm: FrozenBatchNorm | None = None  # undone at teardown
        self._pending_state: dict[str, Any] | None = None
        self._attached_params: tuple[int, ...] | None = None
        self._summed: dict[nn.Parameter, torch.Tensor] = {}
        self._scoring: Scoring | None = None  # a scoring epoch under way
        self._epoch_position = 0
        self._micro_batch_size = 0
        self._verify_next = False
        self._low_precision = False
        self._non_private_reason: str | None = None
        self._in_training_step = False
        self._monitors_checked = False
        self._warned_non_finite = False
        self._watch: StateWatch | None = None
        # set by optimizer_step until the step's release is formed (in backward, or after the closure)
        self._release_pending: Optimizer | None = None
        self._step_optimizer = False  # whether the release gave the optimizer a gradient to step with
        self._warned_local_reduce = False
        self._noise_buffer: torch.Tensor | None = None  # each step's N(0, 1) draws (see _standard_noise)
        self._calibrated_for: tuple[float, int] | None = None  # (q, n) of the calibrated σ, see on_train_start
        self._planned_end: int | None = None  # under target_epsilon: the accounted step σ was calibrated to end at
        self._stopped_at_target = False
        self._saved_minimums: tuple[int | None, int | None] | None = None  # lowered to stop at target_epsilon
        self._clipped_sum_hooks: list[tuple[Callable[[list[nn.Parameter], list[torch.Tensor]], None], bool]] = []
        if privacy_state is not None:
            self.load_privacy_state(privacy_state)

    # ------------------------------------------------------------------------------ properties
    @property
    def noise_multiplier(self) -> float | None:
        """σ: given, or calibrated from ``target_epsilon`` once fitting has started."""
        return self._noise_multiplier

    @property
    def expected_batch_size(self) -> float:
        """``q·n``: the expected size of a global logical batch, the divisor of eq. (1)."""
        if self.sample_rate is None or self.num_samples is None:
            raise RuntimeError("The expected batch size is known once the training data is set up.")
        return self.sample_rate * self.num_samples

    @property
    def steps(self) -> int:
        """Number of private steps accounted so far (training and scoring)."""
        return sum(n for _, _, n in self.accountant.history)

    @property
    def is_private(self) -> bool:
        """False when some step had no noise or a non-private component (e.g. an oracle mask) was used."""
        return self._non_private_reason is None and self._noise_multiplier != 0

    def mark_not_private(self, reason: str) -> None:
        """Record that the run lost its DP guarantee (every ε report then says so)."""
        self._non_private_reason = reason

    @property
    def non_private_reason(self) -> str | None:
        """Why the run is not private, or ``None``."""
        if self._non_private_reason is not None:
            return self._non_private_reason
        return "noise_multiplier=0" if self._noise_multiplier == 0 else None

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far, at ``delta`` (``target_delta`` by default); ``inf`` for a non-private run."""
        delta = self.target_delta if delta is None else validate_delta(delta, "delta")
        if self._non_private_reason is not None:
            return math.inf
        return epsilon_for(self.accountant.history, delta, self.accountant_name)

    def epsilon_after(self, extra_steps: int, delta: float | None = None) -> float:
        """ε the run would have spent after ``extra_steps`` more steps at the current (σ, q)."""
        delta = self.target_delta if delta is None else validate_delta(delta, "delta")
        if self._non_private_reason is not None:
            return math.inf
        history = [*self.accountant.history, (self._noise_multiplier, self.sample_rate, extra_steps)]
        return epsilon_for(history, delta, self.accountant_name)

    def privacy_state(self) -> dict[str, Any]:
        """The accountant history, to continue it in another strategy (``DPStrategy(privacy_state=...)``).

        Holds the accountant's name, its ``(σ, q, steps)`` history and whether the run lost its guarantee;
        no seed and no weights. Save it with ``torch.save`` if the next run is in another process.
        """
        return {
            "accountant": self.accountant_name,
            "history": [tuple(h) for h in self.accountant.history],
            "non_private_reason": self._non_private_reason,
        }

    def load_privacy_state(self, state: dict[str, Any] | str | os.PathLike) -> None:
        """Continue the accountant history of earlier runs: this strategy's ε then covers them too.

        Differential privacy composes: every run on the same private data spends budget, and the ε of
        all of them together is what the accountant computes over their joined histories (the sum of the
        runs' ε values is a valid but looser bound). Seeding the history here makes ``epsilon()``, the
        logs and ``PrivacyBudgetCallback(stop_at_epsilon=...)`` account for the whole sequence. With
        ``target_epsilon``, σ is still calibrated for this fit's own steps; the banner says where the
        total will end.

        Args:
            state: a dict from :meth:`privacy_state` (or :meth:`state_dict`), or the path of a file with
                one (``torch.save``) or of a Lightning checkpoint written with ``DPStrategy``.

        Raises:
            ValueError: if the state was accounted with another accountant (histories of different
                accountants do not compose), or has no accountant history; or if this strategy has
                already taken steps.
        """
        if self.steps:
            raise ValueError(
                f"`load_privacy_state` needs a strategy that has not taken steps yet ({self.steps} accounted)."
            )
        history, reason = read_privacy_state(state, self.accountant_name, _CHECKPOINT_KEY)
        self.accountant.history = history
        if reason:
            self._non_private_reason = reason

    # ------------------------------------------------------------------------------ DDP plumbing
    # `Trainer.fit` assigns the module to the strategy before `Trainer._run` replaces an unset max_epochs by
    # Lightning's default (1000): the only point where the strategy can tell `max_epochs=1000` from "unset".
    @property  # type: ignore[override]
    def _lightning_module(self) -> pl.LightningModule | None:
        return self.__dict__.get("_dp_lightning_module")

    @_lightning_module.setter
    def _lightning_module(self, module: pl.LightningModule | None) -> None:
        self.__dict__["_dp_lightning_module"] = module
        caller = sys._getframe(1)
        trainer = caller.f_locals.get("self")
        if module is not None and caller.f_code.co_name == "fit" and isinstance(trainer, pl.Trainer):
            note_max_epochs(trainer)

    @override
    def _configure_launcher(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            # One process needs no launcher; Lightning's would also call torch.set_num_threads(cpu_count)
            # behind the user's back when OMP_NUM_THREADS is unset.
            self._launcher = None
            return
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        module = self._lightning_module
        if module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING:
            # before the callbacks' own `setup`, where some (BatchSizeFinder) refuse with another reason
            check_callbacks(module.trainer.callbacks, module)
        super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            self.set_world_ranks()  # one process: no process group needed
            return
        super().setup_distributed()

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper: gradients are clipped per sample, summed, noised once
        # and all-reduced by this strategy. DDP's own all-reduce would average non-private gradients.
        pass

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model  # never wrapped, see configure_ddp

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._validate_trainer(trainer)
            # Before the optimizers: `configure_optimizers` may build the training loader already (through
            # `trainer.estimated_stepping_batches`), and that loader must get the strategy's sampling seed
            # and the user's own batch size.
            self._setup_randomness()
            self._keep_users_training_sampler(trainer)
        if dist.is_available() and dist.is_initialized():
            super().setup(trainer)
        else:  # one process: nothing to synchronise
            Strategy.setup(self, trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            if len(self.optimizers) != 1:
                raise ValueError(
                    f"DPStrategy supports exactly one optimizer (with any number of param groups), "
                    f"`configure_optimizers` returned {len(self.optimizers)}."
                )
            check_optimizer(self.optimizers[0])
            self._broadcast_model()
            self._keep_freed_memory()

    def _keep_freed_memory(self) -> None:
        if not self.tune_malloc or self.root_device.type != "cpu":
            return
        self._malloc_tuned = keep_freed_memory()
        if self._malloc_tuned:
            debug(_log, "DPStrategy: glibc keeps up to 1 GB of freed memory between steps (see `tune_malloc`).")
        else:
            debug(_log, f"DPStrategy: malloc left as it is ({why_not_tuned()}).")

    def _validate_trainer(self, trainer: pl.Trainer) -> None:
        check_trainer(trainer, self.lightning_module, self.precision_plugin)
        warn_if_compiled(self.lightning_module)
        self._frozen_batchnorm = prepare_model(self.lightning_module, batchnorm=self.batchnorm)
        self._low_precision = "bf16" in str(trainer.precision)

    def _setup_randomness(self) -> None:
        """Fix the seed of the sampler (and, in reproducible mode, of the noise) once per strategy.

        The seed is kept across ``fit`` calls: the noise of step ``t`` is keyed by ``(seed, t)`` with ``t``
        counted over the whole accounted history, so a second fit continues the stream instead of
        replaying it. In secure mode the seed comes from OS entropy on rank 0 and is never saved.
        """
        state = self._pending_state
        if state is not None and state.get("seed") is not None and not self.secure_mode:
            seed = state["seed"]
        elif self._seed is not None:
            seed = self._seed
        elif self.secure_mode:
            seed = secrets.randbits(62)
        else:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._seed = int(self.broadcast(seed))

    # ------------------------------------------------------------------------------ data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self._lightning_module is not None else None
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        return self._poisson_loader(dataloader)

    def _check_same_training_set(self, dataset: Any, num_samples: int, batch_size: int) -> None:
        """Refuse DDP ranks whose training sets differ (every rank raises, so none waits for the others).

        The ranks draw one Poisson batch of indices and each keeps a slice: that is one Poisson sample only
        if index ``i`` is the same example on every rank. With a different split per rank (``random_split``
        in ``setup()`` without a fixed generator), an example held at different indices on two ranks can be
        drawn on both in one step, and ``q`` may differ between ranks. Beyond sizes, ``Subset`` indices and
        ``TensorDataset`` values (:func:`training_set_fingerprint`), the ranks compare a few examples loaded
        through the dataset (:func:`example_summaries`): a custom dataset that orders its files at random
        in each process shows only there.
        """
        ranks = self._rows_if_ranks_differ([num_samples, batch_size, training_set_fingerprint(dataset, batch_size)])
        if ranks is not None:
            shown = "; ".join(
                f"rank {i}: n={n}, batch_size={b}, fingerprint {f:016x}" for i, (n, b, f) in enumerate(ranks)
            )
        else:  # what a custom dataset holds is seen only by loading some of it (ranks may differ in float rounding)
            rows = self._gathered_rows(example_summaries(dataset) if self.world_size > 1 else [])
            if rows is None or all(torch.allclose(row, rows[0], rtol=1e-4, atol=1e-6) for row in rows):
                return
            shown = f"the examples loaded at {SUMMARY_EXAMPLES} evenly spaced indices differ"
        raise ValueError(
            f"DPStrategy: the training set differs across DDP ranks ({shown}). Every rank must hold the same "
            "examples in the same order: the strategy draws one Poisson batch of indices and gives each rank a "
            "slice, so an example held at different indices on two ranks could be drawn on both in one step "
            "(twice its clipped contribution) and each rank would sample at its own rate. The usual cause is a "
            "random split made in `setup()` without a fixed generator: pass "
            "`generator=torch.Generator().manual_seed(0)` to `random_split`, or split once before the ranks start; "
            "or a dataset that lists or shuffles its files in an order of its own in each process."
        )

    def _rows_if_ranks_differ(self, values: list[int] | list[float]) -> list[list] | None:
        """Every rank's ``values`` (one row per rank) if they differ across DDP ranks, else ``None``.

        A collective: every rank calls it at the same point, so every rank can raise and none waits.
        """
        rows = self._gathered_rows(values)
        if rows is None:
            return None
        ranks = rows.tolist()
        return None if all(r == ranks[0] for r in ranks) else ranks

    def _gathered_rows(self, values: list[int] | list[float]) -> torch.Tensor | None:
        """Every rank's ``values``, ``[ranks, len(values)]``; ``None`` in one process. A collective."""
        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        dtype = torch.float64 if any(isinstance(v, float) for v in values) else torch.int64
        mine = torch.tensor(values, dtype=dtype, device=self.root_device)
        return self.all_gather(mine).view(-1, len(values)).cpu()

    def _check_same_privacy_settings(self) -> None:
        """Refuse DDP ranks built with different privacy settings (a config read per rank, say).

        The noise is drawn on rank 0 with its σ, but each rank clips its own samples with its own bound:
        a rank with a larger ``max_grad_norm`` would let a sample contribute more than the noise covers,
        and ranks with different budgets would account and stop differently.
        """
        settings = {
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self._noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "accountant": self.accountant_name,
            "loss_reduction": self.loss_reduction,
            "augmentation_multiplicity": self.augmentation_multiplicity,
            "secure_mode": self.secure_mode,
        }
        # strings as stable integers (Python's str hash is salted per process); None as NaN's stand-in
        values = [
            -1.0 if v is None else float(int.from_bytes(v.encode()[:6], "big")) if isinstance(v, str) else float(v)
            for v in settings.values()
        ]
        ranks = self._rows_if_ranks_differ(values)
        if ranks is None:
            return
        differ = [name for i, name in enumerate(settings) if len({row[i] for row in ranks}) > 1]
        raise ValueError(
            f"DPStrategy: the privacy settings differ across DDP ranks ({', '.join(f'`{n}`' for n in differ)}; this "
            f"rank has {', '.join(f'{n}={settings[n]!r}' for n in differ)}). Every rank must build DPStrategy with "
            "the same arguments: the noise is drawn once, on rank 0, for rank 0's settings, while each rank clips "
            "its own samples with its own bound and keeps its own account."
        )

    def _broadcast_model(self) -> None:
        """Give every rank rank 0's parameters and buffers before the first step.

        Without a ``DistributedDataParallel`` wrapper nothing else synchronises the initial weights:
        ranks seeded differently (or not at all) would each train, and SPARTA would score, a different
        model while their all-reduced sums are applied as if they were one.
        """
        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        module = self.lightning_module
        # a sparse layer's indices (its selected rows) are structure, not a buffer: broadcast them too
        indices = [m.index for m in module.modules() if isinstance(m, SPARSE_LAYER_TYPES)]
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers(), *indices]:
                dist.broadcast(tensor.data, src=0)

    def _keep_users_training_sampler(self, trainer: pl.Trainer) -> None:
        """Stop Lightning from re-instantiating the training loader with a ``DistributedSampler``.

        DPStrategy is a DDP strategy, so Lightning would replace the training loader's sampler (and
        rebuild a user's ``batch_sampler`` with batch size 1) before :meth:`process_dataloader` sees
        it; the strategy then could not read the batch size the user asked for. Evaluation loaders
        keep Lightning's distributed samplers.
        """
        connector = trainer._data_connector
        if "_requires_distributed_sampler" in vars(connector):
            return
        default = connector._requires_distributed_sampler

        def requires_distributed_sampler(dataloader: DataLoader) -> bool:
            if trainer.state.fn == TrainerFn.FITTING and trainer.state.stage == RunningStage.TRAINING:
                return False  # the strategy owns the training sampling
            return default(dataloader)

        connector._requires_distributed_sampler = requires_distributed_sampler

    def _poisson_loader(self, dataloader: object) -> DPDataLoader:
        dataloader, num_samples, batch_size = training_data(dataloader)
        check_no_batch_mixing(collate_fn=dataloader.collate_fn)
        self._check_same_training_set(dataloader.dataset, num_samples, batch_size)
        self.num_samples = num_samples
        self.sample_rate = batch_size / num_samples
        if self.target_epsilon is None or self._pending_state is None:
            warn_if_delta_too_large(self.target_delta, num_samples)
        if self._pending_state is not None and abs(self._pending_state["sample_rate"] - self.sample_rate) > 1e-12:
            raise ValueError(
                f"The checkpoint was trained with sample rate {self._pending_state['sample_rate']:.6g}, the "
                f"resumed run has {self.sample_rate:.6g}: keep batch_size and the dataset unchanged on resume."
            )
        sampler = PoissonBatchSampler(
            num_samples, self.sample_rate, seed=self._seed or 0, num_replicas=self.world_size, rank=self.global_rank
        )
        self.steps_per_epoch = len(sampler)
        return DPDataLoader.replacing(
            dataloader,
            sampler,
            position_fn=lambda: self._epoch_position,
            # `processed`, not `current_epoch`: after an epoch-end checkpoint the first iterator is created
            # before Lightning moves `completed` up to `processed` (FitLoop.on_run_start).
            epoch_fn=lambda: self.lightning_module.trainer.fit_loop.epoch_progress.current.processed,
            # Lightning ends an epoch after `num_training_batches` (`limit_train_batches` included).
            epoch_length_fn=lambda: self.lightning_module.trainer.num_training_batches,
            save_seed=not self.secure_mode,
        )

    # ------------------------------------------------------------------------------ fit start
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        self._monitors_checked = False
        self._warned_non_finite = False
        if self.sample_rate is None:
            raise ValueError("DPStrategy found no training data: `train_dataloader` returned nothing.")
        check_one_training_loader(trainer.train_dataloader)
        self._check_same_privacy_settings()
        if trainer.overfit_batches:
            rank_zero_user_warn(
                f"DPStrategy: `overfit_batches={trainer.overfit_batches}` keeps its batch count, but the batches are "
                "fresh Poisson draws from the whole training set at every epoch (the strategy owns the sampling), "
                "so no fixed set of batches is overfitted. To debug on a few examples, train on a `Subset` of "
                "them instead; every step is accounted either way."
            )
        state, self._pending_state = self._pending_state, None
        planned_end = None  # under target_epsilon: the accounted step the run is planned to end at
        if state is not None:
            self._noise_multiplier = state["noise_multiplier"]
            self.accountant.history = [tuple(h) for h in state["history"]]
            self._non_private_reason = state.get("non_private_reason")
            planned_end = self._check_resumed_plan(trainer)
        elif self.target_epsilon is not None:
            # a second fit with the same Trainer continues its loops: only the steps left are taken, and
            # target_epsilon bounds them together with the history (an earlier fit, a privacy_state)
            steps = planned_steps(trainer, done_epochs=trainer.current_epoch, done_steps=trainer.global_step)
            planned_end = self.steps + steps
            if steps > 0:
                self._calibrate(steps)
                info(_log, self._calibration_banner(steps))
                if self.steps:
                    spent = epsilon_for(self.accountant.history, self.target_delta, self.accountant_name)
                    rank_zero_user_warn(
                        f"DPStrategy: target_epsilon={self.target_epsilon:g} bounds the whole history: the "
                        f"{self.steps} steps already accounted spent ε = {spent:.4f}, so the {steps} new steps get "
                        f"σ = {self._noise_multiplier:.4f} and the run ends at ε = {self.epsilon_after(steps):.4f}. "
                        "Raise `target_epsilon` to the total you accept to train them with less noise."
                    )
        # the rate σ holds for: a reloaded training set of another size gets σ recalibrated (on_train_batch_start)
        self._calibrated_for = (self.sample_rate, self.num_samples) if self.target_epsilon is not None else None
        self._stopped_at_target = False
        if planned_end is None and self.target_epsilon is not None:  # a resumed run within its plan
            left = planned_steps(trainer, done_epochs=trainer.current_epoch, done_steps=trainer.global_step)
            planned_end = self.steps + left
        self._planned_end = planned_end
        self._refresh_hooks()
        self._report_paths(trainer)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._calibrated_for is not None and self.sample_rate != self._calibrated_for[0]:
            self._recalibrate_for_new_training_set()
        if self._stopped_at_target and (after := self.epsilon_after(1)) > self.target_epsilon:
            raise RuntimeError(
                f"DPStrategy: step {self.steps + 1} would bring ε to {after:.4f} > "
                f"target_epsilon={self.target_epsilon:g}, and the Trainer went on after the strategy asked it to "
                "stop (`trainer.should_stop` reset?). No step beyond the target is taken."
            )

    def _stop_if_next_step_exceeds_target(self) -> None:
        """Past the step σ was calibrated to end at, ask the Trainer to stop if one more would exceed the target.

        The plan can grow during a fit (a callback raising ``trainer.fit_loop.max_epochs``); the steps beyond
        it would spend more than ``target_epsilon``. ``min_epochs``/``min_steps`` do not hold the stop back.
        """
        if self.epsilon_after(1) <= self.target_epsilon:
            return
        trainer = self.lightning_module.trainer
        trainer.should_stop = True
        self._stopped_at_target = True
        unmet, saved = lift_unmet_minimums(trainer)
        if unmet and self._saved_minimums is None:
            self._saved_minimums = saved

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        trainer = self.lightning_module.trainer
        fit_loop = trainer.fit_loop
        epochs_done = fit_loop.max_epochs not in (None, -1) and (
            fit_loop.epoch_progress.current.processed >= fit_loop.max_epochs
        )
        steps_done = fit_loop.max_steps != -1 and trainer.global_step >= fit_loop.max_steps
        if self._stopped_at_target and not epochs_done and not steps_done:
            rank_zero_user_warn(
                f"DPStrategy: stopped after step {self.steps} at ε = {self.epsilon():.4f}: one more step would "
                f"exceed target_epsilon={self.target_epsilon:g}. The Trainer's limits asked for more steps than σ "
                "was calibrated for (raised during the fit, or on resume). Fit again with a larger `target_epsilon` "
                "(it bounds the whole history) to train further."
            )

    def _calibrate(self, steps: int) -> None:
        """σ for ``steps`` more steps at the current rate, so that the history then ends at ``target_epsilon``."""
        sigma = calibrate_noise_multiplier(
            self.target_epsilon,
            self.target_delta,
            self.sample_rate,
            steps,
            self.accountant_name,
            self.epsilon_tolerance,
            history=self.accountant.history,
        )
        self._noise_multiplier = float(self.broadcast(sigma))

    def _recalibrate_for_new_training_set(self) -> None:
        """Keep ``target_epsilon`` when a reloaded training loader changed the sample rate mid-fit.

        σ was calibrated for the rate at fit start; with ``reload_dataloaders_every_n_epochs`` a training
        set of another size (a curriculum, a dataset that drops examples) changes ``q`` and the number of
        steps left, and the run would end above its target. The steps already taken stay accounted at
        their own rate; σ is calibrated again for the steps left at the new one.
        """
        trainer = self.lightning_module.trainer
        (old_rate, old_n), old_sigma = self._calibrated_for, self._noise_multiplier
        steps = planned_steps(trainer, done_epochs=trainer.current_epoch, done_steps=trainer.global_step)
        self._calibrated_for = (self.sample_rate, self.num_samples)
        if steps <= 0:
            return
        change = (
            f"the reloaded training set holds {self.num_samples} samples instead of {old_n} (sample rate "
            f"{old_rate:.4g} → {self.sample_rate:.4g})"
        )
        try:
            self._calibrate(steps)
        except ValueError as error:
            raise ValueError(f"DPStrategy: {change}, and σ cannot be calibrated again for it: {error}") from error
        self._planned_end = self.steps + steps
        rank_zero_user_warn(
            f"DPStrategy: {change}; σ = {old_sigma:.4f} was calibrated for the old rate, so it is calibrated "
            f"again: the {steps} steps left get σ = {self._noise_multiplier:.4f} and the run ends at "
            f"ε = {self.epsilon_after(steps):.4f} (target_epsilon={self.target_epsilon:g})."
        )

    def _report_paths(self, trainer: pl.Trainer) -> None:
        """A compact per-sample path summary on the console; the full table in the log directory and at DEBUG."""
        table = self.engine.summary()
        has_log_dir = bool(trainer.loggers)
        log_dir = trainer.log_dir if has_log_dir else None  # a collective: every rank asks
        where = " (full table: set the `lightning_sparta` logger to DEBUG)"
        if log_dir is not None and trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, _PATHS_FILE)
            with open(path, "w", encoding="utf-8") as file:
                file.write(table + "\n")
            where = f" (full table: {path})"
        info(_log, f"DPStrategy per-sample gradients{where}: " + self.engine.compact_summary())
        debug(_log, "DPStrategy per-sample gradient paths:\n" + table)

    def _calibration_banner(self, steps: int) -> str:
        """What the calibrated plan reaches, computed by the accountant (never the target echoed back)."""
        reached = self.epsilon_after(steps)  # the history (second fit, privacy_state) composed with the plan
        after = f" after the {self.steps} already accounted" if self.steps else ""
        return (
            f"DPStrategy: σ = {self._noise_multiplier:.4f} (calibrated for target_epsilon={self.target_epsilon:g}, "
            f"tolerance {self.epsilon_tolerance:g}): {steps} steps at q = {self.sample_rate:.5f}{after} reach "
            f"ε = {reached:.4f} at δ = {self.target_delta:g} ({self.accountant_name})."
        )

    def _check_resumed_plan(self, trainer: pl.Trainer) -> int | None:
        """The accounted step a resumed run must stop at to keep ``target_epsilon``, if it plans more.

        σ comes from the checkpoint, calibrated for the original run; a resumed run given more epochs or
        steps would end above the target. It is told, and stops after the last step within it.

        Raises:
            ValueError: if not one more step fits in the target.
        """
        if self.target_epsilon is None or self._non_private_reason is not None:
            return None
        remaining = max(0, planned_steps(trainer) - self.steps)
        final = self.epsilon_after(remaining)
        if final <= self.target_epsilon * (1 + 1e-6):
            return None
        low, high = 0, remaining  # ε after `low` more steps is within the target, after `high` it is not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.epsilon_after(mid) <= self.target_epsilon else (low, mid)
        if low == 0:
            raise ValueError(
                f"DPStrategy: the checkpoint's {self.steps} steps reach ε = {self.epsilon():.4f}, and one more step "
                f"would exceed target_epsilon={self.target_epsilon:g}: the resumed run's {remaining} remaining steps "
                "cannot be taken. Raise `target_epsilon` to the total you accept."
            )
        rank_zero_user_warn(
            f"DPStrategy: σ = {self._noise_multiplier:.4f} comes from the checkpoint, calibrated for a shorter run; "
            f"the resumed run's {remaining} remaining steps would end at ε = {final:.3f} > target_epsilon="
            f"{self.target_epsilon:g}, so it stops after {low} of them, at ε = {self.epsilon_after(low):.3f}. Resume "
            "with the original max_epochs/max_steps, or raise `target_epsilon` to the total you accept."
        )
        return self.steps + low

    def _refresh_hooks(self, verbose: bool = False) -> None:
        """Re-attach the per-sample hooks when the set of trainable parameters changed."""
        model = self.lightning_module
        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        if trainable == self._attached_params:
            return
        self.clipping_engine.attach(model)
        self._attached_params = trainable
        self._verify_next = True
        functorch = [p.module or "<root>" for p in self.engine.paths() if p.path == "functorch"]
        if verbose:
            debug(_log, "DPStrategy per-sample gradient paths:\n" + self.engine.summary())
        if functorch:
            warn(
                f"Per-sample gradients of {shorten(functorch)} use the slow functorch fallback: no grad sampler "
                "is registered for their exact type (see `opacus.grad_sample.register_grad_sampler`)."
            )

    # ------------------------------------------------------------------------------ the step
    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        """All-reduce across ranks, except inside ``training_step``, where the value stays local.

        Ranks hold different Poisson slices, so they run ``training_step`` a different number of times
        (once per micro-batch, not at all for an empty batch): a collective call there, such as
        ``self.log(..., sync_dist=True)``, would wait forever for the other ranks. Step values are
        therefore logged per rank; ``on_epoch`` values are still reduced at the end of the epoch.
        """
        if self._in_training_step and isinstance(tensor, torch.Tensor) and self.world_size > 1:
            if not self._warned_local_reduce:
                self._warned_local_reduce = True
                rank_zero_warn(
                    "DPStrategy: a cross-process reduction (e.g. `self.log(..., sync_dist=True)`) inside "
                    "`training_step` is computed on this rank only: ranks run different numbers of "
                    "micro-batches, so a collective call there would hang. Epoch-level values are still "
                    "reduced. Avoid other collectives (all_gather, barrier) in `training_step`."
                )
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._in_training_step = True
        try:
            return self._dp_training_step(*args, **kwargs)
        finally:
            self._in_training_step = False

    def _dp_training_step(self, *args: Any, **kwargs: Any) -> Any:
        check_no_accumulation(self.lightning_module.trainer)  # a callback may have set it after fit start
        self._refresh_hooks()
        # A step that died between its backward pass and its release (an exception, an interrupt) left
        # its per-sample gradients and clipped sums behind: they belong to samples this step did not
        # draw, and must never be added to its release. The engine's clear() also drops every hooked
        # `.grad`: we own the gradients, and stale ones would hide a missing per-sample gradient.
        self._summed.clear()
        self.clipping_engine.clear()
        batch, rest = (args[0], args[1:]) if args else (kwargs.pop("batch"), ())
        size = batch_size_of(batch)
        self._micro_batch_size = 0
        self._epoch_position = self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        # only the optimizer, after the release, may move a parameter; by value on the first step after attaching
        self._watch = StateWatch(self.lightning_module, values=self._verify_next)
        if size == 0:  # an empty Poisson batch: a valid step whose update is noise only
            return torch.zeros((), device=self.root_device, requires_grad=True)
        micro_batches = split_batch(batch, self.physical_batch_size) if self.physical_batch_size else [batch]
        loss_sum = torch.zeros((), device=self.root_device)
        for i, micro in enumerate(micro_batches):
            self._micro_batch_size = batch_size_of(micro)
            # the first-step sum check compares with autograd's batch gradients: keep them for that pass
            self.engine.skip_ghost_parameter_gradients = not self._verify_next
            if self.augmentation_multiplicity > 1:  # each sample's views as rows, sample by sample
                micro = expand_views(micro, self.augmentation_multiplicity)
            output = super().training_step(micro, *rest, **kwargs)
            self._watch.refuse_changes("`training_step`")
            if not self._monitors_checked:
                self._monitors_checked = True
                warn_private_monitors(self.lightning_module.trainer)
            loss, mean_loss, self.engine.loss_scale = sum_of_losses(output, self._micro_batch_size, self.loss_reduction)
            if not loss.requires_grad:
                raise RuntimeError(
                    "DPStrategy: the loss returned by `training_step` does not depend on any trainable parameter: "
                    "it was computed under `torch.no_grad()`, from detached outputs, or inside "
                    "`lightning_sparta.privacy.input_gradients` (which hides the parameters: compute only the "
                    "input gradient there, and the loss you return after it)."
                )
            loss_sum = loss_sum + mean_loss * self._micro_batch_size
            if i < len(micro_batches) - 1:
                with self.engine.backward_pass():
                    loss.backward()
                self._watch.refuse_changes("the backward pass")
                self._clip_and_accumulate()
        # Backpropagate the sum of per-sample losses of the last micro-batch; show the batch's mean loss.
        return _replace_loss(output, loss + (loss_sum / size - loss.detach()))

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        model = model or self.lightning_module
        self._release_pending = optimizer
        try:
            with self.engine.capturing(), warnings.catch_warnings():
                # The first layer's input needs no gradient; its hook then fires on the output alone.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                closure_result = closure()
            if self._release_pending is not None:  # a closure that ran no backward pass through `backward`
                self._release(optimizer)
        finally:
            self._release_pending = None
        if self._step_optimizer:  # not a scoring step, or train_while_scoring: the release holds a gradient
            self.precision_plugin._after_closure(model, optimizer)  # on_before_optimizer_step hooks
            optimizer.step(**kwargs)
        self.accountant.step(noise_multiplier=self._noise_multiplier, sample_rate=self.sample_rate)
        if self._planned_end is not None and self.steps >= self._planned_end:
            self._stop_if_next_step_exceeds_target()
        return closure_result

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """The backward pass, then the step's release, then Lightning's ``on_after_backward`` hooks.

        After the backward pass, autograd's raw batch gradient (not private) sits on every parameter
        whose per-sample gradient comes from a grad sampler (norm layers, tokens, layers the ghost
        engine does not cover), and on all of them in the first step (the sum check reads it). The
        release (clipped sums plus one noise draw, or a scoring step) replaces it before
        ``on_after_backward`` runs, so a hook that logs gradient norms there sees the private gradient,
        as one in ``on_before_optimizer_step`` does.
        """
        if self._release_pending is None:
            if self.lightning_module.trainer.training:  # Lightning's closure, outside `optimizer_step`
                raise RuntimeError(
                    "DPStrategy: the training closure ran outside `optimizer.step(closure=...)`, or a second time "
                    "in one step (an `optimizer_step` override that calls `optimizer_closure()` itself): DP-SGD "
                    "forms one private gradient per step inside `optimizer.step`, and a backward pass anywhere "
                    "else leaves autograd's raw batch gradient for the optimizer. Call "
                    "`optimizer.step(closure=optimizer_closure)` once."
                )
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        with self.engine.backward_pass():
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        enabled, self.engine.enabled = self.engine.enabled, False  # the release runs no hooked pass
        try:
            self._release(self._release_pending)
        finally:
            self.engine.enabled = enabled
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # on_after_backward hooks
        self.post_backward(closure_loss)
        return closure_loss

    def _release(self, optimizer: Optimizer) -> None:
        """Clip the last micro-batch, then write the step's private gradient (or its scores)."""
        self._release_pending = None
        if self._watch is not None:
            self._watch.refuse_changes("the backward pass", checksum=True)
        refuse_unclipped_gradients(optimizer, self.engine.parameters, self.lightning_module)
        self._clip_and_accumulate()
        if self._scoring is not None:
            self._step_optimizer = self._score_step()  # train_while_scoring: the non-scored part is a gradient
        else:
            self._noisy_gradient()
            self._step_optimizer = True

    def _clip_and_accumulate(self) -> None:
        """Clip each sample's gradient to ``max_grad_norm`` and add it to the running sums.

        The clipping engine refuses per-token clipping (a batch dimension folded into another one),
        takes the per-sample norms, and adds ``Σ_i c_i g_i`` (while scoring: ``Σ_i c_i |g_i|`` of the
        scored parameters only) to the sums, in float32 whatever the parameters' dtype, so a clipped
        contribution stays within ``C`` up to float32 rounding under ``bf16-true`` too.
        """
        if self._micro_batch_size == 0:
            return
        engine = self.clipping_engine
        if self.augmentation_multiplicity > 1:
            engine.group_views(self.augmentation_multiplicity)
        engine.check_batch_dimension(self._micro_batch_size)
        norms = engine.squared_norms()
        finite = torch.isfinite(norms)
        if not bool(finite.all()):  # one sync per micro-batch; NaN or inf has no clipped form
            engine.leave_out(~finite)
            norms = engine.squared_norms()
            self._warn_non_finite()
        elif self._verify_next:  # autograd's batch gradient is NaN where a sample is: check at a finite step
            self._verify_per_sample_gradients()
        factors = (self.max_grad_norm / (norms.sqrt() + 1e-6)).clamp(max=1.0)
        scoring = self._scoring
        scored = list(scoring.parameters.values()) if scoring is not None else []
        engine.accumulate(
            self._summed,
            factors,
            absolute=scored if scoring is not None and scoring.absolute else (),
            unclipped=scored if scoring is not None and not scoring.private else (),  # true gradients, no noise
            # a scoring step uses the scored sums only, unless the rest trains from the same release
            only=scored if scoring is not None and not scoring.train else None,
        )
        engine.clear()

    def _warn_non_finite(self) -> None:
        if self._warned_non_finite:
            return
        self._warned_non_finite = True
        warnings.warn(
            "DPStrategy: a sample's gradient was not finite (NaN or inf) and was left out of the step's clipped "
            "sum (its contribution is zero, within the clipping bound); look for NaN or inf in the data or the "
            "loss. Said once per fit; like a training loss, this message depends on private data: do not publish "
            "it.",
            stacklevel=2,
        )

    def _verify_per_sample_gradients(self) -> None:
        """Check once per (re)attachment that per-sample gradients add up to the batch gradient.

        A parameter used outside the forward pass of the module that owns it (e.g. a temperature
        applied in ``training_step``) gets a wrong or missing per-sample gradient, and its update
        would not be private. The sum over the batch of correct per-sample gradients equals the
        ordinary gradient, so this check catches it on the first step.
        """
        self._verify_next = False
        # A parameter used outside its module's forward is off by O(1). Float rounding is not always far
        # below 1e-3: in timm's PoolFormer at 2x2 pixels the last stage's layer-scale gradient (of
        # `pool(x) - x`, nearly cancelling) is off by 2.5e-3 from float64 in autograd itself, and by
        # 3e-3 in the per-sample sum.
        tolerance = 5e-2 if self._low_precision else 1e-2
        wrong = self.clipping_engine.sums_not_adding_up(self.engine.loss_scale, tolerance)
        if wrong:
            raise RuntimeError(
                f"DPStrategy: per-sample gradients of {wrong} do not add up to their batch gradient: these parameters "
                "are used outside the forward pass of the module that owns them (or by a module whose grad sampler "
                "is wrong). Their updates would not be private; freeze them or move their use into a module's "
                "forward. A penalty on the weights added to the loss (L2 regularisation) is such a use: set the "
                "optimizer's `weight_decay` instead, which acts after the release and costs no privacy."
            )
        unused = self.clipping_engine.without_gradient()
        if unused:
            more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
            warnings.warn(
                f"DPStrategy: {len(unused)} trainable parameter(s) got no gradient in the first step: "
                f"{', '.join(f'`{name}`' for name in unused[:8])}{more}. DP-SGD adds noise to every trainable "
                "parameter at every step, so these change by noise alone. Freeze them (`requires_grad_(False)`) "
                "if the model does not use them (an auxiliary head, or a block behind "
                "`torch.utils.checkpoint(..., use_reentrant=True)` whose inputs need no gradient). The noise is "
                "the same whether they are used or not, so this costs no privacy; the message describes the first "
                "batch, so do not publish it.",
                stacklevel=2,
            )

    def _standard_noise(self, numel: int, device: torch.device) -> torch.Tensor | None:
        """``numel`` draws of N(0, 1) for the current step on rank 0, ``None`` elsewhere or when σ = 0."""
        if self.global_rank != 0 or not self._noise_multiplier:
            return None
        buffer = self._noise_buffer  # one model-sized float32 buffer, rewritten every step
        if buffer is None or buffer.numel() != numel or buffer.device != torch.device(device):
            buffer = self._noise_buffer = torch.empty(numel, device=device)
        if self.secure_mode:
            return secure_normal(numel, device=device, out=buffer)
        # keyed by the accounted step: a second fit or a resume continues the stream, never replays it
        return step_noise(numel, self._seed or 0, self.steps, device=device, out=buffer)

    def _released(self, tensors: list[torch.Tensor], noise: bool = True) -> list[torch.Tensor]:
        """The sums in float32 on the root device, plus ``N(0, σ²C²)`` once (unless ``noise=False``), all-reduced.

        One noise vector covers all the tensors, in their order, drawn on rank 0 only. On a single
        process nothing is concatenated: the noise is added to each sum in place (the sums are the
        engine's own tensors, dropped after the step), which saves three passes over the model's size.
        """
        out = [t.to(device=self.root_device, dtype=torch.float32) for t in tensors]
        if noise and out:
            z = self._standard_noise(sum(t.numel() for t in out), self.root_device)
            if z is not None:
                std = self._noise_multiplier * self.max_grad_norm
                for t, chunk in zip(out, z.split([t.numel() for t in out]), strict=True):
                    t.add_(chunk.view_as(t), alpha=std)
        if self.world_size > 1 and out:
            flat = torch.cat([t.reshape(-1) for t in out])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            out = [chunk.view_as(t) for t, chunk in zip(out, flat.split([t.numel() for t in out]), strict=True)]
        return out

    def add_clipped_sum_hook(
        self, fn: Callable[[list[nn.Parameter], list[torch.Tensor]], None], all_ranks: bool = False
    ) -> Callable[[], None]:
        """Call ``fn(params, sums)`` at every DP-SGD step, after clipping and before the noise is added.

        ``sums[k]`` is the clipped sum ``Σ_i clip_C(g_i)`` of ``params[k]`` (float32 or the parameter's
        dtype) and may be modified in place: whatever ``fn`` adds is noised, all-reduced and divided by
        ``q·n`` with the rest. The noise and the division then happen in these same tensors: copy what
        ``fn`` wants to keep. Used by :class:`~lightning_sparta.audit.PrivacyAuditCallback` to insert
        gradient canaries. Not called during SPARTA's scoring steps. Anything added changes the update
        and, unless it is bounded like a sample's clipped gradient, the privacy analysis.

        Args:
            fn: the hook.
            all_ranks: in DDP, ``False`` calls ``fn`` on rank 0 only, so what it adds is added once;
                ``True`` calls it on every rank with that rank's local sums (which are summed across
                ranks afterwards), e.g. to observe them.

        Returns:
            A function that removes the hook.
        """
        entry = (fn, bool(all_ranks))
        self._clipped_sum_hooks.append(entry)

        def remove() -> None:
            if entry in self._clipped_sum_hooks:
                self._clipped_sum_hooks.remove(entry)

        return remove

    def _noisy_gradient(self) -> None:
        params = self.engine.parameters
        sums = [self._summed.get(p, torch.zeros_like(p)) for p in params]
        for hook, all_ranks in list(self._clipped_sum_hooks):
            if all_ranks or self.global_rank == 0:
                hook(params, sums)
        for p, released in zip(params, self._released(sums), strict=True):
            p.grad = released.div_(self.expected_batch_size).view_as(p).to(p.dtype)
        self._summed.clear()

    # ------------------------------------------------------------------------------ SPARTA scoring
    def begin_scoring(
        self,
        parameters: dict[str, nn.Parameter],
        absolute: bool = True,
        private: bool = True,
        initial: dict[str, torch.Tensor] | None = None,
        train: bool = False,
    ) -> None:
        """Turn the following training steps into private scoring steps (SPARTA, Algorithm 1, eq. 11).

        Until :meth:`end_scoring`, every step computes for each parameter in ``parameters``
        ``Σ_i |g_i| · min(1, C/‖g_i‖)``, where ``‖g_i‖`` is the norm of sample ``i``'s gradient over
        *all* trainable parameters (exactly the vector a DP-SGD step would clip), adds
        ``N(0, σ²C²)`` to every coordinate (drawn once globally) and accumulates the result. No
        gradient reaches the optimizer, so no optimizer state (momentum included) changes. Each step
        is accounted as one DP-SGD step with the same (q, σ), as Prop. 4.1 of the paper states.

        Args:
            parameters: the scored parameters by name; they must be trainable while scoring.
            absolute: ``False`` sums the clipped *signed* gradients ``Σ_i g_i · min(1, C/‖g_i‖)``
                (plus the same noise): the DP-SGD gradient baseline, Algorithm 2 of the paper.
            private: ``False`` sums the true gradients (``Σ_i |g_i|`` with ``absolute=True``) without
                clipping or noise: the oracle mask of Algorithm 3. Such scores are NOT private; call
                :meth:`mark_not_private` too. Every step is still accounted.
            initial: sums accumulated by an earlier part of the same scoring epoch (from
                :attr:`scoring_sums` in a checkpoint), to continue after a mid-epoch resume.
            train: also train the other trainable parameters (the always-trainable set) from the same
                release, at no extra privacy cost. Each sample's gradient is clipped over the whole
                trainable set, so the per-batch vector ``(Σ_i |c_i g_i| on the scored weights,
                Σ_i c_i g_i on the rest)`` has sensitivity ``C``; one Gaussian noise vector
                ``N(0, σ²C²I)`` is added to all of it, which is exactly the mechanism a DP-SGD step is
                accounted as. The rest's part, divided by ``q·n``, is the gradient the optimizer
                steps with: post-processing of the same release. Needs ``private=True``.

        Raises:
            ValueError: if a scored parameter is frozen, scoring is already under way, or ``train``
                is asked for a non-private scoring.
        """
        if self._scoring is not None:
            raise ValueError("Scoring is already under way: call `end_scoring()` first.")
        self._scoring = Scoring(parameters, bool(absolute), bool(private), bool(train), dict(initial or {}))

    @property
    def scoring_sums(self) -> dict[str, torch.Tensor]:
        """The sums accumulated so far by the scoring under way (empty when not scoring)."""
        return dict(self._scoring.sums) if self._scoring is not None else {}

    def end_scoring(self) -> dict[str, torch.Tensor]:
        """Stop scoring and return the accumulated noisy sums (identical on every rank)."""
        if self._scoring is None:
            raise ValueError("`end_scoring()` called without `begin_scoring()`.")
        result, self._scoring = self._scoring.result(), None
        return result

    def _score_step(self) -> bool:
        """Release one scoring step; returns whether the other trainable parameters got a gradient.

        Without ``train`` nothing reaches the optimizer. With it, the scored part and the rest are
        released together with one noise draw (see :meth:`begin_scoring`).
        """
        scoring = self._scoring
        assert scoring is not None
        params = list(scoring.parameters.values())
        scored = {id(p) for p in params}
        rest = [p for p in self.engine.parameters if id(p) not in scored] if scoring.train else []
        sums = [self._summed.get(p, torch.zeros_like(p)) for p in [*params, *rest]]
        released = self._released(sums, noise=scoring.private)
        scoring.add(released[: len(params)])
        self._summed.clear()
        for p in self.engine.parameters:
            p.grad = None  # the scores never reach the optimizer
        for p, chunk in zip(rest, released[len(params) :], strict=True):
            p.grad = chunk.div_(self.expected_batch_size).view_as(p).to(p.dtype)
        return bool(rest)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the privacy accounting (and, unless in secure mode, the randomness).

        In secure mode the seed is left out: nothing in a checkpoint allows recomputing the noise or
        the batches.
        """
        return {
            "noise_multiplier": self._noise_multiplier,
            "history": list(self.accountant.history),
            "accountant": self.accountant_name,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "seed": None if self.secure_mode else self._seed,
            "secure_mode": self.secure_mode,
            "non_private_reason": self._non_private_reason,
        }

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            if state["accountant"] != self.accountant_name:
                raise ValueError(
                    f"The checkpoint was accounted with accountant={state['accountant']!r}, this strategy "
                    f"uses {self.accountant_name!r}: resume with the same accountant."
                )
            self._pending_state = self._rewound(state) if self.steps else state
        return checkpoint

    def _rewound(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state to resume when this strategy, whose history is not empty, loads a checkpoint.

        ``trainer.fit(model, ckpt_path=...)`` with an earlier checkpoint of this strategy's own run rewinds
        the weights, but the steps taken after that checkpoint were released (later checkpoints, logs)
        and stay in the accountant's history. Their noise and batches were keyed by the step and the
        epoch the rewind brings back, so the run continues on a new stream instead of replaying them.

        A checkpoint whose history extends this strategy's (the strategy was given a ``privacy_state`` that
        the checkpoint's run continued) is resumed as it is.

        Raises:
            ValueError: if the checkpoint's history is neither an earlier nor a later point of this one's.
        """
        own = [tuple(h) for h in self.accountant.history]
        theirs = [tuple(h) for h in state["history"]]
        if is_prefix(own, theirs) and not is_prefix(theirs, own):
            return state  # a later point of this history (a run that continued a `privacy_state`): adopt it
        if not is_prefix(theirs, own):
            raise ValueError(
                f"This DPStrategy already accounts {self.steps} steps, and the checkpoint comes from another run "
                f"(its accountant history {theirs} is neither an earlier nor a later point of this one's, {own}). "
                "Resume it with a new DPStrategy, and pass `privacy_state=` this strategy's `privacy_state()` to "
                "account for both runs."
            )
        discarded = self.steps - sum(int(n) for *_, n in theirs)
        if discarded == 0:
            return dict(state, history=own)
        self._seed = secrets.randbits(62) if self.secure_mode else rewound_seed(self._seed or 0, self.steps)
        rank_zero_user_warn(
            f"DPStrategy: resuming from an earlier checkpoint of this run, {discarded} steps back. The {discarded} "
            f"steps after it were released (their checkpoints and logs), so ε keeps counting all {self.steps}, "
            "and the noise and batches continue on a new stream instead of replaying theirs."
        )
        return dict(
            state,
            history=own,
            seed=None if self.secure_mode else self._seed,
            non_private_reason=self._non_private_reason or state.get("non_private_reason"),
        )

    @override
    def teardown(self) -> None:
        self._summed.clear()
        self._noise_buffer = None
        self.engine.clear()  # per-sample gradients of a step that did not finish
        self.engine.detach()
        if self._frozen_batchnorm is not None:  # BatchNorm behaves as the user's code expects again
            self._frozen_batchnorm.remove()
            self._frozen_batchnorm = None
        self._attached_params = None
        if self._saved_minimums is not None:  # give the Trainer back the minimums lowered to stop at the target
            trainer = self.lightning_module.trainer if self._lightning_module is not None else None
            if trainer is not None:
                restore_minimums(trainer, self._saved_minimums)
            self._saved_minimums = None
        if self._malloc_tuned:
            release_freed_memory()
            self._malloc_tuned = False
        super().teardown()


def _validate_arguments(
    *,
    noise_multiplier: Any,
    target_epsilon: Any,
    max_grad_norm: Any,
    epsilon_tolerance: Any,
    accountant: Any,
    physical_batch_size: Any,
    augmentation_multiplicity: Any,
    loss_reduction: Any,
    batchnorm: Any,
    seed: Any,
    secure_mode: Any,
    tune_malloc: Any,
) -> float:
    """Refuse bad ``DPStrategy`` arguments with a message naming each; returns the epsilon tolerance."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "Give exactly one of `noise_multiplier` and `target_epsilon`, got "
            f"noise_multiplier={noise_multiplier!r} and target_epsilon={target_epsilon!r}."
        )
    if noise_multiplier is not None:
        _check_number("noise_multiplier", noise_multiplier, minimum=0.0, inclusive=True)
        if noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: no noise is added and the run is NOT differentially private "
                "(ε = inf). Use this for debugging only.",
                UserWarning,
                stacklevel=3,
            )
    if target_epsilon is not None:
        _check_number("target_epsilon", target_epsilon, minimum=0.0)
        validate_target_epsilon(target_epsilon)  # at most MAX_TARGET_EPSILON, with a message saying why
    _check_number("max_grad_norm", max_grad_norm, minimum=0.0)
    epsilon_tolerance = validate_epsilon_tolerance(epsilon_tolerance, target_epsilon)
    if accountant not in ACCOUNTANT_NAMES:
        raise ValueError(f"`accountant` must be one of {list(ACCOUNTANT_NAMES)}, got {accountant!r}.")
    if physical_batch_size is not None and (
        not isinstance(physical_batch_size, int) or isinstance(physical_batch_size, bool) or physical_batch_size < 1
    ):
        raise ValueError(f"`physical_batch_size` must be a positive integer or None, got {physical_batch_size!r}.")
    if (
        not isinstance(augmentation_multiplicity, int)
        or isinstance(augmentation_multiplicity, bool)
        or augmentation_multiplicity < 1
    ):
        raise ValueError(f"`augmentation_multiplicity` must be a positive integer, got {augmentation_multiplicity!r}.")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"`loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}.")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"`batchnorm` must be one of {list(BATCHNORM_MODES)}, got {batchnorm!r}.")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"`seed` must be a non-negative integer or None, got {seed!r}.")
    if not isinstance(secure_mode, bool):
        raise ValueError(f"`secure_mode` must be True or False, got {secure_mode!r}.")
    if not isinstance(tune_malloc, bool):
        raise ValueError(f"`tune_malloc` must be True or False, got {tune_malloc!r}.")
    if secure_mode and seed is not None:
        raise ValueError(
            f"`secure_mode=True` draws its randomness from the operating system and cannot use `seed={seed!r}`: "
            "a known seed would let anyone recompute the noise. Pass seed=None."
        )
    return epsilon_tolerance


def _replace_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, dict):
        return {**output, "loss": loss}
    return loss


def _check_number(name: str, value: Any, minimum: float, inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < minimum if inclusive else value <= minimum):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")


__all__ = ["DPStrategy"]
