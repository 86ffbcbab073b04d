"""The state of a private scoring epoch (SPARTA's Algorithm 1): what is scored, how, and the sums so far."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Scoring:
    """A scoring epoch under way; see :meth:`lightning_sparta.DPStrategy.begin_scoring` for the arguments.

    Attributes:
        parameters: the scored parameters by name.
        absolute: sum ``|g_i|`` (SPARTA) rather than ``g_i`` (the DP-SGD gradient baseline, Algorithm 2).
        private: clip and noise; ``False`` sums the true gradients (the oracle mask, Algorithm 3).
        train: the non-scored trainable parameters train from the same release.
        sums: the released (noised) sums accumulated so far, float32.
    """

    parameters: dict[str, nn.Parameter]
    absolute: bool = True
    private: bool = True
    train: bool = False
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frozen = [name for name, p in self.parameters.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"Scored parameters must be trainable while scoring, frozen: {frozen}.")
        if self.train and not self.private:
            raise ValueError("`train=True` needs private scoring: the non-scored part would be released without noise.")
        self.parameters = dict(self.parameters)
        self.sums = {
            name: value.to(device=self.parameters[name].device, dtype=torch.float32).clone()
            for name, value in self.sums.items()
        }

    def add(self, released: list[torch.Tensor]) -> None:
        """Add one step's released sums, in the order of :attr:`parameters`."""
        for (name, p), chunk in zip(self.parameters.items(), released, strict=True):
            chunk = chunk.view_as(p)
            self.sums[name] = self.sums[name] + chunk if name in self.sums else chunk

    def result(self) -> dict[str, torch.Tensor]:
        """The accumulated sums of every scored parameter (zeros for one that never got a step)."""
        return {
            name: self.sums.get(name, torch.zeros_like(p, dtype=torch.float32)) for name, p in self.parameters.items()
        }


__all__ = ["Scoring"]
