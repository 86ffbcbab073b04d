"""Audit a private run from the run itself: canaries in, an empirical ε lower bound out.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023): see
:mod:`lightning_sparta.audit.bounds` for the theorem and what a lower bound proves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import Dataset, default_collate
from typing_extensions import override

from lightning_sparta.audit.bounds import AuditResult, count_correct_guesses, epsilon_lower_bound
from lightning_sparta.audit.canaries import CanaryDataset
from lightning_sparta.privacy.accountant import validate_delta
from lightning_sparta.strategy import DPStrategy

GradientScore = Literal["update", "increments"]
_GRADIENT_SCORES: tuple[str, ...] = ("update", "increments")

__all__ = ["PrivacyAuditCallback"]


class PrivacyAuditCallback(Callback):
    """Insert canaries into a :class:`~lightning_sparta.DPStrategy` run and report an empirical ε lower bound.

    The one-run audit of Steinke, Nasr & Jagielski (NeurIPS 2023): each of ``m`` canaries is included
    with probability 1/2; after training the ``k+`` canaries with the highest scores are guessed
    "included", the ``k-`` lowest "excluded" (``k+ = k- = round(guess_fraction·m/2)``), and the number of
    correct guesses becomes an ε lower bound at ``delta`` with probability ``confidence`` through the
    paper's main theorem (:func:`~lightning_sparta.audit.bounds.epsilon_lower_bound`). At the end of
    fitting the bound is logged to every logger next to the accountant's ε and printed in a summary;
    :attr:`results` holds it.

    **Gradient canaries** (white box, ``gradient_canaries=m``): canary ``j`` is a Dirac gradient of norm
    ``C`` (``max_grad_norm``) on one coordinate of a trainable parameter, distinct per canary, chosen at
    random at the first DP-SGD step among ``canary_parameters`` (default: every parameter trained at that
    step). At every DP-SGD step each *included* canary enters the step independently with the run's rate
    ``q`` and its gradient is added to the clipped sum before the noise
    (:meth:`DPStrategy.add_clipped_sum_hook`): exactly what a sample whose clipped gradient is that
    Dirac would do. The auditor observes each step's private gradient at the canary coordinates (times
    ``q·n``) minus the clipped data sum there (which does not depend on the canaries: it is fixed by the
    current weights and the Poisson batch), i.e. canary contributions plus noise. Scores (``gradient_scores``):

    * ``"update"``: the sum over steps: the inner product of the canary direction with the total update
      (SGD), the paper's white-box score;
    * ``"increments"``: the sum over steps of ``|x_t - x_{t-1}|``; it catches noise that repeats across
      steps, which the sum cannot see.

    With several scores each bound is computed at confidence ``1 - (1-confidence)/len(gradient_scores)``
    (Bonferroni) and the largest is reported, so the reported bound still holds with ``confidence``.
    Canaries skip the steps at which their parameter is not trained (e.g. replaced by SPARTA's sparse
    layers), and SPARTA's scoring steps (no update).

    **Input canaries** (black box, ``input_canaries=m``): ``m`` examples of the training set, mislabelled
    (a random other class), each kept with probability 1/2 and otherwise removed: apply
    :meth:`wrap_dataset` to the training dataset. Score: the model's log-probability of the wrong label at
    the end of training (``input_score_fn`` to change it).

    **Cost.** Gradient canaries: ``q·m/2`` extra "samples" per step in expectation; their gradients move
    the model (each included canary pushes its coordinate by ``lr·C/(q·n)`` when it enters a step) and
    take clipping budget like a sample of norm ``C``; ``n`` and ``q`` are unchanged. Input canaries:
    about ``m/2`` mislabelled examples replace ``m`` real ones, so ``n`` (hence ``q = batch_size/n``, and
    the σ calibrated for a target ε) changes slightly with the number of canaries drawn in; the
    accountant's ε is that of the run as it trained. Scoring the input canaries costs one forward pass
    over ``m`` examples at the end. Every canary perturbs training: audit a copy of a run, not the model
    you ship.

    **What the bound means.** With probability at least ``confidence``, the run is *not* (ε, δ)-DP for
    any ε below the bound. A bound above the accountant's ε is evidence of a bug (missing or repeated
    noise, clipping that does not bound a sample's contribution). A bound far below it is the normal
    outcome of one honest run and proves nothing: one-run audits are loose for DP-SGD, and the canaries
    probe only what they probe (gradient canaries test noise and clipping of the sum, not per-sample
    clipping of real data; input canaries test the whole pipeline with one kind of example).

    Args:
        gradient_canaries: number of gradient canaries (0: none).
        input_canaries: number of input canaries (0: none; otherwise :meth:`wrap_dataset` is required).
        guess_fraction: fraction of the canaries guessed (half "in", half "out"); the rest abstain.
        confidence: probability that the reported bound holds.
        delta: δ of the bound; the strategy's ``target_delta`` by default.
        gradient_scores: which white-box scores to use (see above).
        canary_parameters: names of the parameters that may hold gradient canaries (default: all trained).
        input_score_fn: ``fn(pl_module, batch) -> Tensor[m]`` scoring collated canary items (higher: more
            likely included). Default: log-softmax of ``pl_module(batch[0])`` at the canary label.
        seed: seed of the canaries' inclusion, coordinates, labels and sampling (identical on every rank).

    Raises:
        ValueError: for a bad argument, naming it.

    Example:
        >>> audit = PrivacyAuditCallback(gradient_canaries=500)
        >>> audit.num_guesses("gradient")
        250
    """

    def __init__(
        self,
        gradient_canaries: int = 1000,
        input_canaries: int = 0,
        guess_fraction: float = 0.5,
        confidence: float = 0.95,
        delta: float | None = None,
        gradient_scores: Sequence[GradientScore] = _GRADIENT_SCORES,  # type: ignore[assignment]
        canary_parameters: Sequence[str] | None = None,
        input_score_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (("gradient_canaries", gradient_canaries), ("input_canaries", input_canaries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if gradient_canaries == 0 and input_canaries == 0:
            raise ValueError("Give `gradient_canaries` or `input_canaries` (> 0): there is nothing to audit.")
        if (
            isinstance(guess_fraction, bool)
            or not isinstance(guess_fraction, (int, float))
            or not 0 < guess_fraction <= 1
        ):
            raise ValueError(f"`guess_fraction` must be a number in (0, 1], got {guess_fraction!r}.")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise ValueError(f"`confidence` must be a number in (0, 1), got {confidence!r}.")
        scores = tuple(gradient_scores)
        if not scores or any(s not in _GRADIENT_SCORES for s in scores) or len(set(scores)) != len(scores):
            raise ValueError(
                f"`gradient_scores` must be distinct names among {list(_GRADIENT_SCORES)}, got {scores!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
        self.gradient_canaries = gradient_canaries
        self.input_canaries = input_canaries
        self.guess_fraction = float(guess_fraction)
        self.confidence = float(confidence)
        self.delta = None if delta is None else validate_delta(delta, "delta")
        self.gradient_scores: tuple[str, ...] = scores
        self.canary_parameters = None if canary_parameters is None else list(canary_parameters)
        self.input_score_fn = input_score_fn
        self.seed = seed
        streams = np.random.SeedSequence(seed).spawn(4)
        # S: which canaries are included (drawn once, before anything else, independent of everything else)
        self.gradient_included = np.random.default_rng(streams[0]).random(gradient_canaries) < 0.5
        self.input_included = np.random.default_rng(streams[1]).random(input_canaries) < 0.5
        self._coordinate_seed = int(streams[2].generate_state(1)[0])
        self._sampling = torch.Generator().manual_seed(int(streams[3].generate_state(1)[0]))
        self.results: list[AuditResult] = []
        self.dataset: CanaryDataset | None = None
        # gradient canaries: coordinates (parameter name -> (canary ids, flat indices)) and running scores
        self.coordinates: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._update = np.zeros(gradient_canaries)
        self._increments = np.zeros(gradient_canaries)
        self._last = np.full(gradient_canaries, np.nan)
        self.observed_steps = 0
        self._pending: dict[str, Any] | None = None  # what the clipped-sum hook saw at this step
        self._remove_hook: Callable[[], None] | None = None
        self._names: tuple[tuple[int, ...], dict[int, str]] | None = None

    # ------------------------------------------------------------------------------ set-up
    def num_guesses(self, kind: Literal["gradient", "input"]) -> int:
        """``r = k+ + k-``, the guesses made among the canaries of ``kind``."""
        m = self.gradient_canaries if kind == "gradient" else self.input_canaries
        return 2 * self._k(m)

    def _k(self, m: int) -> int:
        return min(m // 2, round(self.guess_fraction * m / 2))

    def wrap_dataset(self, dataset: Dataset, num_classes: int, label_index: int = 1) -> CanaryDataset:
        """The training dataset with the input canaries: apply it to the dataset the training loader reads.

        ``input_canaries`` examples of ``dataset`` are chosen at random (from ``seed``), relabelled with a
        random other class among ``num_classes`` and kept with probability 1/2; the others are removed.
        Deterministic, so every DDP rank builds the same dataset.

        Args:
            dataset: a map-style dataset whose items are tuples with the label at ``label_index``.
            num_classes: number of classes (labels are ``0 .. num_classes-1``).
            label_index: position of the label in an item.

        Raises:
            ValueError: without input canaries, or when the dataset is too small.
        """
        if self.input_canaries == 0:
            raise ValueError("`wrap_dataset` needs `input_canaries` > 0.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        n = len(dataset)  # type: ignore[arg-type]
        if n < 2 * self.input_canaries:
            raise ValueError(f"The dataset has {n} examples, too few for {self.input_canaries} input canaries.")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x696E]))
        indices = rng.choice(n, size=self.input_canaries, replace=False)
        labels = []
        for i in indices:
            label = dataset[int(i)][label_index]
            true = int(label.item() if isinstance(label, torch.Tensor) else label)
            labels.append((true + 1 + int(rng.integers(num_classes - 1))) % num_classes)
        self.dataset = CanaryDataset(dataset, indices, labels, self.input_included, label_index=label_index)
        return self.dataset

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, DPStrategy):
            raise TypeError(
                "PrivacyAuditCallback needs `Trainer(strategy=DPStrategy(...))`, found "
                f"{type(trainer.strategy).__name__}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results = []
        self._trainer_ref: pl.Trainer | None = trainer
        if self.gradient_canaries and self._remove_hook is None:
            self._remove_hook = trainer.strategy.add_clipped_sum_hook(self._insert_canaries, all_ranks=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.input_canaries:
            loader = trainer.train_dataloader
            if self.dataset is None or getattr(loader, "dataset", None) is not self.dataset:
                raise ValueError(
                    f"PrivacyAuditCallback(input_canaries={self.input_canaries}): the training DataLoader does not "
                    "read the dataset returned by `audit.wrap_dataset(...)`. Build the training loader on "
                    "`audit.wrap_dataset(train_set, num_classes=...)`."
                )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._remove_hook is not None:
            self._remove_hook()
            self._remove_hook = None
        self._trainer_ref = None

    # ------------------------------------------------------------------------------ gradient canaries
    def _parameter_names(self, model: nn.Module, params: list[nn.Parameter]) -> dict[int, str]:
        key = tuple(id(p) for p in params)
        if self._names is None or self._names[0] != key:
            self._names = (key, {id(p): n for n, p in model.named_parameters()})
        return self._names[1]

    def _choose_coordinates(self, named: dict[str, nn.Parameter]) -> None:
        allowed = [n for n in named if self.canary_parameters is None or n in self.canary_parameters]
        sizes = np.array([named[n].numel() for n in allowed], dtype=np.int64)
        total = int(sizes.sum())
        if total < self.gradient_canaries:
            raise ValueError(
                f"PrivacyAuditCallback: {self.gradient_canaries} gradient canaries need as many distinct coordinates, "
                f"but the parameters trained at the first step ({len(allowed)} of them) have {total}. Lower "
                "`gradient_canaries` or widen `canary_parameters`."
            )
        rng = np.random.default_rng(self._coordinate_seed)
        flat = rng.choice(total, size=self.gradient_canaries, replace=False)
        owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.coordinates = {}
        for k, name in enumerate(allowed):
            ids = np.flatnonzero(owner == k)
            if len(ids):
                self.coordinates[name] = (ids, flat[ids] - offsets[k])

    def _insert_canaries(self, params: list[nn.Parameter], sums: list[torch.Tensor]) -> None:
        """The clipped-sum hook: note the data sums at the canary coordinates, add the sampled canaries (rank 0)."""
        trainer = self._trainer
        strategy: DPStrategy = trainer.strategy
        names = self._parameter_names(trainer.lightning_module, params)
        named = {names[id(p)]: (p, s) for p, s in zip(params, sums, strict=True) if id(p) in names}
        if self.coordinates is None:
            self._choose_coordinates({n: p for n, (p, _) in named.items()})
        assert self.coordinates is not None
        # one uniform per canary per step, whatever is active: the sampling stream does not depend on S
        entered = (torch.rand(self.gradient_canaries, generator=self._sampling) < float(strategy.sample_rate)).numpy()
        data = np.zeros(self.gradient_canaries)
        active = np.zeros(self.gradient_canaries, dtype=bool)
        step_params: dict[str, nn.Parameter] = {}
        for name, (ids, index) in self.coordinates.items():
            if name not in named:
                continue  # not trained at this step: the canary is neither inserted nor observed
            p, total = named[name]
            if not total.is_contiguous():
                raise RuntimeError(f"PrivacyAuditCallback: the clipped sum of `{name}` is not contiguous.")
            flat = total.view(-1)
            where = torch.as_tensor(index, device=flat.device)
            data[ids] = flat[where].double().cpu().numpy()
            active[ids] = True
            step_params[name] = p
            if trainer.global_rank == 0:
                add = self.gradient_included[ids] & entered[ids]
                if add.any():
                    flat[where[torch.as_tensor(add, device=flat.device)]] += strategy.max_grad_norm
        self._pending = {"data": data, "active": active, "params": step_params}

    @property
    def _trainer(self) -> pl.Trainer:
        trainer = getattr(self, "_trainer_ref", None)
        if trainer is None:
            raise RuntimeError("PrivacyAuditCallback is not attached to a running Trainer.")
        return trainer

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self.coordinates is None:
            return
        strategy: DPStrategy = trainer.strategy
        data = torch.as_tensor(pending["data"], dtype=torch.float64)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            data = data.to(strategy.root_device)
            dist.all_reduce(data, op=dist.ReduceOp.SUM)  # every rank steps together: no hang
            data = data.cpu()
        observed = np.zeros(self.gradient_canaries)
        for name, p in pending["params"].items():
            ids, index = self.coordinates[name]
            if p.grad is None:
                continue
            grad = p.grad.detach().reshape(-1)[torch.as_tensor(index, device=p.grad.device)]
            observed[ids] = grad.double().cpu().numpy() * strategy.expected_batch_size
        active = pending["active"]
        x = observed - data.numpy()  # canaries that entered (rank 0) + noise
        self._update[active] += x[active]
        seen = active & ~np.isnan(self._last)
        self._increments[seen] += np.abs(x[seen] - self._last[seen])
        self._last[active] = x[active]
        self.observed_steps += 1

    # ------------------------------------------------------------------------------ results
    def gradient_scores_of(self, score: GradientScore) -> np.ndarray:
        """The gradient canaries' scores so far (``"update"`` or ``"increments"``)."""
        return (self._update if score == "update" else self._increments).copy()

    @torch.no_grad()
    def input_scores(self, pl_module: pl.LightningModule, batch_size: int = 256) -> np.ndarray:
        """Scores of the input canaries under the current model (higher: more likely included)."""
        if self.dataset is None:
            raise ValueError("No input canaries: call `wrap_dataset` first.")
        was_training = pl_module.training
        pl_module.eval()
        try:
            scores = []
            for start in range(0, self.input_canaries, batch_size):
                items = [self.dataset.canary(j) for j in range(start, min(start + batch_size, self.input_canaries))]
                batch = default_collate(items)
                if self.input_score_fn is not None:
                    s = self.input_score_fn(pl_module, batch)
                else:
                    logits = pl_module(batch[0].to(pl_module.device))
                    labels = batch[self.dataset.label_index].to(logits.device).long().reshape(-1, 1)
                    s = F.log_softmax(logits.float(), dim=-1).gather(1, labels).squeeze(1)
                scores.append(torch.as_tensor(s).detach().double().cpu().reshape(-1))
            return torch.cat(scores).numpy()
        finally:
            pl_module.train(was_training)

    def _result(
        self, kind: str, scores: np.ndarray, included: np.ndarray, confidence: float, eps: float, delta: float
    ) -> AuditResult:
        k = self._k(len(scores))
        r, v = count_correct_guesses(scores, included, k, k, tie_break_seed=self.seed)
        bound = epsilon_lower_bound(r, v, delta=delta, confidence=confidence, num_canaries=len(scores))
        return AuditResult(kind, len(scores), r, v, delta, confidence, bound, eps)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[AuditResult]:
        """Guess, count and bound: one result per score (gradient scores) and one for input canaries."""
        strategy: DPStrategy = trainer.strategy
        delta = self.delta if self.delta is not None else strategy.target_delta
        eps = strategy.epsilon(delta) if strategy.sample_rate is not None else math.nan
        results = []
        if self.gradient_canaries and self.observed_steps:
            corrected = 1 - (1 - self.confidence) / len(self.gradient_scores)
            for score in self.gradient_scores:
                values = self.gradient_scores_of(score)  # type: ignore[arg-type]
                results.append(self._result(f"gradient/{score}", values, self.gradient_included, corrected, eps, delta))
        if self.input_canaries and self.dataset is not None:
            values = self.input_scores(pl_module)
            results.append(self._result("input", values, self.input_included, self.confidence, eps, delta))
        return results

    def best(self, kind: Literal["gradient", "input"]) -> AuditResult | None:
        """The largest bound among the results of ``kind`` (holds with ``confidence``), or ``None``."""
        found = [r for r in self.results if r.kind.split("/")[0] == kind]
        return max(found, key=lambda r: r.epsilon_lower_bound) if found else None

    def metrics(self) -> dict[str, float]:
        """What is logged: per kind the bound, the guesses and the correct guesses; ε of the accountant."""
        out: dict[str, float] = {}
        for result in self.results:
            key = f"audit/{result.kind}"
            out[f"{key}/epsilon_lower_bound"] = result.epsilon_lower_bound
            out[f"{key}/correct"] = float(result.num_correct)
            out[f"{key}/guesses"] = float(result.num_guesses)
        for kind in ("gradient", "input"):
            best = self.best(kind)  # type: ignore[arg-type]
            if best is not None:
                out[f"audit/{kind}_epsilon_lower_bound"] = best.epsilon_lower_bound
        if self.results:
            out["audit/epsilon_accountant"] = self.results[0].epsilon_accountant
            out["audit/delta"] = self.results[0].delta
            out["audit/confidence"] = self.confidence
        return out

    def summary(self) -> str:
        """The audit next to the accountant's ε, as printed at the end of fitting."""
        if not self.results:
            return "Privacy audit: no result (no DP-SGD step was observed)."
        first = self.results[0]
        eps = first.epsilon_accountant
        lines = [
            f"Privacy audit (one run; Steinke, Nasr & Jagielski 2023) at δ = {first.delta:g}, "
            f"confidence {self.confidence:.0%}",
            f"  accountant:        ε = {eps:.3f}"
            if math.isfinite(eps)
            else "  accountant:        ε = inf (NOT PRIVATE)",
        ]
        for kind, label in (("gradient", "gradient canaries"), ("input", "input canaries")):
            best = self.best(kind)  # type: ignore[arg-type]
            if best is None:
                continue
            flag = "" if best.consistent else "  <-- ABOVE the accountant's ε: the run leaks more than it reports"
            lines.append(
                f"  {label + ':':<18} ε ≥ {best.epsilon_lower_bound:.3f} (m = {best.num_canaries}, "
                f"{best.num_correct}/{best.num_guesses} guesses right, score {best.kind}){flag}"
            )
        lines.append("  (a lower bound: above ε it shows a bug; below ε it proves nothing)")
        return "\n".join(lines)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results = self.compute(trainer, pl_module)
        metrics = self.metrics()
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        for result in self.results:
            if not result.consistent:
                rank_zero_warn(
                    f"PrivacyAuditCallback: the empirical lower bound ε ≥ {result.epsilon_lower_bound:.3f} "
                    f"({result.kind} canaries) exceeds the accountant's ε = {result.epsilon_accountant:.3f}."
                )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.summary())

    # ------------------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "coordinates": None
            if self.coordinates is None
            else {n: (ids.tolist(), idx.tolist()) for n, (ids, idx) in self.coordinates.items()},
            "update": self._update.tolist(),
            "increments": self._increments.tolist(),
            "last": self._last.tolist(),
            "observed_steps": self.observed_steps,
            "sampling": self._sampling.get_state(),
            "seed": self.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed:
            raise ValueError(
                f"The checkpoint's audit used seed={state_dict.get('seed')!r}, this callback seed={self.seed}: "
                "resume with the same seed (the canaries' inclusion depends on it)."
            )
        coords = state_dict["coordinates"]
        self.coordinates = (
            None
            if coords is None
            else {
                n: (np.asarray(ids, dtype=np.int64), np.asarray(idx, dtype=np.int64))
                for n, (ids, idx) in coords.items()
            }
        )
        self._update = np.asarray(state_dict["update"], dtype=np.float64)
        self._increments = np.asarray(state_dict["increments"], dtype=np.float64)
        self._last = np.asarray(state_dict["last"], dtype=np.float64)
        self.observed_steps = int(state_dict["observed_steps"])
        self._sampling.set_state(state_dict["sampling"])
