"""DPStrategy with real DDP: two CPU processes over gloo, launched as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sparta.privacy.sampler import PoissonBatchSampler

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(tmp_path: Path, mode: str, clipping: str = "per_sample") -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), mode, clipping],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict]:
    return _run(tmp_path_factory.mktemp("ddp_train"), "train")


def test_parameters_and_epsilon_identical_across_ranks(trained):
    r0, r1 = trained
    assert r0["world_size"] == r1["world_size"] == 2
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert any(not torch.equal(u, torch.zeros_like(u)) for u in r0["updates"])
    assert r0["epsilon"] == r1["epsilon"]
    assert r0["steps"] == r1["steps"] == 3 * 4  # q = 16/64: 4 steps per epoch on every rank


def test_union_of_rank_batches_is_the_global_poisson_batch(trained):
    """Each rank keeps a disjoint slice of one global Poisson draw; empty slices are still steps."""
    r0, r1 = trained
    sampler = PoissonBatchSampler(64, 16 / 64, seed=123)
    # the modules saw only non-empty slices; rebuild the expected slices per (epoch, step)
    expected = {0: [], 1: []}
    for epoch in range(3):
        for step in range(4):
            batch = sampler.global_batch(epoch, step)
            for rank in (0, 1):
                part = batch[rank::2].tolist()
                if part:
                    expected[rank].extend(split for split in _micro(part, 2))  # physical_batch_size=2
    assert r0["indices"] == expected[0]
    assert r1["indices"] == expected[1]
    # the ranks ran training_step a different number of times, and its `sync_dist=True` log did not hang
    assert len(r0["indices"]) != len(r1["indices"])


def _micro(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_noise_is_added_once_globally(tmp_path):
    """Zero gradients: the first update is -lr·noise/(q·n); its std is lr·σ·C/(q·n), not √2 times that, nor 0.

    ~3600 coordinates: the relative standard error of the std is ~1.2%; tolerance 6%.
    """
    r0, r1 = _run(tmp_path, "noise")
    update = torch.cat([u.flatten() for u in r0["updates"]])
    assert torch.equal(update, torch.cat([u.flatten() for u in r1["updates"]]))
    expected = 0.5 * 1.5 * 0.5 / (16 / 64 * 64)
    ratio = update.std().item() / expected
    assert abs(ratio - 1) < 0.06, ratio
    assert np.isfinite(r0["epsilon"])


@pytest.mark.parametrize("clipping", ["per_sample", "auto"])
def test_sparta_selects_identical_masks_on_every_rank(tmp_path, clipping):
    """Scores are reduced with the noise drawn once, so both ranks select the same rows and stay in sync.

    With ``clipping="auto"`` each rank's clipped sums come from ghost norms and book-keeping, the
    scores from chunked per-sample gradients, and the sparse phase from the row-sparse ghost forms.
    """
    r0, r1 = _run(tmp_path, "sparta", clipping)
    assert r0["mask"]
    assert r0["mask"].keys() == r1["mask"].keys()
    for name, rows in r0["mask"].items():
        assert torch.equal(rows, r1["mask"][name]), name
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["epsilon"] == r1["epsilon"]
    assert r0["steps"] == 3 * 4  # the scoring epoch's steps are accounted like DP-SGD steps


def test_unseeded_ranks_start_from_rank_zero_weights(tmp_path):
    """Without seed_everything each rank initialises differently; rank 0's parameters and buffers are
    broadcast at fit start, so both ranks train one model (and SPARTA would score one model)."""
    r0, r1 = _run(tmp_path, "unseeded")
    assert not torch.equal(r0["initial"]["offset"], r1["initial"]["offset"])  # they did start apart
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    # rank 1 trained rank 0's model: its update is relative to rank 0's initial weights
    for name, p in r1["params"].items():
        if name == "offset":
            assert torch.equal(p, r0["initial"][name])
    assert r0["epsilon"] == r1["epsilon"]


def test_unseeded_ranks_train_rank_zero_rows_of_a_sparse_layer(tmp_path):
    """A layer made row-sparse by hand before fit, with different rows on every rank: the rows (an attribute
    of the layer, not a buffer) are broadcast from rank 0 with the weights, so both ranks train the same
    rows of the same model."""
    r0, r1 = _run(tmp_path, "unseeded_sparse", "auto")
    assert not torch.equal(r0["initial_rows"], r1["initial_rows"])  # they did start apart
    assert torch.equal(r0["rows"], r0["initial_rows"])
    assert torch.equal(r1["rows"], r0["initial_rows"])
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name


def test_augmentation_multiplicity_under_ddp(tmp_path):
    """Three views per sample over two ranks: each rank's slice of the global Poisson batch reaches
    training_step as its samples' views (indices repeated three times, sample by sample), and the ranks
    end with identical parameters and ε."""
    r0, r1 = _run(tmp_path, "views", "auto")
    for rank in (r0, r1):
        assert rank["indices"]
        for micro in rank["indices"]:
            assert len(micro) % 3 == 0
            assert micro == [i for i in micro[::3] for _ in range(3)]
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    assert r0["epsilon"] == r1["epsilon"]
    assert r0["steps"] == r1["steps"] == 3 * 4


def test_a_non_finite_sample_is_left_out_on_its_rank(tmp_path):
    """Sample 5 holds a NaN: whichever rank draws it leaves it out of its clipped sum, so the all-reduced
    release stays finite, and the ranks stay identical (no collective depends on it)."""
    r0, r1 = _run(tmp_path, "nan", "auto")
    assert any(5 in micro for rank in (r0, r1) for micro in rank["indices"])
    for name, p in r0["params"].items():
        assert not p.isnan().any(), name
        assert torch.equal(p, r1["params"][name]), name
    assert r0["steps"] == r1["steps"] == 3 * 4


def test_ranks_with_different_training_sets_are_refused_on_every_rank(tmp_path):
    """An unseeded `random_split` gives each rank its own 48 of the 64 samples: index i is then a different
    example on each rank, and an example could be drawn on both ranks in one step. Both ranks refuse it
    before the first step, naming the likely cause (neither waits for the other in a collective)."""
    r0, r1 = _run(tmp_path, "split")
    for rank in (r0, r1):
        assert "the training set differs across DDP ranks" in rank["error"]
        assert "random_split" in rank["error"]
        assert rank["steps"] == 0


def test_ranks_whose_custom_dataset_orders_examples_differently_are_refused_on_every_rank(tmp_path):
    """A custom dataset that draws its order when built (`random.shuffle` of its files without a seed) has
    the same type and size on both ranks, so the fingerprint matches; the examples loaded at a few indices
    differ, and both ranks refuse before the first step."""
    r0, r1 = _run(tmp_path, "shuffled")
    for rank in (r0, r1):
        assert "the training set differs across DDP ranks (the examples loaded at 8 evenly spaced" in rank["error"]
        assert "shuffles its files" in rank["error"]
        assert rank["steps"] == 0


def test_ranks_with_different_privacy_settings_are_refused_on_every_rank(tmp_path):
    """Rank 1 built DPStrategy with twice rank 0's clipping bound: the noise, drawn on rank 0, covers only
    rank 0's bound, so a sample on rank 1 could contribute twice what is accounted. Both ranks refuse it
    before the first step and name the setting."""
    r0, r1 = _run(tmp_path, "settings")
    for rank, mine in ((r0, 0.5), (r1, 1.0)):
        assert "the privacy settings differ across DDP ranks (`max_grad_norm`;" in rank["error"]
        assert f"max_grad_norm={mine}" in rank["error"]
        assert rank["steps"] == 0
