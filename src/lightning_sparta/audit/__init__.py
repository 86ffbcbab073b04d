"""Privacy auditing in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

* :class:`PrivacyAuditCallback`: gradient (white-box) and input (mislabelled-example) canaries in a
  :class:`~lightning_sparta.DPStrategy` run; an empirical ε lower bound next to the accountant's ε.
* :func:`epsilon_lower_bound`, :func:`p_value`, :func:`count_correct_guesses`: the bound as pure functions.
* :class:`CanaryDataset`: a training set with input canaries.
"""

from lightning_sparta.audit.bounds import AuditResult, count_correct_guesses, epsilon_lower_bound, p_value
from lightning_sparta.audit.callback import PrivacyAuditCallback
from lightning_sparta.audit.canaries import CanaryDataset

__all__ = [
    "AuditResult",
    "CanaryDataset",
    "PrivacyAuditCallback",
    "count_correct_guesses",
    "epsilon_lower_bound",
    "p_value",
]
