"""Lightning callbacks of lightning_sparta."""

from lightning_sparta.callbacks.privacy_budget import PrivacyBudgetCallback

__all__ = ["PrivacyBudgetCallback"]
