"""Input-space canaries: a training set with mislabelled copies of some examples, each kept with probability 1/2."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CanaryDataset"]


class CanaryDataset(Dataset):
    """``base`` without its canary examples, followed by the *included* canaries with a wrong label.

    Canary ``j`` is example ``canary_indices[j]`` of ``base`` with its label (``item[label_index]``)
    replaced by ``canary_labels[j]``. Canaries with ``included[j] == False`` are not in the dataset at
    all, not even with their true label, so that "excluded" means "never trained on". The length is
    therefore ``len(base) - m + (number included)``.

    Usually built by :meth:`lightning_sparta.audit.PrivacyAuditCallback.wrap_dataset`.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.arange(5.0), torch.tensor([0, 1, 0, 1, 0]))
        >>> data = CanaryDataset(base, canary_indices=[1, 3], canary_labels=[0, 0], included=[True, False])
        >>> len(data), [int(data[i][0]) for i in range(len(data))], int(data[3][1])
        (4, [0, 2, 4, 1], 0)
    """

    def __init__(
        self,
        base: Dataset,
        canary_indices: Sequence[int],
        canary_labels: Sequence[int],
        included: Sequence[bool],
        label_index: int = 1,
    ) -> None:
        self.base = base
        self.canary_indices = np.asarray(canary_indices, dtype=np.int64)
        self.canary_labels = np.asarray(canary_labels, dtype=np.int64)
        self.included = np.asarray(included, dtype=bool)
        if not len(self.canary_indices) == len(self.canary_labels) == len(self.included):
            raise ValueError("`canary_indices`, `canary_labels` and `included` must have one length.")
        if len(np.unique(self.canary_indices)) != len(self.canary_indices):
            raise ValueError("`canary_indices` must be distinct.")
        self.label_index = label_index
        canaries = set(self.canary_indices.tolist())
        self._kept = np.array([i for i in range(len(base)) if i not in canaries], dtype=np.int64)  # type: ignore[arg-type]
        self._members = np.flatnonzero(self.included)

    def __len__(self) -> int:
        return len(self._kept) + len(self._members)

    def canary(self, j: int) -> Any:
        """Canary ``j`` (included or not) as an item of the dataset: the base example with the canary label."""
        item = self.base[int(self.canary_indices[j])]
        if not isinstance(item, (tuple, list)) or len(item) <= self.label_index:
            raise TypeError(
                f"Input canaries need dataset items that are tuples with the label at index {self.label_index}, "
                f"got {type(item).__name__}."
            )
        label = item[self.label_index]
        new = int(self.canary_labels[j])
        if isinstance(label, torch.Tensor):
            new_label: Any = torch.tensor(new, dtype=label.dtype, device=label.device).reshape(label.shape)
        elif isinstance(label, numbers.Integral):
            new_label = type(label)(new) if not isinstance(label, bool) else new
        else:
            new_label = new
        items = list(item)
        items[self.label_index] = new_label
        return tuple(items) if isinstance(item, tuple) else items

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        if index < len(self._kept):
            return self.base[int(self._kept[index])]
        return self.canary(int(self._members[index - len(self._kept)]))
