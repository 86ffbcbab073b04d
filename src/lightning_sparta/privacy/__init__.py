"""Privacy machinery: accountants, σ calibration, Poisson sampling and per-sample gradients."""

from lightning_sparta.privacy.accountant import (
    ACCOUNTANT_NAMES,
    calibrate_noise_multiplier,
    create_accountant,
    epsilon_for,
)
from lightning_sparta.privacy.independence import SampleCouplingError, check_sample_independence
from lightning_sparta.privacy.per_sample import (
    PerSampleGradients,
    input_gradients,
    register_broadcast_parameters,
    register_functional_children,
    register_layer_scale,
)
from lightning_sparta.privacy.sampler import DPDataLoader, PoissonBatchSampler
from lightning_sparta.privacy.validation import IncompatibleModelError, validate_model

__all__ = [
    "ACCOUNTANT_NAMES",
    "DPDataLoader",
    "IncompatibleModelError",
    "PerSampleGradients",
    "PoissonBatchSampler",
    "SampleCouplingError",
    "calibrate_noise_multiplier",
    "check_sample_independence",
    "create_accountant",
    "epsilon_for",
    "input_gradients",
    "register_broadcast_parameters",
    "register_functional_children",
    "register_layer_scale",
    "validate_model",
]
