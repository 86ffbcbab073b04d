"""A 2-process CPU (gloo) DDP run with PrivacyAuditCallback; launched by tests/test_audit.py, one file per rank.

Lightning's DDP launcher re-runs this script once per extra rank, so it must be a script.
Usage: python tests/audit_ddp_worker.py OUT_DIR MODE   (MODE: zero | private | sparta)
"""

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from lightning_sparta import DPStrategy, SpartaMaskCallback
from lightning_sparta.audit import PrivacyAuditCallback

# the single-process tests' module and sizes: the DDP run audits the same task (this script's folder is on sys.path)
from test_audit import CLASSES, Module, N


def main(out: Path, mode: str) -> None:
    warnings.filterwarnings("ignore", message="noise_multiplier=0")
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, CLASSES, (N,), generator=g))
    audit = PrivacyAuditCallback(gradient_canaries=150, input_canaries=8, seed=1)
    module = Module(audit.wrap_dataset(data, num_classes=CLASSES))
    callbacks = [audit]
    if mode == "sparta":
        callbacks.append(SpartaMaskCallback(mask_epoch=1, trainable_fraction=0.5))
    sigma = 0.0 if mode == "zero" else 1.0
    strategy = DPStrategy(noise_multiplier=sigma, max_grad_norm=1.0, seed=2, accountant="rdp", physical_batch_size=4)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module)
    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "results": audit.results,
            "update": audit.gradient_scores_of("update"),
            "observed_steps": audit.observed_steps,
            "included": audit.gradient_included,
            "epsilon": strategy.epsilon(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    finally:
        # gloo's worker threads can abort the process at interpreter exit (SIGABRT, "terminate called
        # without an active exception") unless the process group is destroyed first; Lightning leaves it up
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
