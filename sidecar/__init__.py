"""sidecar: a Kafka streaming sidecar for safe machine-learning model rollouts."""

from .contracts import Comparison, DeadLetter, Decision, InferenceRequest, ModelError, ModelResult
from .errors import (
    BrokerError,
    ConfigError,
    ContractError,
    EmbeddedBrokerError,
    ModelLoadError,
    SidecarError,
)
from .routing import Mode, PolicyHolder, RoutingPolicy

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "Comparison",
    "ConfigError",
    "ContractError",
    "DeadLetter",
    "Decision",
    "EmbeddedBrokerError",
    "InferenceRequest",
    "Mode",
    "ModelError",
    "ModelLoadError",
    "ModelResult",
    "PolicyHolder",
    "RoutingPolicy",
    "SidecarError",
    "__version__",
]
