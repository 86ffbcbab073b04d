"""Poisson sampling, empty batches, batch splitting, loader state and model validation.

The statistical tests use fixed seeds and 5-standard-deviation bounds: for a correct sampler each
fails with probability below 1e-6, and the seeds make them deterministic anyway.
"""

from __future__ import annotations

import itertools
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset, default_collate, random_split

from lightning_sparta.privacy.sampler import (
    DPDataLoader,
    EmptyBatchCollate,
    PoissonBatchSampler,
    batch_size_of,
    example_summaries,
    split_batch,
    steps_per_epoch,
    training_set_fingerprint,
)
from lightning_sparta.privacy.validation import IncompatibleModelError, incompatible_layers, validate_model

N, Q = 1000, 0.05
STEPS = 2000  # steps drawn for the statistical tests


def batches_of(sampler: PoissonBatchSampler, epoch: int | None = None) -> list[list[int]]:
    if epoch is not None:
        sampler.set_epoch(epoch)
    return list(sampler)


@pytest.fixture(scope="module")
def long_run() -> list[list[int]]:
    """STEPS Poisson batches of N examples at rate Q."""
    return batches_of(PoissonBatchSampler(num_samples=N, sample_rate=Q, seed=123, steps=STEPS))


# ------------------------------------------------------------------------------------------ statistics
def test_total_batch_size_is_binomial(long_run: list[list[int]]) -> None:
    # The total over S steps is Binomial(n·S, q): mean n·q·S = 100,000, sd sqrt(n·q·S·(1−q)) ≈ 308.
    total = sum(map(len, long_run))
    mean, sd = N * Q * STEPS, math.sqrt(N * Q * STEPS * (1 - Q))
    assert abs(total - mean) < 5 * sd


def test_each_index_has_inclusion_rate_q(long_run: list[list[int]]) -> None:
    # Each index's count over S steps is Binomial(S, q): mean 100, sd ≈ 9.7.
    counts = np.bincount(np.concatenate([np.asarray(b, dtype=int) for b in long_run]), minlength=N)
    sd = math.sqrt(STEPS * Q * (1 - Q))
    for index in (0, 1, N // 2, N - 1):
        assert abs(counts[index] - STEPS * Q) < 5 * sd, index
    # and over all indices: the mean count is exact up to the total's fluctuation (sd/sqrt(n))
    assert abs(counts.mean() - STEPS * Q) < 5 * sd / math.sqrt(N)


def test_batch_size_variance_is_binomial(long_run: list[list[int]]) -> None:
    # Batch sizes are Binomial(n, q): variance n·q·(1−q) = 47.5. The sample variance over S draws has
    # standard error ≈ var·sqrt(2/(S−1)) ≈ 1.5 (near-normal sizes), so 5 standard errors ≈ 7.5.
    sizes = np.array([len(b) for b in long_run])
    variance = N * Q * (1 - Q)
    assert abs(sizes.var(ddof=1) - variance) < 5 * variance * math.sqrt(2 / (STEPS - 1))


def test_consecutive_batches_are_independent(long_run: list[list[int]]) -> None:
    # An index is in two given batches with probability q², so the summed overlap of consecutive
    # batches is Binomial(n·(S−1), q²): mean ≈ 4998, sd ≈ 70.
    overlap = sum(len(set(a) & set(b)) for a, b in itertools.pairwise(long_run))
    trials = N * (STEPS - 1)
    assert abs(overlap - trials * Q**2) < 5 * math.sqrt(trials * Q**2 * (1 - Q**2))


def test_batches_are_sorted_unique_valid_indices(long_run: list[list[int]]) -> None:
    for batch in long_run[:50]:
        assert all(type(i) is int for i in batch)
        assert batch == sorted(set(batch))
        assert all(0 <= i < N for i in batch)


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize(
    ("q", "steps"), [(0.1, 10), (0.3, 3), (256 / 50_000, 195), (1.0, 1), (0.6, 2), (0.001, 1000), (0.9, 1)]
)
def test_steps_per_epoch_is_round_one_over_q(q: float, steps: int) -> None:
    assert steps_per_epoch(q) == steps
    sampler = PoissonBatchSampler(num_samples=20, sample_rate=q)
    assert len(sampler) == steps
    assert len(list(sampler)) == steps


def test_explicit_steps() -> None:
    sampler = PoissonBatchSampler(num_samples=20, sample_rate=0.1, steps=4)
    assert len(sampler) == 4
    assert len(list(sampler)) == 4


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_partition_the_global_batch(world_size: int) -> None:
    n, q = 101, 0.2
    single = batches_of(PoissonBatchSampler(num_samples=n, sample_rate=q, seed=7), epoch=3)
    ranks = [
        batches_of(PoissonBatchSampler(num_samples=n, sample_rate=q, seed=7, num_replicas=world_size, rank=r), 3)
        for r in range(world_size)
    ]
    assert {len(PoissonBatchSampler(n, q, 7, world_size, r)) for r in range(world_size)} == {len(single)}
    assert all(len(batches) == len(single) for batches in ranks)  # equal number of yields, empty ones included
    for step, expected in enumerate(single):
        parts = [set(batches[step]) for batches in ranks]
        assert set().union(*parts) == set(expected)
        assert sum(map(len, parts)) == len(expected)  # disjoint
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_epochs_differ_and_repeat() -> None:
    def sampler(seed: int) -> PoissonBatchSampler:
        return PoissonBatchSampler(num_samples=200, sample_rate=0.1, seed=seed)

    first = sampler(0)
    epoch0, epoch1 = batches_of(first, 0), batches_of(first, 1)
    assert epoch0 != epoch1
    assert all(a != b for a, b in zip(epoch0, epoch1, strict=True))  # every step changes
    assert batches_of(sampler(0), 1) == epoch1  # same (seed, epoch): same batches
    assert batches_of(first, 0) == epoch0  # iterating again repeats the epoch
    assert batches_of(sampler(1), 0) != epoch0  # another seed: other batches
    assert len({tuple(b) for b in epoch0}) == len(epoch0)  # steps within an epoch differ


def test_empty_batches_are_yielded() -> None:
    # q·n = 0.1: a batch is empty with probability 0.99^10 ≈ 0.90; all 100 steps are still yielded.
    sampler = PoissonBatchSampler(num_samples=10, sample_rate=0.01, seed=0)
    batches = list(sampler)
    assert len(batches) == 100
    empty = sum(b == [] for b in batches)
    assert 70 <= empty < 100
    assert all(isinstance(b, list) for b in batches)


def test_resume_at_applies_to_the_next_iteration_once() -> None:
    sampler = PoissonBatchSampler(num_samples=200, sample_rate=0.1, seed=3)
    full = {epoch: batches_of(PoissonBatchSampler(num_samples=200, sample_rate=0.1, seed=3), epoch) for epoch in (1, 2)}
    sampler.resume_at(2, 4)
    assert batches_of(sampler, 2) == full[2][4:]
    assert batches_of(sampler, 2) == full[2]  # only the next iteration resumes
    sampler.resume_at(2, 4)
    assert batches_of(sampler, 1) == full[2][4:]  # the resume point wins over set_epoch, once
    assert sampler.epoch == 2
    assert batches_of(sampler, 1) == full[1]
    sampler.resume_at(1, 10)
    assert batches_of(sampler, 1) == []  # resumed at the end of the epoch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0, "sample_rate": 0.1}, "num_samples"),
        ({"num_samples": 10, "sample_rate": 0.0}, "sample_rate"),
        ({"num_samples": 10, "sample_rate": 1.5}, "sample_rate"),
        ({"num_samples": 10, "sample_rate": 0.1, "num_replicas": 2, "rank": 2}, "rank"),
        ({"num_samples": 10, "sample_rate": 0.1, "rank": -1}, "rank"),
    ],
)
def test_invalid_sampler_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"`{match}`"):
        PoissonBatchSampler(**kwargs)


# ------------------------------------------------------------------------------------------ empty batches
def _tensor_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(6, 3, 4, generator=g), torch.randint(0, 5, (6,), generator=g))


class DictDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((2, 5), float(i), dtype=torch.float16), "label": i, "mask": torch.ones(3).bool()}


def test_empty_batch_of_tensor_dataset() -> None:
    dataset = _tensor_dataset()
    collate = EmptyBatchCollate(default_collate, dataset)
    x, y = collate([])
    assert (x.shape, x.dtype) == ((0, 3, 4), torch.float32)
    assert (y.shape, y.dtype) == ((0,), torch.int64)
    x, y = collate([dataset[1], dataset[4]])  # non-empty batches are the wrapped collate's
    torch.testing.assert_close(x, dataset.tensors[0][[1, 4]])
    torch.testing.assert_close(y, dataset.tensors[1][[1, 4]])


def test_empty_batch_of_dict_dataset() -> None:
    collate = EmptyBatchCollate(default_collate, DictDataset())
    batch = collate([])
    assert set(batch) == {"image", "label", "mask"}
    assert (batch["image"].shape, batch["image"].dtype) == ((0, 2, 5), torch.float16)
    assert (batch["label"].shape, batch["label"].dtype) == ((0,), torch.int64)
    assert (batch["mask"].shape, batch["mask"].dtype) == ((0, 3), torch.bool)
    assert batch_size_of(batch) == 0


def test_loader_yields_empty_batches() -> None:
    dataset = _tensor_dataset()
    sampler = PoissonBatchSampler(num_samples=len(dataset), sample_rate=0.02, seed=1)
    loader = DPDataLoader(dataset, batch_sampler=sampler, collate_fn=EmptyBatchCollate(default_collate, dataset))
    sizes = [batch_size_of(batch) for batch in loader]
    assert len(sizes) == 50
    assert 0 in sizes
    assert sizes == [len(b) for b in sampler]


# ------------------------------------------------------------------------------------------ splitting
Pair = namedtuple("Pair", ["inputs", "targets"])


def _batches(size: int) -> dict[str, object]:
    x = torch.arange(size * 6, dtype=torch.float32).reshape(size, 2, 3)
    y = torch.arange(size)
    return {
        "tensor": x,
        "tuple": (x, y),
        "list": [x, y],
        "dict": {"x": x, "y": y},
        "namedtuple": Pair(x, y),
        "nested": {"pair": Pair(x, [y, y * 2]), "scale": torch.tensor(2.0), "name": "batch"},
        "leading_non_tensor": ("meta", torch.tensor(1.0), {"x": x}),
    }


def _concat(parts: list) -> object:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat(list(vs)) for vs in zip(*parts, strict=True)))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(vs)) for vs in zip(*parts, strict=True))
    return first


def _assert_same(a: object, b: object) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    else:
        assert a == b


@pytest.mark.parametrize("kind", list(_batches(1)))
@pytest.mark.parametrize(("size", "micro", "sizes"), [(10, 4, [4, 4, 2]), (8, 4, [4, 4]), (3, 1, [1, 1, 1])])
def test_split_batch_concatenates_back(kind: str, size: int, micro: int, sizes: list[int]) -> None:
    batch = _batches(size)[kind]
    assert batch_size_of(batch) == size
    parts = split_batch(batch, micro)
    assert [batch_size_of(p) for p in parts] == sizes
    _assert_same(_concat(parts), batch)


@pytest.mark.parametrize("kind", list(_batches(1)))
def test_split_batch_that_fits_is_returned_whole(kind: str) -> None:
    batch = _batches(5)[kind]
    assert split_batch(batch, 5)[0] is batch
    assert len(split_batch(batch, 8)) == 1


@pytest.mark.parametrize("batch", [torch.tensor(3.0), {"a": "text"}, ("a", 1), [], None], ids=repr)
def test_batch_size_of_without_batch_dimension(batch: object) -> None:
    with pytest.raises(ValueError, match="Cannot find the batch size"):
        batch_size_of(batch)


# ------------------------------------------------------------------------------------------ loader state
def test_loader_state_round_trip_resumes_at_the_right_step() -> None:
    dataset = TensorDataset(torch.arange(300))
    collate = EmptyBatchCollate(default_collate, dataset)

    def loader(seed: int, counter: list[int], epoch: list[int]) -> DPDataLoader:
        sampler = PoissonBatchSampler(num_samples=len(dataset), sample_rate=0.1, seed=seed)
        return DPDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            position_fn=lambda: counter[0],
            epoch_fn=lambda: epoch[0],
        )

    def indices(batch: list[torch.Tensor]) -> list[int]:
        return batch[0].tolist()

    uninterrupted = loader(5, [0], [2])
    expected = [indices(b) for b in uninterrupted]
    assert len(expected) == 10

    counter, epoch = [0], [2]
    first = loader(5, counter, epoch)
    seen = []
    for batch in first:
        seen.append(indices(batch))
        counter[0] += 1
        if counter[0] == 4:
            break
    state = first.state_dict()
    assert state == {"epoch": 2, "step": 4, "seed": 5}

    resumed = loader(99, [4], [2])  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.batch_sampler.seed == 5
    rest = [indices(b) for b in resumed]
    assert seen + rest == expected
    assert [indices(b) for b in resumed] == expected  # the next pass over the epoch is whole again


@pytest.mark.parametrize("length", [10, 6], ids=["whole-epoch", "limit_train_batches"])
def test_loader_state_after_the_last_step_of_an_epoch_points_at_the_next_epoch(length: int) -> None:
    """A checkpoint written after an epoch's last step resumes at step 0 of the next epoch, even though
    Lightning builds the first iterator before it counts the finished epoch (set_epoch still says 2)."""
    dataset = TensorDataset(torch.arange(300))

    def loader(position: int) -> DPDataLoader:
        sampler = PoissonBatchSampler(num_samples=len(dataset), sample_rate=0.1, seed=5)
        return DPDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=EmptyBatchCollate(default_collate, dataset),
            position_fn=lambda: position,
            epoch_fn=lambda: 2,
            epoch_length_fn=lambda: length,
        )

    finished = loader(length)
    list(finished)
    state = finished.state_dict()
    assert state == {"epoch": 3, "step": 0, "seed": 5}
    resumed = loader(0)
    resumed.load_state_dict(state)
    epoch3 = PoissonBatchSampler(num_samples=len(dataset), sample_rate=0.1, seed=5)
    epoch3.set_epoch(3)
    assert [b[0].tolist() for b in resumed] == list(epoch3)
    assert loader(length - 1).state_dict()["step"] == length - 1  # one step short: same epoch


def test_loader_sets_the_epoch_on_each_iteration() -> None:
    dataset = TensorDataset(torch.arange(50))
    epoch = [0]
    sampler = PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=0)
    loader = DPDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptyBatchCollate(default_collate, dataset),
        epoch_fn=lambda: epoch[0],
    )
    for e in range(3):
        epoch[0] = e
        got = [b[0].tolist() for b in loader]
        assert got == batches_of(PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=0), e)


# ------------------------------------------------------------------------------------------ validation
class Net(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8) if norm is not nn.GroupNorm else nn.GroupNorm(2, 8))
        self.head = nn.Linear(8, 2)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_validate_model_names_batchnorm_layers(norm: type[nn.Module]) -> None:
    model = Net(norm)
    model.extra = nn.BatchNorm1d(2)
    for p in model.parameters():  # frozen BatchNorm still mixes the samples of a batch
        p.requires_grad_(False)
    with pytest.raises(IncompatibleModelError, match=rf"features\.1 \({norm.__name__}\), extra \(BatchNorm1d\)"):
        validate_model(model)
    assert incompatible_layers(model) == {"features.1": norm.__name__, "extra": "BatchNorm1d"}


def test_validate_model_names_root_batchnorm() -> None:
    with pytest.raises(IncompatibleModelError, match=r"<root> \(BatchNorm3d\).*GroupNorm"):
        validate_model(nn.BatchNorm3d(4))
    assert issubclass(IncompatibleModelError, ValueError)


@pytest.mark.parametrize("norm", [nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.Identity])
def test_validate_model_accepts_per_sample_norms(norm: type[nn.Module]) -> None:
    model = Net(norm)
    validate_model(model)
    assert incompatible_layers(model) == {}


def test_training_set_fingerprint_tells_splits_values_and_batch_sizes_apart():
    """Equal training sets built twice hash the same; another split, other values or another batch size
    do not (what DDP ranks compare before training)."""

    def data(seed: int = 0) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(100, 3, 8, 8, generator=g), torch.randint(0, 10, (100,), generator=g))

    def split(seed: int) -> Subset:
        return random_split(data(), [80, 20], generator=torch.Generator().manual_seed(seed))[0]

    assert training_set_fingerprint(split(0), 16) == training_set_fingerprint(split(0), 16)
    assert training_set_fingerprint(split(0), 16) != training_set_fingerprint(split(1), 16)
    assert training_set_fingerprint(split(0), 16) != training_set_fingerprint(split(0), 32)
    assert training_set_fingerprint(data(0), 16) != training_set_fingerprint(data(1), 16)
    both = ConcatDataset([data(0), data(1)])
    assert training_set_fingerprint(both, 16) == training_set_fingerprint(ConcatDataset([data(0), data(1)]), 16)
    assert training_set_fingerprint(both, 16) != training_set_fingerprint(ConcatDataset([data(1), data(0)]), 16)
    assert 0 <= training_set_fingerprint(both, 16) < 2**63


class _Files(Dataset):
    """A custom dataset as users write them: a list of "files" in an order fixed at construction, a random
    augmentation in ``__getitem__`` (torch and NumPy), and a (tensor, label, name) example."""

    def __init__(self, order_seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(50, 3, 4, 4, generator=g)
        self.order = list(range(50))
        if order_seed is not None:  # `random.shuffle(self.files)` without a seed: each process its own order
            self.order = torch.randperm(50, generator=torch.Generator().manual_seed(order_seed)).tolist()

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int):
        j = self.order[i]
        image = self.images[j] + 0.1 * torch.randn(3, 4, 4) + float(np.random.uniform(-0.1, 0.1))
        return image, j % 10, f"file_{j}.png"


def test_example_summaries_see_the_order_of_a_custom_dataset_not_its_random_augmentation():
    """What DDP ranks compare beyond the fingerprint (which sees only a custom dataset's type and size):
    the same files in the same order give the same numbers whatever the generators' states, with the
    augmentation drawn alike and every generator restored; another order does not."""
    torch.manual_seed(1)
    np.random.seed(1)
    first = example_summaries(_Files())
    torch.manual_seed(2)
    np.random.seed(2)
    state, np_state = torch.get_rng_state(), np.random.get_state()
    again = example_summaries(_Files())
    assert torch.equal(torch.get_rng_state(), state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert len(first) == len(again) == 8 * 5
    assert first == again
    assert training_set_fingerprint(_Files(), 16) == training_set_fingerprint(_Files(order_seed=1), 16)
    shuffled = torch.tensor(example_summaries(_Files(order_seed=1)), dtype=torch.float64)
    assert not torch.allclose(shuffled, torch.tensor(first, dtype=torch.float64), rtol=1e-4, atol=1e-6)
