"""Lightning callbacks of lightning_sparta."""

from lightning_sparta.callbacks.privacy_budget import PrivacyBudgetCallback
from lightning_sparta.callbacks.sparta_mask import SpartaMaskCallback

__all__ = ["PrivacyBudgetCallback", "SpartaMaskCallback"]
