"""CPU time that PrivacyBudgetCallback spends computing ε during a run (not a test).

A tiny model trains for ``--epochs`` epochs of ``--steps-per-epoch`` Poisson steps with the PRV
accountant; every hook of the callback is timed with ``time.process_time``. ``--rev REV`` loads the
callback from that git revision instead (e.g. ``--rev HEAD~3``), with the ε cache of
``privacy/accountant.py`` switched off as it was then, to compare before and after::

    .venv/bin/python benchmarks/epsilon_logging_cost.py --rev 6d6e507   # before (issue 11)
    .venv/bin/python benchmarks/epsilon_logging_cost.py                  # the working tree
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparta import DPStrategy

ROOT = Path(__file__).resolve().parent.parent
CALLBACK = "src/lightning_sparta/callbacks/privacy_budget.py"
HOOKS = ("on_train_batch_end", "on_train_epoch_end", "on_validation_epoch_end", "on_train_end", "on_fit_end")


class Tiny(L.LightningModule):
    def __init__(self, n: int, batch_size: int) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


def load_callback(rev: str | None) -> type:
    if rev is None:
        from lightning_sparta import PrivacyBudgetCallback

        return PrivacyBudgetCallback
    source = subprocess.run(["git", "show", f"{rev}:{CALLBACK}"], cwd=ROOT, capture_output=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "privacy_budget_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("privacy_budget_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from lightning_sparta.privacy import accountant

    cached = accountant._epsilon_of_merged  # the old code had no cache of ε by history
    accountant._epsilon_of_merged = getattr(cached, "__wrapped__", cached)
    return module.PrivacyBudgetCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default=None, help="git revision to load the callback from (default: working tree)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--log-every-n-steps", type=int, default=50, help="the Trainer's default")
    args = parser.parse_args()
    callback_cls = load_callback(args.rev)
    callback = callback_cls()
    spent: dict[str, float] = dict.fromkeys(HOOKS, 0.0)
    for hook in HOOKS:
        original = getattr(callback, hook, None)
        if original is None:
            continue

        @functools.wraps(original)
        def timed(*a, _original=original, _hook=hook, **k):
            start = time.process_time()
            try:
                return _original(*a, **k)
            finally:
                spent[_hook] += time.process_time() - start

        setattr(callback, hook, timed)
    n = 20 * args.steps_per_epoch
    trainer = L.Trainer(
        strategy=DPStrategy(noise_multiplier=1.0, target_delta=1e-5, seed=0),
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=args.log_every_n_steps,
    )
    start = time.process_time()
    trainer.fit(Tiny(n, 20))
    total = time.process_time() - start
    strategy = trainer.strategy
    name = args.rev or "working tree"
    print(f"callback from {name}: {strategy.steps} steps, final ε = {strategy.epsilon():.6f}")
    print(f"  CPU in the callback: {sum(spent.values()):.2f} s of {total:.2f} s for the whole fit")
    for hook, seconds in spent.items():
        print(f"    {hook:<24} {seconds:7.2f} s")
    print(f"  metrics: {dict(trainer.callback_metrics)}", file=sys.stderr)


if __name__ == "__main__":
    main()
