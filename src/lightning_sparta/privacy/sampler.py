"""Poisson sampling of the training set, on one device or across DDP ranks.

The privacy analysis of DP-SGD (the sampled Gaussian mechanism) assumes that every example enters
each logical batch independently with probability ``q``. :class:`PoissonBatchSampler` draws that
batch from a generator keyed by ``(seed, epoch, step)``, so

* every rank draws the *same* global batch and keeps the slice ``batch[rank::world_size]``: the
  union over ranks is exactly one Poisson sample of the whole data set;
* every rank runs the same number of steps, empty batches included (an empty batch is a valid
  step: the update is noise only), so DDP never hangs on unequal step counts;
* each epoch draws fresh batches, and a run resumed from a checkpoint draws the same ones again.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)

from lightning_sparta._logging import warn


def steps_per_epoch(sample_rate: float) -> int:
    """Number of Poisson steps that make one epoch: ``round(1 / q)``, at least 1.

    Example:
        >>> steps_per_epoch(256 / 50_000)
        195
    """
    return max(1, round(1.0 / sample_rate))


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler that draws Poisson batches with rate ``sample_rate``.

    Args:
        num_samples: size ``n`` of the (global) training set.
        sample_rate: probability ``q`` that an example enters a logical batch.
        seed: base seed shared by all ranks; the draws depend only on ``(seed, epoch, step)``.
        num_replicas: number of DDP ranks.
        rank: this process' rank.
        steps: steps per epoch; ``round(1 / q)`` by default.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=1000, sample_rate=0.1, seed=0)
        >>> len(sampler)
        10
        >>> batches = list(sampler)
        >>> 50 < sum(map(len, batches)) / len(batches) < 150
        True
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        steps: int | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"`num_samples` must be positive, got {num_samples}.")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, num_replicas={num_replicas}), got {rank}.")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.steps = steps if steps is not None else steps_per_epoch(sample_rate)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, step) where the next iteration starts

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration draws (Lightning calls this)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, step: int) -> None:
        """Make the next iteration draw epoch ``epoch`` from step ``step`` on (resume from a checkpoint).

        The resumed position wins over the epoch set by :meth:`set_epoch` for that one iteration: after a
        checkpoint written at the last batch of an epoch, Lightning creates the first iterator before it
        moves its own epoch counter on.
        """
        self._resume = (int(epoch), int(step))

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """The indices of the union of all ranks' batches at ``(epoch, step)``."""
        rng = np.random.default_rng([self.seed, epoch, step])
        return np.flatnonzero(rng.random(self.num_samples) < self.sample_rate)

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume is not None:
            self.epoch, start = self._resume
        self._resume = None
        for step in range(start, self.steps):
            yield self.global_batch(self.epoch, step)[self.rank :: self.num_replicas].tolist()

    def __len__(self) -> int:
        return self.steps


class EmptyBatchCollate:
    """Wraps a collate function so that an empty list of indices gives a batch of size 0.

    The empty batch has the structure, dtypes and trailing shapes of a real one (it is a real
    batch of one example, sliced to zero rows), so the training step can recognise it.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) > 0:
            return self.collate_fn(samples)
        return _slice_batch(self.collate_fn([self.dataset[0]]), 0, 0)


def map_batch(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor with a leading dimension in a (nested) batch; other leaves are kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return type(batch)((k, map_batch(v, fn)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_batch(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_batch(v, fn) for v in batch)
    return batch


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a (nested) batch; other leaves are kept."""
    return map_batch(batch, lambda t: t[start:stop])


def batch_size_of(batch: Any) -> int:
    """The leading dimension of the first tensor found in a (nested) batch.

    Raises:
        ValueError: if the batch holds no tensor with a batch dimension.
    """
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return batch.shape[0]
    values = list(batch.values()) if isinstance(batch, dict) else batch
    if isinstance(values, (list, tuple)):
        for value in values:
            try:
                return batch_size_of(value)
            except ValueError:
                continue
    raise ValueError(f"Cannot find the batch size of a batch of type {type(batch).__name__}.")


def expand_views(batch: Any, views: int) -> Any:
    """A batch of ``B`` samples with ``views`` augmented views each, as ``B·views`` rows, sample by sample.

    The first tensor of the (tuple or list) batch holds the views, ``[B, views, ...]``, and becomes
    ``[B·views, ...]`` (sample 0's views first); every other tensor with ``B`` rows is repeated for each
    view (``repeat_interleave``), anything else is passed as it is.

    Raises:
        ValueError: if the batch is not a tuple or list whose first element is a ``[B, views, ...]`` tensor.

    Example:
        >>> x, y = expand_views((torch.arange(6).view(2, 3, 1), torch.tensor([7, 8])), 3)
        >>> x.flatten().tolist(), y.tolist()
        ([0, 1, 2, 3, 4, 5], [7, 7, 7, 8, 8, 8])
    """
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else None
    if not isinstance(first, torch.Tensor) or first.dim() < 2 or first.shape[1] != views:
        found = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first if first is not None else batch)
        raise ValueError(
            f"DPStrategy(augmentation_multiplicity={views}) needs a training batch (a tuple or list) whose first "
            f"tensor holds each sample's views, [B, {views}, ...]; found {found!r}. Stack the views in the dataset "
            "(e.g. `torch.stack([transform(image) for _ in range(K)])`)."
        )
    samples = first.shape[0]
    rest = [
        t.repeat_interleave(views, dim=0)
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == samples
        else t
        for t in batch[1:]
    ]
    expanded = [first.flatten(0, 1), *rest]
    return expanded if isinstance(batch, list) else tuple(expanded)


def split_batch(batch: Any, micro_batch_size: int) -> list[Any]:
    """Split a (nested) batch along its first dimension into micro-batches of at most the given size."""
    size = batch_size_of(batch)
    if size <= micro_batch_size:
        return [batch]
    return [_slice_batch(batch, i, i + micro_batch_size) for i in range(0, size, micro_batch_size)]


_DEFAULT_SAMPLERS = (RandomSampler, SequentialSampler)


def expected_batch_size(dataloader: DataLoader) -> int:
    """The expected Poisson batch size the user asked for, warning about any sampler that is replaced.

    ``batch_size`` when the loader has one; otherwise the ``batch_size`` of the user's ``batch_sampler``.
    ``shuffle`` and ``drop_last`` have no meaning under Poisson sampling and are ignored.
    """
    user_batch_sampler = dataloader.batch_size is None and dataloader.batch_sampler is not None
    batch_size = getattr(dataloader.batch_sampler, "batch_size", None) if user_batch_sampler else dataloader.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        where = f"its batch_sampler {type(dataloader.batch_sampler).__name__}" if user_batch_sampler else "it"
        raise ValueError(
            f"The training DataLoader has no usable `batch_size` (found {batch_size!r} on {where}): DPStrategy "
            "derives the sampling rate q = batch_size / len(dataset) from it. Give the DataLoader a `batch_size`."
        )
    sampler = _users_sampler(dataloader)
    replaced = []
    if user_batch_sampler:
        kind = type(dataloader.batch_sampler).__name__
        replaced.append(f"batch_sampler {kind} (its batch_size={batch_size} is kept)")
    if sampler is not None and not isinstance(sampler, _DEFAULT_SAMPLERS):
        replaced.append(f"sampler {type(sampler).__name__}")
    elif isinstance(sampler, RandomSampler) and (
        sampler.replacement or sampler.num_samples != len(sampler.data_source)
    ):
        replaced.append("sampler RandomSampler (with `replacement` or `num_samples`)")
    if replaced:
        over = (
            f" over its {len(sampler.indices)} indices (q = {batch_size} / {len(sampler.indices)})"
            if isinstance(sampler, SubsetRandomSampler)
            else ""
        )
        warn(
            f"DPStrategy: the training DataLoader's {' and '.join(replaced)} is replaced by uniform Poisson "
            f"sampling{over} with expected batch size {batch_size}: the privacy analysis needs every example to "
            "enter each batch independently with the same probability. Weighting, class balancing or any other "
            "sampling order is not applied."
        )
    return batch_size


def _users_sampler(dataloader: DataLoader) -> Sampler | None:
    """The loader's sampler, or its own ``batch_sampler``'s."""
    if dataloader.batch_size is None and dataloader.batch_sampler is not None:
        return getattr(dataloader.batch_sampler, "sampler", None)
    return dataloader.sampler


def _examples(dataset: Dataset) -> list[tuple[int, int]] | None:
    """``(id of the dataset it comes from, index there)`` of every example, through ``Subset`` and
    ``ConcatDataset``; ``None`` for a dataset that holds its examples itself."""
    if isinstance(dataset, Subset):
        inner = _examples(dataset.dataset)
        indices = [int(i) for i in dataset.indices]
        return [inner[i] for i in indices] if inner is not None else [(id(dataset.dataset), i) for i in indices]
    if isinstance(dataset, ConcatDataset):
        out: list[tuple[int, int]] = []
        for part in dataset.datasets:
            inner = _examples(part)
            out += inner if inner is not None else [(id(part), i) for i in range(len(part))]  # type: ignore[arg-type]
        return out
    return None


def check_no_repeated_examples(dataset: Dataset) -> None:
    """Refuse a training set in which an example appears more than once (through ``Subset`` indices,
    ``ConcatDataset`` parts or a ``SubsetRandomSampler``).

    A repeated example is drawn once per copy in every Poisson step and contributes up to ``k·C``: the
    guarantee would hold for none of its copies (only group privacy of size ``k``).

    Raises:
        ValueError: naming the example.
    """
    examples = _examples(dataset)
    if examples is None or len(set(examples)) == len(examples):
        return
    seen: set[tuple[int, int]] = set()
    for example in examples:
        if example in seen:
            break
        seen.add(example)
    raise ValueError(
        f"DPStrategy: example {example[1]} of the underlying dataset appears more than once in the training set "
        "(repeated `Subset` or `SubsetRandomSampler` indices, or a dataset concatenated with itself, as for "
        "oversampling): each copy is drawn on its own, so that example could contribute several clipped "
        "gradients per step and the guarantee would not hold for it. Keep each example once; weighting or "
        "oversampling is not compatible with uniform Poisson sampling."
    )


def training_set_fingerprint(dataset: Dataset, batch_size: int) -> int:
    """A hash, equal across processes, of what can be seen of a training set without loading it.

    It covers the batch size, the dataset's size and types, the indices of every ``Subset`` (what
    ``random_split`` makes) and the parts of every ``ConcatDataset``, and for a ``TensorDataset`` the
    shapes and up to 4,096 evenly spaced values of each tensor. Under DDP every rank must hold the same
    training set in the same order; this is how the strategy compares them.
    """
    digest = hashlib.blake2b(digest_size=8)

    def add(part: Dataset) -> None:
        digest.update(f"{type(part).__qualname__}:{len(part)};".encode())  # type: ignore[arg-type]
        if isinstance(part, Subset):
            digest.update(np.asarray(part.indices, dtype=np.int64).tobytes())
            add(part.dataset)
        elif isinstance(part, ConcatDataset):
            for inner in part.datasets:
                add(inner)
        elif isinstance(part, TensorDataset):
            for tensor in part.tensors:
                flat = tensor.detach().reshape(-1)
                stride = max(1, flat.numel() // 4096)
                digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(flat[::stride].cpu().contiguous().view(torch.uint8).numpy().tobytes())

    digest.update(f"batch_size={batch_size};".encode())
    add(dataset)
    return int.from_bytes(digest.digest(), "little") >> 1  # fits an int64


@contextmanager
def restored_randomness() -> Iterator[None]:
    """Restore every random generator (torch's, CUDA's, ``random``'s and NumPy's) when the block ends."""
    states = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        random.getstate(),
        np.random.get_state(),
    )
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])
        random.setstate(states[2])
        np.random.set_state(states[3])


def seed_every_generator(seed: int) -> None:
    """Seed torch's, ``random``'s and NumPy's generators alike (inside :func:`restored_randomness`)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


SUMMARY_EXAMPLES = 8  # examples loaded by `example_summaries`
_SUMMARY_STATS = 5  # numbers per example


def example_summaries(dataset: Dataset, count: int = SUMMARY_EXAMPLES) -> list[float]:
    """Five numbers for each of ``count`` evenly spaced examples of ``dataset``, loaded as training loads them.

    For example ``i`` (``dataset[i]``, its transforms included), over every number it holds (tensors,
    arrays, images, labels; a string as a hash): how many, their sum, sum of squares and sum of absolute
    values, and a sum weighted by position (which a reordering inside the example changes). Random
    transforms draw from generators seeded alike (and restored afterwards), so two processes holding the
    same examples in the same order get the same numbers up to float rounding, and a different example at
    an index changes them. :class:`~lightning_sparta.DPStrategy` compares them across DDP ranks, with a
    tolerance, since the ranks may run on different CPUs.
    """
    n = len(dataset)  # type: ignore[arg-type]
    indices = sorted({round(k * (n - 1) / max(1, count - 1)) for k in range(count)}) if n else []
    out: list[float] = []
    with restored_randomness():
        for i in indices:
            seed_every_generator(i)
            values = torch.cat([v.reshape(-1) for v in _numbers(dataset[i])] or [torch.zeros(0, dtype=torch.float64)])
            weights = torch.arange(values.numel(), dtype=torch.float64) % 7 + 1
            out += [
                float(values.numel()),
                float(values.sum()),
                float(values.square().sum()),
                float(values.abs().sum()),
                float((values * weights).sum()),
            ]
    return out + [0.0] * (_SUMMARY_STATS * count - len(out))


def _numbers(value: Any) -> list[torch.Tensor]:
    """Every number in a loaded example, as float64 tensors (a string or bytes as a stable hash)."""
    if isinstance(value, torch.Tensor):
        return [value.detach().to("cpu", torch.float64)]
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("PIL."):
        array = np.asarray(value)
        return [torch.from_numpy(array.astype(np.float64))] if array.dtype.kind in "biuf" else []
    if isinstance(value, bool | int | float):
        return [torch.tensor([float(value)], dtype=torch.float64)]
    if isinstance(value, str | bytes):
        raw = value.encode() if isinstance(value, str) else value
        digest = hashlib.blake2b(raw, digest_size=6).digest()
        return [torch.tensor([float(int.from_bytes(digest, "little"))], dtype=torch.float64)]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _numbers(key) + _numbers(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _numbers(item)]
    return []


def training_data(dataloader: object) -> tuple[DataLoader, int, int]:
    """``(loader, n, expected batch size)`` of the user's training loader, or an error saying what to change.

    A ``SubsetRandomSampler`` makes its indices the training set: the loader returned is over that
    ``Subset``, so Poisson sampling draws from the examples the user trains on and nothing else.

    Raises:
        TypeError: if it is not a ``DataLoader`` over a map-style dataset.
        ValueError: if the dataset is empty or the batch size missing or larger than the dataset.
    """
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"DPStrategy needs the training data as a torch DataLoader over a map-style dataset, got "
            f"{type(dataloader).__name__}."
        )
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"The training dataset is an IterableDataset ({type(dataset).__name__}): Poisson sampling "
            "needs random access. Use a map-style dataset (with __getitem__ and __len__)."
        )
    batch_size = expected_batch_size(dataloader)  # of the user's loader (and its warning)
    sampler = _users_sampler(dataloader)
    if isinstance(sampler, SubsetRandomSampler):  # the examples it draws from are the training set
        dataset = Subset(dataset, [int(i) for i in sampler.indices])
        dataloader = DataLoader(
            dataset,
            batch_size=1,  # not used: the strategy puts its Poisson batch sampler over this dataset
            num_workers=dataloader.num_workers,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
            worker_init_fn=dataloader.worker_init_fn,
            persistent_workers=dataloader.persistent_workers if dataloader.num_workers > 0 else False,
        )
    check_no_repeated_examples(dataset)
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ValueError("The training dataset is empty: DP-SGD needs training data.")
    if batch_size > num_samples:
        raise ValueError(f"The training DataLoader's batch_size={batch_size} exceeds the dataset size {num_samples}.")
    return dataloader, num_samples, batch_size


class DPDataLoader(DataLoader):
    """A DataLoader over a :class:`PoissonBatchSampler` whose position survives checkpoints.

    Lightning saves ``state_dict()`` of stateful training loaders in its checkpoints and restores
    it on resume; the state is the epoch and the number of steps already taken in it (an epoch whose
    ``epoch_length_fn()`` steps are all done is saved as step 0 of the next one), so a resumed run draws
    exactly the batches the uninterrupted run would have drawn.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` but not on its ``batch_sampler``, so the
    loader asks ``epoch_fn`` for the current epoch each time an epoch's iteration starts.

    With ``save_seed=False`` (secure mode) the state holds the position only: the sampler's seed is
    secret and a resumed run keeps the seed it drew itself.
    """

    batch_sampler: PoissonBatchSampler

    def __init__(
        self,
        *args: Any,
        position_fn: Callable[[], int] | None = None,
        epoch_fn: Callable[[], int] | None = None,
        epoch_length_fn: Callable[[], int | float] | None = None,
        save_seed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._save_seed = save_seed
        self._position_fn = position_fn
        self._epoch_fn = epoch_fn
        self._epoch_length_fn = epoch_length_fn

    @classmethod
    def replacing(cls, dataloader: DataLoader, sampler: PoissonBatchSampler, **kwargs: Any) -> DPDataLoader:
        """``dataloader``'s dataset, workers and collate function over ``sampler``; ``kwargs`` as in ``__init__``."""
        return cls(
            dataloader.dataset,
            batch_sampler=sampler,
            num_workers=dataloader.num_workers,
            collate_fn=EmptyBatchCollate(dataloader.collate_fn, dataloader.dataset),
            pin_memory=dataloader.pin_memory,
            worker_init_fn=dataloader.worker_init_fn,
            persistent_workers=dataloader.persistent_workers if dataloader.num_workers > 0 else False,
            **kwargs,
        )

    def __iter__(self) -> Any:
        if self._epoch_fn is not None:
            self.batch_sampler.set_epoch(self._epoch_fn())
        return super().__iter__()

    def state_dict(self) -> dict[str, int | None]:
        epoch = self.batch_sampler.epoch
        position = self._position_fn() if self._position_fn is not None else 0
        length = self._epoch_length_fn() if self._epoch_length_fn is not None else len(self.batch_sampler)
        if position >= min(length, len(self.batch_sampler)):  # the epoch is done: resume at the next one
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "step": position, "seed": self.batch_sampler.seed if self._save_seed else None}

    def load_state_dict(self, state_dict: dict[str, int | None]) -> None:
        if state_dict.get("seed") is not None and self._save_seed:
            self.batch_sampler.seed = int(state_dict["seed"])
        self.batch_sampler.resume_at(state_dict["epoch"], state_dict["step"])


__all__ = [
    "DPDataLoader",
    "EmptyBatchCollate",
    "PoissonBatchSampler",
    "batch_size_of",
    "check_no_repeated_examples",
    "example_summaries",
    "expected_batch_size",
    "map_batch",
    "restored_randomness",
    "seed_every_generator",
    "split_batch",
    "steps_per_epoch",
    "training_data",
    "training_set_fingerprint",
]
