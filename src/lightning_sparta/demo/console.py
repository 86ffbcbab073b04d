"""Console hygiene for the examples: drop Lightning notices that tell a reader nothing about their run."""

from __future__ import annotations

import logging
import warnings

# Lightning's `rank_zero_info` messages come from this logger
_LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")  # Lightning's LitLogger advertisement


def quiet_lightning_notices() -> None:
    """Hide Lightning's LitLogger advertisement and the deprecation warning it raises inside torch's pytree.

    Neither is about the user's code or run (the second is Lightning calling an API that newer torch
    deprecates). Everything else Lightning prints, and every warning about the user's code, stays.
    Idempotent.
    """
    logger = logging.getLogger(_LIGHTNING_INFO)
    if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
        logger.addFilter(_DropAdvertisements())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


__all__ = ["quiet_lightning_notices"]
