"""A 2-process CPU (gloo) DDP run of DPStrategy; launched by tests/test_ddp.py, one file per rank.

Lightning's default DDP launcher re-runs this script once per extra rank, so it must be a script.
Usage: python tests/ddp_worker.py OUT_DIR MODE [CLIPPING]
(MODE: train | noise | sparta | unseeded | unseeded_sparse | views | nan | split | shuffled | settings;
CLIPPING: DPStrategy's clipping engine, per_sample by default)
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from lightning_sparta import DPStrategy

N, BATCH = 64, 16


class IndexedModule(L.LightningModule):
    def __init__(self, zero_loss: bool, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, width), nn.GroupNorm(2, width), nn.Tanh(), nn.Linear(width, 3))
        self.zero_loss = zero_loss
        self.views = 1
        self.poisoned = False  # sample 5 holds a NaN
        self.split = False  # an unseeded random_split: every rank trains on its own 48 of the 64 samples
        self.shuffled = False  # a custom dataset that orders its examples at random in each process
        self.indices: list[list[int]] = []
        self.register_buffer("offset", torch.randn(6))

    def get_classifier(self) -> nn.Module:
        return self.net[3]

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.indices.append(idx.tolist())
        loss = F.cross_entropy(self.net(x + self.offset), y)
        # sync_dist in training_step: ranks run different numbers of micro-batches, so DPStrategy must keep
        # this reduction local (a real all-reduce here would hang); the epoch value is reduced at epoch end.
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True, batch_size=len(y))
        return loss * 0.0 if self.zero_loss else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
        if self.views > 1:  # augmentation multiplicity: each sample's views, [N, views, 6]
            x = x[:, None] + 0.1 * torch.randn(N, self.views, 6, generator=g)
        if self.poisoned:
            x[5].view(-1)[0] = float("nan")
        data = TensorDataset(x, y, torch.arange(N))
        if self.split:
            data = random_split(data, [48, 16], generator=torch.Generator().manual_seed(self.global_rank))[0]
        if self.shuffled:
            data = _Reordered(data, torch.Generator().manual_seed(self.global_rank))
        return DataLoader(data, batch_size=BATCH, shuffle=True)


class _Reordered(Dataset):
    """A custom dataset whose order is drawn when it is built, as `random.shuffle(self.files)` without a seed
    does in each process: same type and size on every rank, so only loading examples tells the ranks apart."""

    def __init__(self, data: Dataset, generator: torch.Generator) -> None:
        self.data, self.order = data, torch.randperm(len(data), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.data[self.order[i]]


def main(out: Path, mode: str, clipping: str = "per_sample") -> None:
    unseeded = mode.startswith("unseeded")
    if unseeded:
        # no seed_everything: every rank builds its model from different random weights and buffers
        torch.manual_seed(1000 + int(os.environ.get("LOCAL_RANK", 0)))
    else:
        L.seed_everything(0)
    module = IndexedModule(zero_loss=mode == "noise", width=400 if mode == "noise" else 8)
    if mode == "unseeded_sparse":  # a layer made row-sparse by hand, with different rows on every rank
        from lightning_sparta.sparse import sparsify_

        sparsify_(module, {"net.0": torch.randperm(8)[:3]})
    module.views = 3 if mode == "views" else 1
    module.poisoned = mode == "nan"
    module.split = mode == "split"
    module.shuffled = mode == "shuffled"
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    rows = module.net[0].rows.clone() if mode == "unseeded_sparse" else None
    callbacks = []
    if mode == "sparta":
        from lightning_sparta import SpartaMaskCallback

        callbacks.append(SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.25))
    # micro-batches of 2: ranks run different numbers of training_step calls (see the log call above)
    seed = None if unseeded else 123
    strategy = DPStrategy(
        noise_multiplier=1.5,
        # settings: a clipping bound read per rank (rank 1 clips at twice rank 0's bound)
        max_grad_norm=0.5 * (1 + int(os.environ.get("LOCAL_RANK", 0))) if mode == "settings" else 0.5,
        seed=seed,
        physical_batch_size=2,
        clipping=clipping,
        augmentation_multiplicity=module.views,
    )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=1 if mode == "noise" else 3,
        max_steps=1 if mode == "noise" else -1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    if mode in ("split", "shuffled", "settings"):  # expected to be refused on every rank
        try:
            trainer.fit(module)
        except ValueError as error:
            torch.save({"error": str(error), "steps": strategy.steps}, out / f"rank{trainer.global_rank}.pt")
        return
    trainer.fit(module)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "initial": initial,
        # state-dict keys stay dense through SPARTA's swap, so updates are comparable in every mode
        "updates": [v.detach() - initial[k] for k, v in module.state_dict().items()],
        "epsilon": strategy.epsilon(),
        "steps": strategy.steps,
        "indices": module.indices,
        "num_batches": trainer.num_training_batches,
        "mask": {k: v.clone() for k, v in callbacks[0].mask.items()} if callbacks else None,
        "initial_rows": rows,
        "rows": module.net[0].rows.clone() if rows is not None else None,
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:4])
    finally:
        # gloo's worker threads can abort the process at interpreter exit (SIGABRT, "terminate called
        # without an active exception") unless the process group is destroyed first; Lightning leaves it up
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
