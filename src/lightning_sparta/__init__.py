"""lightning_sparta: differentially private sparse fine-tuning (SPARTA) for PyTorch Lightning.

Three objects added to an existing ``Trainer``:

* :class:`DPStrategy`: DP-SGD (per-sample clipping, Gaussian noise, Poisson sampling, accounting),
  on one device or with DDP.
* :class:`SpartaMaskCallback`: SPARTA's private row scoring at epoch T0 and row-sparse training.
* :class:`PrivacyBudgetCallback`: ε logged as training goes, and an optional stop before a budget.
"""

from lightning_sparta.callbacks.privacy_budget import PrivacyBudgetCallback
from lightning_sparta.callbacks.sparta_mask import SpartaMaskCallback
from lightning_sparta.strategy import DPStrategy

__version__ = "0.1.0"

__all__ = ["DPStrategy", "PrivacyBudgetCallback", "SpartaMaskCallback", "__version__"]
